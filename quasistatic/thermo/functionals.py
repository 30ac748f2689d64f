"""Rate, distortion and classification loss (eqs. 1 and 4) at fixed noise, as pure functions of θ.

Hessian-vector products and finite differences need the *same* function at every call, so the
Monte-Carlo noise of the reparameterized encoder is drawn once from a seed and kept: with K samples
per example, R, D and C are deterministic functions of θ (in nats per example, averaged over the
data set).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..data.base import LabeledData
from ..errors import bad_value
from ..models import RepresentationModel
from .parameters import ParameterLayout

__all__ = ["Functionals", "FixedNoiseFunctionals", "fixed_noise"]


class Functionals(NamedTuple):
    """R, D, C in nats per example and S = ½‖θ‖² with its weight σ; F = R + λD + γC + σS is the
    free energy at equilibrium (eqs. 6, 8)."""

    R: float
    D: float
    C: float
    S: float = 0.0
    sigma: float = 0.0

    def free_energy(self, lam: float, gamma: float) -> float:
        return self.R + lam * self.D + gamma * self.C + self.sigma * self.S


def fixed_noise(
    samples: int, n: int, latent_dim: int, seed: int, dtype: torch.dtype, device: torch.device | str | None = None
) -> Tensor:
    """The fixed standard-normal draws (K, n, latent_dim) of the reparameterized encoder."""
    if samples < 1:
        raise bad_value("number of samples K", "an integer >= 1", samples)
    generator = torch.Generator().manual_seed(seed)
    # Drawn in float64 and then cast, so that the same seed gives the same noise in every dtype.
    noise = torch.randn(samples, n, latent_dim, generator=generator, dtype=torch.float64)
    return noise.to(device=device, dtype=dtype)


class _Method(nn.Module):
    """Routes ``functional_call`` to another method of the model than ``forward``."""

    def __init__(self, model: RepresentationModel, method: str) -> None:
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, *args: Tensor) -> Tensor | tuple[Tensor, ...]:
        return getattr(self.model, self.method)(*args)


class FixedNoiseFunctionals:
    """θ ↦ (R, D, C) on one data set with K fixed noise samples per example (eqs. 1, 4).

    ``chunk_size`` bounds the examples evaluated at once (memory); the result does not depend on it.
    ``index``: the (global) indices of the examples held here, a rank's shard of the data set
    (:meth:`quasistatic.distributed.ShardGroup.shard`); None: all of them. An example's noise is
    drawn for its global index, and the means are over the whole data set (:attr:`total`
    examples), so that the shares of the ranks sum to the functionals of the whole data set.
    """

    def __init__(
        self,
        model: RepresentationModel,
        data: LabeledData,
        samples: int = 1,
        noise_seed: int = 0,
        chunk_size: int | None = None,
        index: Tensor | None = None,
    ) -> None:
        param = next(model.parameters())
        self.model = model
        self.layout = ParameterLayout(model)
        self.total = len(data)  # examples of the whole data set: the denominator of the means
        self.index = torch.arange(len(data)) if index is None else index  # the global indices held
        self.noise = fixed_noise(samples, len(data), model.config.latent_dim, noise_seed, param.dtype, param.device)
        if index is not None:
            data, self.noise = data.subset(index), self.noise[:, index.to(self.noise.device)]
        self.data = data.to(device=param.device, dtype=param.dtype)
        self.chunk_size = chunk_size or max(1, len(data))
        self._mean_logits = _Method(model, "mean_logits")
        self._outputs = _Method(model, "outputs")

    def held(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """For global indices ``index`` (on the CPU): the positions here of those held, in their
        order, and the mask of ``index`` that they are."""
        positions = torch.full((self.total,), -1, dtype=torch.long)
        positions[self.index] = torch.arange(len(self.index))
        found = positions[index]
        mask = found >= 0
        return found[mask], mask

    def subset(self, index: Tensor, total: int | None = None, numbers: Tensor | None = None) -> "FixedNoiseFunctionals":
        """The same functionals on the held examples at positions ``index``, each with its own
        fixed noise: an unbiased estimate of this one (for subsampled curvature). Over all ranks
        the subsample has ``total`` examples (default: ``len(index)``), and ``numbers`` are the
        indices of the held ones among them (default: 0..len(index)-1)."""
        part = object.__new__(FixedNoiseFunctionals)
        part.model, part.layout = self.model, self.layout
        part.total = len(index) if total is None else total
        part.index = torch.arange(len(index)) if numbers is None else numbers
        part.data = self.data.subset(index.to(self.data.y.device))
        part.noise = self.noise[:, index.to(self.noise.device)]
        part.chunk_size = max(1, min(self.chunk_size, len(index)))
        part._mean_logits, part._outputs = self._mean_logits, self._outputs
        return part

    def per_example(self, theta: Tensor, start: int = 0, stop: int | None = None) -> Tensor:
        """(3, m) per-example R, D, C for examples start:stop at parameters θ."""
        x, y = self.data.x[start:stop], self.data.y[start:stop]
        return functional_call(self.model, self.layout.unflatten(theta), (x, y, self.noise[:, start:stop]))

    def _routed(self, theta: Tensor) -> dict[str, Tensor]:
        return {f"model.{name}": value for name, value in self.layout.unflatten(theta).items()}

    def outputs(self, theta: Tensor, start: int = 0, stop: int | None = None) -> tuple[Tensor, ...]:
        """The model's outputs (μ, log σ², decoder parameters, logits) on examples start:stop."""
        return functional_call(self._outputs, self._routed(theta), (self.data.x[start:stop], self.noise[:, start:stop]))

    def losses(self, outputs: tuple[Tensor, ...], start: int = 0, stop: int | None = None) -> Tensor:
        """(3, m) per-example R, D, C computed from ``outputs`` of examples start:stop."""
        return self.model.losses(outputs, self.data.x[start:stop], self.data.y[start:stop], self.noise[:, start:stop])

    def chunks(self) -> list[tuple[int, int]]:
        """The (start, stop) ranges of the chunks the data set is evaluated in."""
        n = len(self.data)
        return [(i, min(i + self.chunk_size, n)) for i in range(0, n, self.chunk_size)]

    def batch_sum(self, theta: Tensor, index: Tensor) -> Tensor:
        """(3,) [R, D, C] at θ summed over the held examples at positions ``index`` with the same
        fixed noise (a rank's share of a minibatch)."""
        inputs = (self.data.x[index], self.data.y[index], self.noise[:, index])
        return functional_call(self.model, self.layout.unflatten(theta), inputs).sum(-1)

    def batch_mean(self, index: Tensor) -> Tensor:
        """(3,) [R, D, C] averaged over the examples at ``index`` with the model's own parameters
        and the same fixed noise: an unbiased minibatch estimate of ``self(θ)``."""
        return self.model(self.data.x[index], self.data.y[index], self.noise[:, index]).mean(-1)

    def accuracy(self, theta: Tensor) -> float:
        """The held examples whose label is argmax c(y | z = μ(x)) (the encoder mean, no noise), as
        a fraction of the whole data set (:attr:`total`)."""
        params = self._routed(theta)
        with torch.no_grad():
            correct = sum(
                (
                    functional_call(self._mean_logits, params, (self.data.x[i : i + self.chunk_size],)).argmax(-1)
                    == self.data.y[i : i + self.chunk_size]
                )
                .sum()
                .item()
                for i in range(0, len(self.data), self.chunk_size)
            )
        return correct / self.total

    def __call__(self, theta: Tensor) -> Tensor:
        """(3,) tensor [R, D, C], each summed over the held examples and divided by :attr:`total`:
        the average over the data set when all are held, a rank's share of it otherwise."""
        n = len(self.data)
        zero = torch.zeros(3, dtype=theta.dtype, device=theta.device)  # a rank's shard of a subsample may be empty
        chunks = range(0, n, self.chunk_size)
        total = sum((self.per_example(theta, i, i + self.chunk_size).sum(-1) for i in chunks), zero)
        return total / self.total
