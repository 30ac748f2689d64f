"""torchdiffeq's adaptive Runge–Kutta methods as integrators (they sub-step inside each h)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor
from torchdiffeq import odeint

from ..errors import bad_value
from .base import Integrator, VectorField, register_integrator

__all__ = ["TorchdiffeqIntegrator"]


class TorchdiffeqIntegrator(Integrator):
    """``torchdiffeq.odeint`` over [s, s + h] with an embedded-error step-size control."""

    adaptive = True
    method: ClassVar[str]

    def __init__(self, rtol: float = 1e-6, atol: float = 1e-8) -> None:
        if not rtol > 0:
            raise bad_value("rtol", "a number > 0", rtol)
        if not atol > 0:
            raise bad_value("atol", "a number > 0", atol)
        self.rtol, self.atol = rtol, atol

    def step(self, field: VectorField, s: float, y: Tensor, h: float) -> Tensor:
        span = torch.tensor([s, s + h], dtype=y.dtype, device=y.device)
        # first_step=h: without it torchdiffeq guesses a first step from scratch at every call,
        # which on the short spans the engine asks for costs accuracy (dopri5: 1e-6 -> 1e-9 error).
        return odeint(
            lambda s_, y_: field(float(s_), y_),
            y,
            span,
            method=self.method,
            rtol=self.rtol,
            atol=self.atol,
            options={"first_step": h},
        )[-1]


def _torchdiffeq_method(method: str, order: int) -> type[TorchdiffeqIntegrator]:
    return type(f"Torchdiffeq_{method}", (TorchdiffeqIntegrator,), {"method": method, "order": order})


for _method, _order in (("dopri5", 5), ("bosh3", 3), ("adaptive_heun", 2)):
    register_integrator(_method, _torchdiffeq_method(_method, _order))
