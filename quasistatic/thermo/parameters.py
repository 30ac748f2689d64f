"""A model's parameters as one flat vector θ ∈ R^N, the state the quasi-static engine integrates."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["ParameterLayout"]


class ParameterLayout:
    """Names and shapes of a module's parameters; maps between the dict and the flat vector θ.

    ``unflatten`` returns views into θ, so a function of the dict built from it is a differentiable
    function of θ (torch.func transforms see one flat input).
    """

    def __init__(self, module: nn.Module) -> None:
        named = [(name, p) for name, p in module.named_parameters()]
        self.names = tuple(name for name, _ in named)
        self.shapes = tuple(tuple(p.shape) for _, p in named)
        self.sizes = tuple(math.prod(shape) for shape in self.shapes)
        self.numel = sum(self.sizes)

    def flatten(self, params: dict[str, Tensor]) -> Tensor:
        """θ = concatenation of the parameters in registration order; (N,)."""
        return torch.cat([params[name].reshape(-1) for name in self.names])

    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        """The parameter dict whose entries are views of θ."""
        chunks = torch.split(theta, list(self.sizes))
        return {name: chunk.view(shape) for name, chunk, shape in zip(self.names, chunks, self.shapes)}

    def read(self, module: nn.Module) -> Tensor:
        """θ of ``module``'s current parameters (a detached copy)."""
        return self.flatten(dict(module.named_parameters())).detach().clone()

    @torch.no_grad()
    def write(self, module: nn.Module, theta: Tensor) -> None:
        """Copy θ into ``module``'s parameters in place."""
        params = dict(module.named_parameters())
        for name, value in self.unflatten(theta).items():
            params[name].copy_(value)
