"""The objective J(θ; λ, γ, t) = R + λD + γC under the data distribution p(x, t) (eqs. 8, 14, 23).

J is evaluated on fixed data (all of a split, or a seeded subset) with fixed encoder noise, so it is
a deterministic, pure function of the flat parameter vector θ: the curvature code differentiates it
with ``torch.func`` and the engine integrates θ as an ODE state.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor
from torch.func import grad, grad_and_value, jacrev

from ..data.base import LabeledData
from ..data.mixture import DataMixture, mixture_weights
from ..errors import bad_value
from .functionals import FixedNoiseFunctionals, Functionals
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
    """

    def __init__(
        self,
        model: RepresentationModel,
        data: LabeledData | DataMixture,
        samples: int = 1,
        noise_seed: int = 0,
        chunk_size: int | None = None,
        sigma: float = 0.0,
    ) -> None:
        if not sigma >= 0:
            raise bad_value("sigma", "a number >= 0", sigma)
        self.sigma = sigma
        self.model = model
        self.layout = ParameterLayout(model)
        self.mixture = data if isinstance(data, DataMixture) else None
        sets = [data.source, data.target] if isinstance(data, DataMixture) else [data]
        self.parts = [
            FixedNoiseFunctionals(model, part, samples, noise_seed + i, chunk_size) for i, part in enumerate(sets)
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
        sub.parts = [
            part.subset(torch.randperm(len(part.data), generator=generator)[: max(1, round(fraction * len(part.data)))])
            for part in self.parts
        ]
        sub.work = WorkCounter()
        return sub

    @property
    def examples(self) -> int:
        """Training examples over all parts (a subsample's cost relative to its parent is the ratio)."""
        return sum(len(part.data) for part in self.parts)

    @property
    def is_mixture(self) -> bool:
        return self.mixture is not None

    def initial_theta(self) -> Tensor:
        """θ of the model's current parameters."""
        return self.layout.read(self.model)

    def part_functionals(self, theta: Tensor) -> Tensor:
        """(P, 3): [R, D, C] on each part (P = 1, or 2 for source and target of a mixture)."""
        return torch.stack([part(theta) for part in self.parts])

    def functionals(self, theta: Tensor, t: float | Tensor = 0.0) -> Tensor:
        """(3,) [R, D, C] under p(x, t): the exact mixture (1 − t)·X_s + t·X_t for a mixture."""
        if self.mixture is None:
            return self.parts[0](theta)
        return self.mixture.mix(self.parts[0](theta), self.parts[1](theta), t)

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
        return grad(self.value)(theta, controls)

    def value_and_gradient(self, theta: Tensor, controls: Controls) -> tuple[Tensor, Tensor]:
        """J and ∇θJ from one forward and one backward pass. Counts one gradient."""
        self.work.gradients += 1
        gradient, value = grad_and_value(self.value)(theta, controls)
        return value.detach(), gradient

    def epoch_batches(self, batch_size: int, generator: torch.Generator) -> list[list[Tensor]]:
        """One epoch of minibatch indices: for each batch, one index tensor per part. Each part is
        shuffled by ``generator``; a mixture's smaller part is cycled to match the larger one."""
        sizes = [len(part.data) for part in self.parts]
        n_max = max(sizes)
        orders = [
            torch.randperm(n, generator=generator).repeat(-(-n_max // n)).to(part.data.y.device)
            for n, part in zip(sizes, self.parts)
        ]
        return [
            [order[start : min(start + batch_size, n_max)] for order in orders] for start in range(0, n_max, batch_size)
        ]

    def minibatch_value(self, index: list[Tensor], controls: Controls) -> Tensor:
        """J on one minibatch (one index tensor per part) with the model's own parameters.

        Counts the fraction batch/n of a gradient: the caller backpropagates through it."""
        self.work.gradients += max(len(i) / len(part.data) for part, i in zip(self.parts, index))
        values = [part.batch_mean(i) for part, i in zip(self.parts, index)]
        mixed = values[0] if self.mixture is None else self.mixture.mix(values[0], values[1], controls.t)
        return self._combine(mixed, torch.cat([p.reshape(-1) for p in self.model.parameters()]), controls)

    def accuracy(self, theta: Tensor, t: float = 0.0) -> float:
        """Classification accuracy at the encoder mean under p(x, t)."""
        accuracies = [part.accuracy(theta) for part in self.parts]
        return accuracies[0] if self.mixture is None else float(self.mixture.mix(accuracies[0], accuracies[1], t))

    def combination_gradients(
        self, theta: Tensor, weights: Tensor, t: float = 0.0, with_entropy: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Values (m,) and gradients (m, N) of the m linear combinations weights (m, 3) of
        (R, D, C) under p(x, t), plus σS in the rows where ``with_entropy`` (m,) is true, in one
        reverse pass per row (shared forward). Counts m gradients."""
        self.work.gradients += weights.shape[0]

        def combinations(th: Tensor) -> tuple[Tensor, Tensor]:
            values = weights @ self.functionals(th, t)
            if with_entropy is not None and self.sigma:
                values = values + with_entropy * (self.sigma * self.weight_entropy(th))
            return values, values

        gradients, values = jacrev(combinations, has_aux=True)(theta)
        return values.detach(), gradients.detach()

    def report(self, theta: Tensor, t: float = 0.0) -> Functionals:
        """R, D, C and S as floats (no graph)."""
        self.work.forwards += 1
        with torch.no_grad():
            r, d, c = self.functionals(theta, t).tolist()
            return Functionals(r, d, c, float(self.weight_entropy(theta)), self.sigma)
