"""Rate, distortion and classification loss (eqs. 1 and 4) at fixed noise, as pure functions of θ.

Hessian-vector products and finite differences need the *same* function at every call, so the
Monte-Carlo noise of the reparameterized encoder is drawn once from a seed and kept: with K samples
per example, R, D and C are deterministic functions of θ (in nats per example, averaged over the
data set).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..data.base import LabeledData
from ..errors import bad_value
from ..models import RepresentationModel
from .parameters import ParameterLayout

__all__ = ["Functionals", "FixedNoiseFunctionals", "fixed_noise", "check_chunk_size", "sum_in_order"]


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


def sum_in_order(terms: Iterable[Tensor]) -> Tensor:
    """((t₁ + t₂) + t₃) + …: the order of a data set's chunks and of the ranks' shards, so that one
    process evaluating the data in chunks equal to the shards of 2 ranks adds what their
    all-reduce adds, bit for bit (:class:`~quasistatic.Objective`)."""
    return functools.reduce(torch.add, terms)


def check_chunk_size(chunk_size: int | None, what: str = "chunk_size") -> int | None:
    """``chunk_size`` if it is None (all examples at once) or an integer >= 1; an InputError naming
    ``what`` otherwise."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise bad_value(what, "an integer >= 1 (or none: all examples at once)", chunk_size)
    return chunk_size


class FixedNoiseFunctionals:
    """θ ↦ (R, D, C) on one data set with K fixed noise samples per example (eqs. 1, 4).

    ``chunk_size`` bounds the examples evaluated at once (memory); the result depends on it only by
    the rounding of the sums' order.
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
        self.chunk_size = check_chunk_size(chunk_size) or max(1, len(data))
        self._mean_logits = _Method(model, "mean_logits")
        self._outputs = _Method(model, "outputs")
        self.bounds: list[tuple[int, int]] | None = None  # a subsample's chunks (subset); None: by chunk_size
        self._copy_chunks()

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
        indices of the held ones among them (default: 0..len(index)-1).

        The subsample's chunks are those of this data set: its examples grouped by the chunk they
        are in here (in ``index``'s order within a chunk), so that one process whose chunks are the
        ranks' shards holds each rank's share of the subsample as a chunk of its own."""
        numbers = torch.arange(len(index)) if numbers is None else numbers
        ends = torch.tensor([stop for _, stop in self.chunks()])
        chunk = torch.searchsorted(ends, index, right=True)  # the chunk each example is in here
        order = torch.sort(chunk, stable=True).indices
        index, numbers = index[order], numbers[order]
        sizes = torch.unique_consecutive(chunk[order], return_counts=True)[1].tolist()
        stops = list(itertools.accumulate(sizes))
        part = object.__new__(FixedNoiseFunctionals)
        part.model, part.layout = self.model, self.layout
        part.total = len(index) if total is None else total
        part.index = numbers
        part.data = self.data.subset(index.to(self.data.y.device))
        part.noise = self.noise[:, index.to(self.noise.device)]
        part.chunk_size = max([1, *sizes])
        part.bounds = [(stop - size, stop) for size, stop in zip(sizes, stops)]
        part._mean_logits, part._outputs = self._mean_logits, self._outputs
        part._copy_chunks()
        return part

    def inputs(self, start: int = 0, stop: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(x, y, noise) of the held examples start:stop; of a chunk, its copy (:meth:`_copy_chunks`)."""
        copy = self._copies.get((start, len(self.data) if stop is None else stop))
        if copy is not None:
            return copy
        return self.data.x[start:stop], self.data.y[start:stop], self.noise[:, start:stop]

    def _copy_chunks(self) -> None:
        """Give each chunk, when there are several, a copy of its inputs: a kernel's rounding can
        depend on where its operands start in memory, and a copy starts where a rank's shard (also
        a copy) does, so that chunks equal to the ranks' shards compute what the ranks compute, bit
        for bit. Made here, outside any ``torch.func`` transform (a tensor made inside one and kept
        would escape it); the data's memory at most doubles."""
        chunks = self.chunks()
        self._copies: dict[tuple[int, int], tuple[Tensor, Tensor, Tensor]] = {
            (start, stop): (
                self.data.x[start:stop].clone(),
                self.data.y[start:stop].clone(),
                self.noise[:, start:stop].clone(),
            )
            for start, stop in (chunks if len(chunks) > 1 else [])
        }

    def per_example(self, theta: Tensor, start: int = 0, stop: int | None = None) -> Tensor:
        """(3, m) per-example R, D, C for examples start:stop at parameters θ."""
        return functional_call(self.model, self.layout.unflatten(theta), self.inputs(start, stop))

    def _routed(self, theta: Tensor) -> dict[str, Tensor]:
        return {f"model.{name}": value for name, value in self.layout.unflatten(theta).items()}

    def outputs(self, theta: Tensor, start: int = 0, stop: int | None = None) -> tuple[Tensor, ...]:
        """The model's outputs (μ, log σ², decoder parameters, logits) on examples start:stop."""
        x, _, noise = self.inputs(start, stop)
        return functional_call(self._outputs, self._routed(theta), (x, noise))

    def losses(self, outputs: tuple[Tensor, ...], start: int = 0, stop: int | None = None) -> Tensor:
        """(3, m) per-example R, D, C computed from ``outputs`` of examples start:stop."""
        return self.model.losses(outputs, *self.inputs(start, stop))

    def chunks(self) -> list[tuple[int, int]]:
        """The (start, stop) ranges of the chunks the data set is evaluated in; one empty chunk
        when no example is held (a rank's shard of a subsample may be empty: it still computes
        zeros, and takes part in the ranks' sums)."""
        n = len(self.data)
        if self.bounds is not None:
            return self.bounds or [(0, 0)]
        return [(i, min(i + self.chunk_size, n)) for i in range(0, n, self.chunk_size)] or [(0, 0)]

    def chunk_functionals(self, theta: Tensor, start: int, stop: int) -> Tensor:
        """(3,) [R, D, C] of the examples start:stop summed and divided by :attr:`total`: one
        chunk's term of ``self(θ)``. The empty chunk of a rank without examples gives zeros, as a
        zero multiple of ‖θ‖²: its gradient and Hessian-vector products then depend on θ and the
        vector as any chunk's do, so that they are batched under ``vmap`` like the others'."""
        if start == stop:
            return theta.new_zeros(3) + 0 * theta.dot(theta)
        return self.per_example(theta, start, stop).sum(-1) / self.total

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
        the average over the data set when all are held, a rank's share of it otherwise. The
        chunks' terms (:meth:`chunk_functionals`) are added in order."""
        return sum_in_order([self.chunk_functionals(theta, start, stop) for start, stop in self.chunks()])
