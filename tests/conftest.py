"""Shared test set-up."""

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
