"""The process contract and its registry.

A quasi-static process moves the controls (λ, γ, t) over the pseudo-time s ∈ [0, 1] and keeps θ
on the equilibrium surface ∇θJ = 0 (eq. 15), with θ̇ = θ_λλ̇ + θ_γγ̇ + θ_tṫ (eqs. 17 and 24). A
process implements one method, :meth:`Process.control_velocity`, that turns the current
sensitivities (the total derivatives X_s of R, D, C, F along the surface) into (λ̇, γ̇, ṫ).

A process may also hold a linear combination of the functionals constant, w·(R, D, C) = const
(``constraint``: e.g. C for iso-classification, C + β⁻¹R for Remark 8). The ``newton`` corrector
returns to that constraint by adjusting γ; :class:`ConstraintProcess` solves it for γ̇.

A process whose controls move along a straight line in s (and γ, when a constraint fixes it) also
has a *residual form* (:class:`ResidualForm`): its path is the zero set of
G(θ, s[, γ]) = (∇θJ, w·(R, D, C) − g₀), a curve that pseudo-arclength continuation follows
through folds (:mod:`quasistatic.continuation.arclength`). Processes defined only by their ODE (Remark 7's α
form, the geodesic transfer) have none.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..errors import InputError, bad_value
from ..thermo.objective import Controls
from ..registry import Parameter, Registry
from ..thermo.sensitivities import Sensitivities

__all__ = [
    "Process",
    "ConstraintProcess",
    "ResidualForm",
    "SingularConstraintError",
    "PROCESSES",
    "register_process",
    "available_processes",
    "make_process",
]

Rates = tuple[float, float, float]  # (λ̇, γ̇, ṫ)


@dataclass(frozen=True)
class ResidualForm:
    """A process path as an algebraic curve: controls c(s, γ) = (λ₀ + sλ̇, γ, t₀ + sṫ) when
    ``solves_gamma`` (γ is an unknown fixed by the constraint w·(R, D, C) = g₀), else
    c(s) = start + s·rates; the curve is {∇θJ(θ; c) = 0, and the constraint when there is one}."""

    start: Controls
    rates: Rates  # (λ̇, γ̇, ṫ) per unit s; γ̇ is unused when ``solves_gamma``
    solves_gamma: bool

    def controls(self, s: float, gamma: float | None = None) -> Controls:
        """c(s, γ); ``gamma`` is required when ``solves_gamma``. Controls outside λ, γ ≥ 0 raise."""
        lam_rate, gamma_rate, t_rate = self.rates
        gamma = gamma if self.solves_gamma else self.start.gamma + s * gamma_rate
        if gamma is None:
            raise bad_value("gamma", "a number (this residual form solves for gamma)", gamma)
        return Controls(self.start.lam + s * lam_rate, gamma, min(max(self.start.t + s * t_rate, 0.0), 1.0))


class SingularConstraintError(InputError):
    """The process's constraint cannot be solved for γ̇ (e.g. C_γ ≈ 0)."""


class Process(ABC):
    """A (λ, γ, t)-controlled quasi-static process, started at ``start``."""

    uses_mixture: ClassVar[bool] = False  # True when the data move from source to target (ṫ ≠ 0)
    # the keyword parameters of __init__ as the command line takes them (--param NAME=VALUE);
    # None: read from __init__'s signature, without help texts
    parameters: ClassVar[tuple[Parameter, ...] | None] = None

    def __init__(self, start: Controls) -> None:
        self.start = start

    @property
    def constraint(self) -> tuple[float, float, float] | None:
        """Weights w of w·(R, D, C), held constant; None for an unconstrained process."""
        return None

    @abstractmethod
    def control_velocity(self, s: float, controls: Controls, sensitivities: Sensitivities) -> Rates:
        """(λ̇, γ̇, ṫ) at pseudo-time s ∈ [0, 1]."""

    def residual_form(self) -> ResidualForm | None:
        """The path as a curve (for ``--at-fold arclength``), or None for a process defined only
        by its control velocity."""
        return None

    def constraint_value(self, values: Tensor) -> Tensor | None:
        """w·(R, D, C) for values (3,) = (R, D, C); None without a constraint."""
        if self.constraint is None:
            return None
        return torch.tensor(self.constraint, dtype=values.dtype, device=values.device) @ values

    def describe(self) -> dict[str, Any]:
        """Parameters to record in config.json."""
        return {"process": type(self).__name__, "start": self.start.to_dict()}


class ConstraintProcess(Process):
    """Holds w·(R, D, C) constant: w_λλ̇ + w_γγ̇ + w_tṫ = 0 is solved for γ̇ given λ̇ and ṫ,
    where w_s = Σ_X w_X X_s are total derivatives along the surface (eqs. 20, 26, 32).

    Its residual form takes the driven rates at s = 0 as constant over s (true of every built-in
    one); a subclass whose rates vary with s must override :meth:`residual_form`."""

    weights: ClassVar[tuple[float, float, float]] = (0.0, 0.0, 1.0)  # (R, D, C): C by default
    singular_tolerance: ClassVar[float] = 1e-10  # |g_γ| below this × its scale counts as singular

    @property
    def constraint(self) -> tuple[float, float, float]:
        return self.weights

    @abstractmethod
    def driven_rates(self, s: float, controls: Controls) -> tuple[float, float]:
        """(λ̇, ṫ): the rates this process prescribes; γ̇ follows from the constraint."""

    def residual_form(self) -> ResidualForm | None:
        lam_rate, t_rate = self.driven_rates(0.0, self.start)
        return ResidualForm(self.start, (lam_rate, 0.0, t_rate), solves_gamma=True)

    def control_velocity(self, s: float, controls: Controls, sensitivities: Sensitivities) -> Rates:
        lam_dot, t_dot = self.driven_rates(s, controls)
        w = torch.tensor(self.constraint, dtype=sensitivities.matrix.dtype)
        g_lam, g_gamma, g_t = (w @ sensitivities.matrix[:3]).tolist()
        scale = max(abs(g_lam), abs(g_t), 1e-300)
        if abs(g_gamma) <= self.singular_tolerance * scale or g_gamma == 0:
            raise SingularConstraintError(
                f"the constraint derivative along gamma must be non-zero to solve for gamma's rate, got "
                f"{g_gamma:.3e} (against {scale:.3e} along lambda and t) at lambda={controls.lam:.6g}, "
                f"gamma={controls.gamma:.6g}, t={controls.t:.6g}"
            )
        return lam_dot, -(g_lam * lam_dot + g_t * t_dot) / g_gamma, t_dot


# factory(start, **params) -> Process; the CLI's --process
PROCESSES: Registry[Process] = Registry("process")


def register_process(name: str, factory: Callable[..., Process], *, replace: bool = False) -> None:
    """Make ``factory(start, **params)`` available under ``name`` (the CLI's ``--process``); its
    ``parameters`` attribute, when it has one, declares what ``--param`` takes."""
    PROCESSES.register(name, factory, replace=replace)


def available_processes() -> list[str]:
    return PROCESSES.available()


def make_process(name: str, start: Controls, **params: Any) -> Process:
    """The process registered as ``name``, started at ``start``, with its parameters (a name its
    factory does not take raises :class:`InputError` listing those it does)."""
    return PROCESSES.make(name, start, **params)
