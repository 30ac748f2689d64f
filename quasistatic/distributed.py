"""Data parallelism over ``torch.distributed``: each rank holds a shard of the data, and every sum
over the data set is completed by one all-reduce.

Under ``torchrun --nproc_per_node N`` (or any launcher that sets ``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``), :func:`init_from_env` joins the process group (gloo on CPUs, NCCL
on GPUs) and returns a :class:`ShardGroup`; research code with its own launcher builds one from
its own group. An :class:`~quasistatic.Objective` given one evaluates J on the examples of its rank
only (:meth:`ShardGroup.shard`, a contiguous block of the global indices) and sums the products it
returns — values, gradients, Hessian- and Gauss–Newton-vector products, with their k columns in one
tensor — across the ranks with one all-reduce each (:meth:`ShardGroup.sum`). The reduced results
are the same on every rank, so θ, the controls and every decision that reads them stay identical
without further communication.

Only rank 0 writes files and shows progress (:attr:`ShardGroup.is_main`). A rank that fails must
not leave the others waiting in a collective: :func:`abort_on_failure` prints the failing rank's
message and ends its process at once; the others' next collective then fails (gloo notices a
closed peer at once; otherwise the group's ``timeout``), and torchrun stops them.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import InputError

__all__ = [
    "ShardGroup",
    "CommunicationStats",
    "ENV_VARIABLES",
    "launched_by_torchrun",
    "init_from_env",
    "is_main_process",
    "abort_on_failure",
    "summed_over_ranks",
]

ENV_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # what torchrun sets for every rank
DEFAULT_TIMEOUT_S = 60.0  # a collective that waits longer than this on a rank fails (a peer is gone)


@dataclass
class CommunicationStats:
    """All-reduces done through one :class:`ShardGroup`: how many, their seconds (waiting for the
    slowest rank included) and the elements sent."""

    calls: int = 0
    seconds: float = 0.0
    elements: int = 0


@dataclass
class ShardGroup:
    """The ranks of ``group`` (None: the default group) sharing the data of every objective built
    with it. ``group`` must be initialized (``torch.distributed.init_process_group``)."""

    group: dist.ProcessGroup | None = None
    stats: CommunicationStats = field(default_factory=CommunicationStats)

    def __post_init__(self) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise InputError("a data-parallel group must be an initialized torch.distributed process group, got none")

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def size(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes files and shows progress."""
        return self.rank == 0

    def shard(self, n: int) -> Tensor:
        """The global indices (a contiguous block, ascending) of the n examples this rank holds; the
        blocks of the ranks differ in size by at most one and cover 0..n-1 in rank order."""
        if n < self.size:
            raise InputError(f"the number of ranks must be at most the number of examples ({n}), got {self.size} ranks")
        return torch.tensor_split(torch.arange(n), self.size)[self.rank]

    def sum(self, tensor: Tensor) -> Tensor:
        """``tensor`` summed over the ranks (a new tensor): one all-reduce, counted in :attr:`stats`.
        Every rank must call it in the same order with the same shape."""
        out = tensor.detach().clone().contiguous()
        started = time.perf_counter()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        self.stats.seconds += time.perf_counter() - started
        self.stats.calls += 1
        self.stats.elements += out.numel()
        return out

    def barrier(self) -> None:
        """Wait until every rank has called it."""
        dist.barrier(group=self.group)

    def agree(self, what: str, value: object) -> None:
        """Check that every rank has the same ``value`` (settings read at the start): an
        :class:`~quasistatic.InputError` naming the ranks' values otherwise."""
        values: list[object] = [None] * self.size
        dist.all_gather_object(values, value, group=self.group)
        if any(v != values[0] for v in values):
            raise InputError(f"{what} must be the same on every rank, got {values}")


def is_main_process(group: ShardGroup | None) -> bool:
    """Whether this process writes the output and shows progress: alone (``group`` None) or rank 0."""
    return group is None or group.is_main


Reduce = Callable[[Tensor], Tensor]  # a tensor summed over the ranks (one all-reduce)


class _SumOverRanks(torch.autograd.Function):
    """x ↦ Σ_ranks x with the cotangent passed through: where the cotangent is the same on every
    rank, that is the derivative of the sum with respect to this rank's x. Batched under vmap: the
    columns travel in one all-reduce."""

    generate_vmap_rule = False

    @staticmethod
    def forward(x: Tensor, reduce: Reduce) -> Tensor:
        return reduce(x)

    @staticmethod
    def setup_context(ctx: object, inputs: tuple, output: Tensor) -> None:
        pass

    @staticmethod
    def backward(ctx: object, cotangent: Tensor) -> tuple[Tensor, None]:
        return cotangent, None

    @staticmethod
    def vmap(info: object, in_dims: tuple, x: Tensor, reduce: Reduce) -> tuple[Tensor, int | None]:
        return reduce(x), in_dims[0]


class _SummedOverRanks(torch.autograd.Function):
    """θ ↦ Σ_ranks f_r(θ) with the Jacobian Σ_ranks ∂f_r/∂θ (first order: grad, vjp, jacrev)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(theta: Tensor, f: Callable[[Tensor], Tensor], reduce: Reduce) -> Tensor:
        return reduce(f(theta))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        ctx.save_for_backward(inputs[0])
        ctx.f, ctx.reduce = inputs[1], inputs[2]

    @staticmethod
    def backward(ctx: Any, cotangent: Tensor) -> tuple[Tensor, None, None]:
        (theta,) = ctx.saved_tensors
        pullback = torch.func.vjp(ctx.f, theta)[1]
        return _SumOverRanks.apply(pullback(cotangent)[0], ctx.reduce), None, None


def summed_over_ranks(f: Callable[[Tensor], Tensor], theta: Tensor, reduce: Reduce) -> Tensor:
    """Σ_ranks f_r(θ), f_r = ``f`` on each rank (its share of a sum over the data), differentiable
    to first order by autograd and ``torch.func`` (grad, vjp, jacrev: the Jacobian's rows in one
    all-reduce); ``reduce`` sums a tensor over the ranks. One all-reduce for the value, one per
    pullback.

    This is for code that differentiates a global function as a whole (``jacrev(objective.functionals)``).
    The library's own products (gradients, Hessian- and Gauss–Newton-vector products) are instead
    taken of this rank's share and the product is all-reduced (``Objective.reduce``): a collective
    inside nested ``torch.func`` transforms would need a rule for every transform and every order
    (reverse-over-reverse HVPs, jvp), while a product is linear in the shares, so one all-reduce
    of it is exact at any order and is counted once per application."""
    return _SummedOverRanks.apply(theta, f, reduce)


def launched_by_torchrun() -> bool:
    """Whether the launcher's environment variables (:data:`ENV_VARIABLES`) are set."""
    return all(name in os.environ for name in ENV_VARIABLES)


def init_from_env(device: str = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S) -> ShardGroup | None:
    """Join the process group of a torchrun launch (gloo for ``device`` "cpu", NCCL for "cuda", then
    each rank on the GPU ``LOCAL_RANK``) and return it; None when the process was not launched so
    or is alone (``WORLD_SIZE`` 1). Already initialized: the default group is returned."""
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return None
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl" and not torch.cuda.is_available():
            raise InputError(f"--device must be cpu (CUDA is not available here), got {device!r}")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return ShardGroup()


@contextmanager
def abort_on_failure(group: ShardGroup | None, report: Callable[[BaseException], int]) -> Iterator[None]:
    """Run the block; when it raises on a rank of ``group``, ``report(error)`` says what failed
    (on stderr) and gives the exit status, and this process ends at once with it (1 if it gives 0),
    without waiting for the other ranks: their next collective fails as the group loses a rank (or
    after the group's timeout), and torchrun stops the others when one exits non-zero. Alone
    (``group`` None) the block runs as it is."""
    if group is None:
        yield
        return
    try:
        yield
    except BaseException as error:  # noqa: B036 — any failure must end the rank, KeyboardInterrupt too
        code = report(error) or 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # skips the group's teardown and atexit, which would wait for the other ranks
