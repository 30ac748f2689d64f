"""The objective J(θ; λ, γ, t) = R + λD + γC under the data distribution p(x, t) (eqs. 8, 14, 23).

J is evaluated on fixed data (all of a split, or a seeded subset) with fixed encoder noise, so it is
a deterministic, pure function of the flat parameter vector θ: the curvature code differentiates it
with ``torch.func`` and the engine integrates θ as an ODE state.

Chunks and ranks. The data are evaluated ``chunk_size`` examples at a time; with a ``group``
(:mod:`quasistatic.distributed`) each rank holds a contiguous shard of every data set, in chunks.
An objective's ``local_*`` functions are this process's shares of (R, D, C) and of R + λD + γC
(its examples' sums over the global count): pure functions, differentiable to any order, that
communicate nothing. A product of J's derivatives (gradient, Hessian- and Gauss–Newton-vector
products, dense Hessian) is taken of each chunk's share on its own (:meth:`Objective.local_values`),
the chunks' products are added in order, and the sum is summed over the ranks, one all-reduce each
(:meth:`Objective.sum_chunks`); σS is then added in closed form (σS, σθ, σV). So every sum has
the same order alone and on ranks: on one data set, one process whose ``chunk_size`` is the shard
of 2 ranks computes their products (K-FAC's random draws included) and follows their trajectory
bit for bit, where each split's shards are whole chunks (a validation set of another size agrees
to rounding); in other chunks the results differ by the rounding of the sums' order. A mixture's
chunks are added part by part alone but chunk position by chunk position over the ranks, and
Adam's minibatches reduce their own way: those agree to rounding only.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, jacrev

from ..data.base import LabeledData
from ..data.mixture import DataMixture, mixture_weights
from ..distributed import ShardGroup, is_main_process, summed_over_ranks
from ..errors import bad_value
from .functionals import FixedNoiseFunctionals, Functionals, sum_in_order
from ..models import RepresentationModel
from .parameters import ParameterLayout
from ..work import WorkCounter

__all__ = ["Controls", "Objective"]


@dataclass(frozen=True)
class Controls:
    """The control variables of a quasi-static process: Lagrange multipliers and mixture time."""

    lam: float  # λ, weight of the distortion D
    gamma: float  # γ, weight of the classification loss C
    t: float = 0.0  # mixture time of eq. 23 (0: source only)

    def __post_init__(self) -> None:
        if not self.lam >= 0:
            raise bad_value("lambda", "a number >= 0", self.lam)
        if not self.gamma >= 0:
            raise bad_value("gamma", "a number >= 0", self.gamma)
        mixture_weights(self.t)

    def weights(self, like: Tensor) -> Tensor:
        """(1, λ, γ): J = weights · (R, D, C)."""
        return torch.tensor([1.0, self.lam, self.gamma], dtype=like.dtype, device=like.device)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


class Objective:
    """J(θ; λ, γ, t) at fixed noise on one data set or on a two-part mixture (eq. 23).

    ``samples`` is K, the number of fixed noise draws per example; the parts of a mixture get the
    seeds ``noise_seed`` and ``noise_seed + 1``.

    ``sigma`` adds the paper's σS term (eq. 6) with a Gaussian prior on the weights, S = ½‖θ‖²:
    J = R + λD + γC + σS. With finitely many fixed noise draws the training examples can become
    separable in z, and then C → 0 as the classifier's weights grow without bound: J has no
    minimizer and no equilibrium surface. Any σ > 0 restores isolated minima (the first law then
    reads dR = −λdD − γdC − σdS, eq. 7).

    ``group``: the ranks that share the data (module docstring); each holds its shard of every
    part, with the noise of the whole data set's draw at the examples' global indices, so that J,
    its derivatives and the trajectories built on them do not depend on the number of ranks (up to
    the rounding of the sums' order; bit for bit between 2 ranks and one process whose
    ``chunk_size`` is their shard: module docstring).
    """

    group: ShardGroup | None = None  # set by __init__; the class default serves objectives built without it

    def __init__(
        self,
        model: RepresentationModel,
        data: LabeledData | DataMixture,
        samples: int = 1,
        noise_seed: int = 0,
        chunk_size: int | None = None,
        sigma: float = 0.0,
        group: ShardGroup | None = None,
    ) -> None:
        if not sigma >= 0:
            raise bad_value("sigma", "a number >= 0", sigma)
        self.sigma = sigma
        self.model = model
        self.layout = ParameterLayout(model)
        self.mixture = data if isinstance(data, DataMixture) else None
        self.group = group
        sets = [data.source, data.target] if isinstance(data, DataMixture) else [data]
        self.parts = [
            FixedNoiseFunctionals(
                model, part, samples, noise_seed + i, chunk_size, None if group is None else group.shard(len(part))
            )
            for i, part in enumerate(sets)
        ]
        self.work = WorkCounter()

    def subsample(self, fraction: float, seed: int = 0) -> "Objective":
        """J on a fixed random ``fraction`` of each part's examples (same model, the same noise
        for each kept example), with its own work counter: subsampled curvature. ``fraction`` 1
        returns this objective."""
        if not 0 < fraction <= 1:
            raise bad_value("subsample fraction", "a number in (0, 1]", fraction)
        if fraction == 1:
            return self
        generator = torch.Generator().manual_seed(seed)
        sub = object.__new__(Objective)
        sub.sigma, sub.model, sub.layout, sub.mixture = self.sigma, self.model, self.layout, self.mixture
        sub.group = self.group
        sub.parts = []
        for part in self.parts:
            kept = torch.randperm(part.total, generator=generator)[: max(1, round(fraction * part.total))]
            if self.group is None:
                sub.parts.append(part.subset(kept))
            else:
                held, mask = part.held(kept)
                sub.parts.append(part.subset(held, len(kept), mask.nonzero().squeeze(-1)))
        sub.work = WorkCounter()
        return sub

    @property
    def examples(self) -> int:
        """Training examples over all parts and ranks (a subsample's cost relative to its parent is
        the ratio)."""
        return sum(part.total for part in self.parts)

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and shows progress: rank 0, or alone."""
        return is_main_process(self.group)

    def reduce(self, tensor: Tensor) -> Tensor:
        """``tensor`` summed over the ranks of ``group`` (one all-reduce, counted); alone, itself."""
        if self.group is None:
            return tensor
        self.work.all_reduces += 1
        return self.group.sum(tensor)

    def sum_chunks(self, terms: Iterable[Tensor]) -> Tensor:
        """The terms of this rank's chunks (one each, in the order of :meth:`local_chunks`) added in
        order, then summed over the ranks (one all-reduce): the products of J's derivatives."""
        return self.reduce(sum_in_order(terms))

    def _summed(self, share: Callable[[Tensor], Tensor], theta: Tensor) -> Tensor:
        """Σ over the ranks of ``share(θ)``, differentiable to first order (alone: ``share(θ)``)."""
        return share(theta) if self.group is None else summed_over_ranks(share, theta, self.reduce)

    @property
    def is_mixture(self) -> bool:
        return self.mixture is not None

    def initial_theta(self) -> Tensor:
        """θ of the model's current parameters."""
        return self.layout.read(self.model)

    def local_part_functionals(self, theta: Tensor) -> Tensor:
        """(P, 3): this rank's share of [R, D, C] on each part (module docstring)."""
        return torch.stack([part(theta) for part in self.parts])

    def part_functionals(self, theta: Tensor) -> Tensor:
        """(P, 3): [R, D, C] on each part (P = 1, or 2 for source and target of a mixture)."""
        return self._summed(self.local_part_functionals, theta)

    def data_rate(self, theta: Tensor, controls: Controls) -> float:
        """∂_tJ at fixed θ on a mixture: J under p(x, t) of eq. 23 is linear in t, so ∂_tJ =
        (1, λ, γ)·(X_target − X_source) (σS does not depend on the data): the rate of the work of
        moving the data in a transfer's first law (docs/theory.md). One pass over both parts."""
        if self.mixture is None:
            raise bad_value("objective", "a source/target mixture for dJ/dt", "a single data set")
        source, target = self.part_functionals(theta)
        return float((target - source) @ controls.weights(source))

    def local_functionals(self, theta: Tensor, t: float | Tensor = 0.0) -> Tensor:
        """(3,): this rank's share of :meth:`functionals` (module docstring)."""
        if self.mixture is None:
            return self.parts[0](theta)
        return self.mixture.mix(self.parts[0](theta), self.parts[1](theta), t)

    def functionals(self, theta: Tensor, t: float | Tensor = 0.0) -> Tensor:
        """(3,) [R, D, C] under p(x, t): the exact mixture (1 − t)·X_s + t·X_t for a mixture."""
        return self._summed(lambda th: self.local_functionals(th, t), theta)

    def local_chunks(self, t: float = 0.0) -> list[Callable[[Tensor], Tensor]]:
        """θ ↦ (3,): the share of (R, D, C) under p(x, t) of each chunk held here, part by part
        (a part of mixture weight 0 left out). A product of J's derivatives is taken of each
        chunk's share and the products are added by :meth:`sum_chunks` (module docstring)."""
        weights = [1.0] if self.mixture is None else [float(w) for w in mixture_weights(t)]
        return [
            functools.partial(_weighted_chunk, part, weight, start, stop)
            for part, weight in zip(self.parts, weights)
            if weight != 0
            for start, stop in part.chunks()
        ]

    def local_values(self, controls: Controls) -> list[Callable[[Tensor], Tensor]]:
        """θ ↦ the share of J − σS = R + λD + γC of each chunk held here (:meth:`local_chunks`):
        the functions the curvature operators differentiate before σS's closed-form derivative
        (σθ, σV) is added."""
        return [functools.partial(_combined, chunk, controls) for chunk in self.local_chunks(controls.t)]

    def value(self, theta: Tensor, controls: Controls) -> Tensor:
        """J(θ; λ, γ, t) = R + λD + γC + σS (eq. 14 at θ, eq. 8's objective; eq. 6's σS)."""
        return self._combine(self.functionals(theta, controls.t), theta, controls)

    def _combine(self, values: Tensor, theta: Tensor, controls: Controls) -> Tensor:
        """R + λD + γC + σS from values (3,) = (R, D, C) and θ."""
        return values @ controls.weights(values) + self.sigma * self.weight_entropy(theta)

    @staticmethod
    def weight_entropy(theta: Tensor) -> Tensor:
        """S = ½‖θ‖²: eq. 5's relative entropy for a point estimate under a N(0, I) prior, up to a
        constant."""
        return 0.5 * theta.dot(theta)

    def gradient(self, theta: Tensor, controls: Controls) -> Tensor:
        """∇θJ (N,); zero on the equilibrium surface (eq. 15). Counts one gradient."""
        self.work.gradients += 1
        return self.sum_chunks(grad(value)(theta) for value in self.local_values(controls)) + self.sigma * theta

    def value_and_gradient(self, theta: Tensor, controls: Controls) -> tuple[Tensor, Tensor]:
        """J and ∇θJ from one forward and one backward pass. Counts one gradient."""
        self.work.gradients += 1

        weights = controls.weights(theta)

        def share(chunk: Callable[[Tensor], Tensor]) -> Tensor:
            gradient, functionals = grad(lambda th: _with_values(weights, chunk(th)), has_aux=True)(theta)
            return torch.cat([functionals, gradient])

        # J is combined from the summed (R, D, C), as :meth:`value` does: the same sums alone and on ranks
        both = self.sum_chunks(share(chunk) for chunk in self.local_chunks(controls.t))
        return self._combine(both[:3], theta.detach(), controls), both[3:] + self.sigma * theta

    def epoch_batches(self, batch_size: int, generator: torch.Generator) -> list[list[Tensor]]:
        """One epoch of minibatch indices (global: the same on every rank): for each batch, one
        index tensor per part. Each part is shuffled by ``generator``; a mixture's smaller part is
        cycled to match the larger one."""
        sizes = [part.total for part in self.parts]
        n_max = max(sizes)
        orders = [
            torch.randperm(n, generator=generator).repeat(-(-n_max // n)).to(part.data.y.device)
            for n, part in zip(sizes, self.parts)
        ]
        return [
            [order[start : min(start + batch_size, n_max)] for order in orders] for start in range(0, n_max, batch_size)
        ]

    def minibatch_value(self, index: list[Tensor], controls: Controls) -> Tensor:
        """J on one minibatch (one index tensor of global indices per part) with the model's own
        parameters. With a ``group``, each rank evaluates the examples of the batch it holds, and
        the backward pass sums the parameters' gradients over the ranks (one all-reduce, as DDP
        does; the value takes one more): the caller's ``loss.backward()`` then gives every rank
        the minibatch's gradient.

        Counts the fraction batch/n of a gradient: the caller backpropagates through it."""
        self.work.gradients += max(len(i) / part.total for part, i in zip(self.parts, index))
        parameters = torch.cat([p.reshape(-1) for p in self.model.parameters()])
        if self.group is None:
            values = [part.batch_mean(i) for part, i in zip(self.parts, index)]
        else:
            shared = _SumGradients.apply(parameters, self.reduce)
            values = []
            for part, i in zip(self.parts, index):
                held = part.held(i.cpu())[0].to(part.data.y.device)
                # a rank without examples in the batch still backpropagates into ``shared``: every
                # rank must take part in the gradient's all-reduce
                share = part.batch_sum(shared, held) if len(held) else shared.new_zeros(3) + 0 * shared.sum()
                values.append(_SumValues.apply(share / len(i), self.reduce))
        mixed = values[0] if self.mixture is None else self.mixture.mix(values[0], values[1], controls.t)
        return self._combine(mixed, parameters, controls)

    def accuracy(self, theta: Tensor, t: float = 0.0) -> float:
        """Classification accuracy at the encoder mean under p(x, t)."""
        accuracies = [part.accuracy(theta) for part in self.parts]
        if self.group is not None:
            accuracies = self.reduce(torch.tensor(accuracies, dtype=torch.float64, device=theta.device)).tolist()
        return accuracies[0] if self.mixture is None else float(self.mixture.mix(accuracies[0], accuracies[1], t))

    def combination_gradients(
        self, theta: Tensor, weights: Tensor, t: float = 0.0, with_entropy: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Values (m,) and gradients (m, N) of the m linear combinations weights (m, 3) of
        (R, D, C) under p(x, t), plus σS in the rows where ``with_entropy`` (m,) is true, in one
        reverse pass per row (shared forward). Counts m gradients."""
        self.work.gradients += weights.shape[0]

        def share(chunk: Callable[[Tensor], Tensor]) -> Tensor:
            gradients, functionals = jacrev(lambda th: _with_values(weights, chunk(th)), has_aux=True)(theta)
            return torch.cat([functionals, gradients.reshape(-1)])

        both = self.sum_chunks(share(chunk) for chunk in self.local_chunks(t)).detach()
        functionals, gradients = both[:3], both[3:].reshape(len(weights), -1)
        values = weights @ functionals  # from the summed (R, D, C), alone and on ranks
        if with_entropy is not None and self.sigma:  # σS after the sum (module docstring)
            theta = theta.detach()
            values = values + with_entropy * (self.sigma * self.weight_entropy(theta))
            gradients = gradients + with_entropy[:, None] * (self.sigma * theta)
        return values, gradients

    def report(self, theta: Tensor, t: float = 0.0) -> Functionals:
        """R, D, C and S as floats (no graph)."""
        self.work.forwards += 1
        with torch.no_grad():
            r, d, c = self.functionals(theta, t).tolist()
            return Functionals(r, d, c, float(self.weight_entropy(theta)), self.sigma)


class _SumGradients(torch.autograd.Function):
    """θ ↦ θ whose gradient is summed over the ranks (one all-reduce): DDP's reduction, for a
    minibatch backpropagated by autograd."""

    @staticmethod
    def forward(ctx: Any, theta: Tensor, reduce: Callable[[Tensor], Tensor]) -> Tensor:
        ctx.reduce = reduce
        return theta.view_as(theta)

    @staticmethod
    def backward(ctx: Any, gradient: Tensor) -> tuple[Tensor, None]:
        return ctx.reduce(gradient), None


class _SumValues(torch.autograd.Function):
    """A rank's share ↦ the sum of the shares over the ranks (one all-reduce); the gradient passes
    through to the share unchanged (the sum's derivative in it)."""

    @staticmethod
    def forward(ctx: Any, share: Tensor, reduce: Callable[[Tensor], Tensor]) -> Tensor:
        return reduce(share)

    @staticmethod
    def backward(ctx: Any, gradient: Tensor) -> tuple[Tensor, None]:
        return gradient, None


def _weighted_chunk(part: FixedNoiseFunctionals, weight: float, start: int, stop: int, theta: Tensor) -> Tensor:
    """One chunk's share of (R, D, C) under a mixture, its part's weight applied (:meth:`Objective.local_chunks`)."""
    share = part.chunk_functionals(theta, start, stop)
    return share if weight == 1.0 else weight * share


def _combined(chunk: Callable[[Tensor], Tensor], controls: Controls, theta: Tensor) -> Tensor:
    """R + λD + γC of one chunk's share (:meth:`Objective.local_values`)."""
    return _with_values(controls.weights(theta), chunk(theta))[0]


def _with_values(weights: Tensor, functionals: Tensor) -> tuple[Tensor, Tensor]:
    """weights · (R, D, C), with the (R, D, C) as the auxiliary output of ``grad``/``jacrev``."""
    return weights @ functionals, functionals.detach()
