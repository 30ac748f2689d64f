"""Shared test set-up."""

import contextlib

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One intra-op thread for the whole suite: the test problems are tiny, and on a 2-core machine
    shared with other work a second thread's barrier waits cost more than it computes
    (benchmarks/README.md, "Threads"); one thread also makes runs bitwise reproducible."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def restored_registries():
    """Every registry of the library, restored after the test whatever it registers or replaces;
    the value is the tuple of registries."""
    from quasistatic.continuation.correctors import CORRECTORS
    from quasistatic.data.registry import DATASETS
    from quasistatic.integrators.base import INTEGRATORS
    from quasistatic.linalg.krylov import SOLVERS
    from quasistatic.linalg.operators import OPERATORS
    from quasistatic.linalg.preconditioners import PRECONDITIONERS
    from quasistatic.models.base import ARCHITECTURES
    from quasistatic.processes import PROCESSES
    from quasistatic.experiments.reproduce import FIGURES
    from quasistatic.experiments.transfer import TRANSFER_PROCESSES

    registries = (DATASETS, ARCHITECTURES, INTEGRATORS, CORRECTORS, SOLVERS, PRECONDITIONERS, PROCESSES, OPERATORS,
                  TRANSFER_PROCESSES, FIGURES)
    with contextlib.ExitStack() as stack:
        for registry in registries:
            stack.enter_context(registry.restoring())
        yield registries
