"""Folds of the equilibrium surface: where the followed branch of minima ends.

The paper's surface is that of a convex problem, without folds. A real model's branch of minima
θ(λ, γ, t) can end in a saddle-node (fold): A = ∇²θJ becomes singular there, its smallest
eigenvalue λ_min falls to 0, the tangents θ_s = −A⁻¹∂_s∇θJ grow without bound and no corrected
point exists past it, so the engine's steps shrink until they cannot. Near a saddle-node λ_min
vanishes like the square root of the distance to it along the path,

    λ_min(s)² = c (s_f − s) + O((s_f − s)²),

so the last two accepted points give s_f by linear extrapolation of λ_min² (its error is
O((s_f − s₁)²), small because the step control brings the last points close to the fold; the
distance to the extrapolation through the two points before is reported as its uncertainty), and
the controls there by linear extrapolation in s.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .step_control import StepSizeError

__all__ = ["Fold", "FoldError", "StabilityPoint", "locate_fold"]


@dataclass(frozen=True)
class StabilityPoint:
    """λ_min(A) at an accepted point of the path."""

    s: float
    lam: float
    gamma: float
    t: float
    lambda_min: float


@dataclass(frozen=True)
class Fold:
    """A located fold: the extrapolated s_f and controls, and what they came from."""

    s: float
    lam: float
    gamma: float
    t: float
    last_accepted_s: float  # the branch is followed up to here
    last_lambda_min: float  # λ_min(A) there
    failed_s: float  # the end of the last rejected step: beyond the last accepted point, no corrected point was found
    uncertainty: float  # |s_f − the same extrapolation through the two points before|: the error estimate in s

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    def describe(self) -> str:
        return (f"fold of the equilibrium branch located at lambda={self.lam:.8g}, gamma={self.gamma:.8g}, "
                f"t={self.t:.6g} (s={self.s:.8g} +- {self.uncertainty:.1e}; lambda_min of the Hessian "
                f"{self.last_lambda_min:.3e} at the last accepted s={self.last_accepted_s:.8g}, extrapolated to 0)")


class FoldError(StepSizeError):
    """The steps collapsed at a located fold (``fold``)."""

    def __init__(self, message: str, fold: Fold) -> None:
        super().__init__(message)
        self.fold = fold


def locate_fold(points: tuple[StabilityPoint, ...], failed_s: float) -> Fold | None:
    """The fold ahead of the last accepted ``points`` (oldest first) when λ_min falls towards 0
    along the last two, by linear extrapolation of λ_min² in s through them; None when it does not
    (the steps collapsed for another reason). The uncertainty is the distance to the same
    extrapolation through the two points before (nan with only two points)."""
    if len(points) < 2:
        return None
    s_f = _extrapolated(points[-2], points[-1])
    if s_f is None:
        return None
    earlier = _extrapolated(points[-3], points[-2]) if len(points) >= 3 else None
    older, last = points[-2], points[-1]

    def at(value_older: float, value_last: float) -> float:
        return value_last + (value_last - value_older) * (s_f - last.s) / (last.s - older.s)

    return Fold(s=s_f, lam=at(older.lam, last.lam), gamma=at(older.gamma, last.gamma), t=at(older.t, last.t),
                last_accepted_s=last.s, last_lambda_min=last.lambda_min, failed_s=failed_s,
                uncertainty=math.nan if earlier is None else abs(s_f - earlier))


def _extrapolated(older: StabilityPoint, last: StabilityPoint) -> float | None:
    """s where the line through (s, λ_min²) of the two points reaches 0, when λ_min falls along them."""
    if not (0 < last.lambda_min < older.lambda_min and last.s > older.s):
        return None
    slope = (older.lambda_min**2 - last.lambda_min**2) / (last.s - older.s)  # −d(λ_min²)/ds
    s_f = last.s + last.lambda_min**2 / slope
    return s_f if math.isfinite(s_f) else None
