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

Past the fold the model has to jump to another branch (a first-order transition), and across the
jump the first law cannot hold: the difference is dissipated work. :func:`jump_past` makes that
jump on purpose: controls just past the fold, a start nudged off the dead branch along the critical
eigenvector (on the side where J decreases: the gradient flow's way), a relaxation at those fixed
controls to a minimum (the polish: L-BFGS, whitened L-BFGS, Newton), a check that it is one
(λ_min > 0), the free energy it dissipated, ΔJ = J(θ_before) − J(θ_after) ≥ 0 at those controls,
and the process constraint re-imposed by the run's corrector.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
from torch import Tensor

from .correctors import Correction, Corrector
from ..linalg.linear_solve import LinearSolve
from ..thermo.objective import Controls
from .polish import polish
from ..processes import Process
from .step_control import StepSizeError
from .tangents import equilibrium_tangents

__all__ = ["AT_FOLD", "EIGEN_BLOCK", "Fold", "FoldError", "Jump", "StabilityPoint", "jump_past", "locate_fold"]

AT_FOLD = ("jump", "stop", "arclength")  # what the engine does at a located fold
EIGEN_BLOCK = 3  # eigenvectors in the LOBPCG block where λ_min decides (a collapse, a branch-hop check, a
# relaxation's end): the one tracked vector can follow another eigenvector than the smallest (tracking
# on this block would triple the detection's products, 9.0 % of a path's GE on digits with one vector)


@dataclass(frozen=True)
class StabilityPoint:
    """λ_min(A) at an accepted point of the path."""

    s: float
    lam: float
    gamma: float
    t: float
    lambda_min: float
    negative: int | None = None  # negative Ritz values among the few computed (arclength): a lower bound of A's count


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
        return (
            f"fold of the equilibrium branch located at lambda={self.lam:.8g}, gamma={self.gamma:.8g}, "
            f"t={self.t:.6g} (s={self.s:.8g} +- {self.uncertainty:.1e}; lambda_min of the Hessian "
            f"{self.last_lambda_min:.3e} at the last accepted s={self.last_accepted_s:.8g}, extrapolated to 0)"
        )


@dataclass(frozen=True)
class Jump:
    """A jump past a fold: where from, where to, and the free energy it dissipated."""

    fold: Fold
    s: float  # the jump lands at this s, just past the fold
    distance: float  # ‖θ_after − θ_before‖
    dissipation: float  # J(θ_before) − J(θ_relaxed) at the controls just past the fold (≥ 0)
    lambda_min: float  # smallest Hessian eigenvalue where the relaxation ended (> 0: a minimum)

    def to_dict(self) -> dict:
        return asdict(self)


class FoldError(StepSizeError):
    """The steps collapsed at a located fold (``fold``) after the tries ``rejections`` (why each
    was not accepted)."""

    def __init__(self, message: str, fold: Fold, rejections: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.fold, self.rejections = fold, rejections


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
    uncertainty = math.nan if earlier is None else abs(s_f - earlier)
    last = points[-1]
    # the fold must be where the steps collapsed: an extrapolated zero far ahead of the collapse
    # (λ_min barely falling, or noise) does not explain it
    reach = max(10 * (failed_s - last.s), 2 * uncertainty if math.isfinite(uncertainty) else 0.0)
    if s_f - last.s > reach:
        return None
    controls = _controls_at(points, s_f)
    return Fold(
        s=s_f,
        lam=controls.lam,
        gamma=controls.gamma,
        t=controls.t,
        last_accepted_s=last.s,
        last_lambda_min=last.lambda_min,
        failed_s=failed_s,
        uncertainty=uncertainty,
    )


def _extrapolated(older: StabilityPoint, last: StabilityPoint) -> float | None:
    """s where the line through (s, λ_min²) of the two points reaches 0, when λ_min falls along them;
    where λ_min changed sign between them (the last point is already unstable: the corrector
    followed the branch past a fold or a bifurcation), the zero of the line through (s, λ_min)."""
    if last.lambda_min <= 0 < older.lambda_min and last.s > older.s:
        return older.s + older.lambda_min * (last.s - older.s) / (older.lambda_min - last.lambda_min)
    if not (0 < last.lambda_min < older.lambda_min and last.s > older.s):
        return None
    slope = (older.lambda_min**2 - last.lambda_min**2) / (last.s - older.s)  # −d(λ_min²)/ds
    s_f = last.s + last.lambda_min**2 / slope
    return s_f if math.isfinite(s_f) else None


def _controls_at(points: tuple[StabilityPoint, ...], s: float) -> Controls:
    """The controls at s by linear extrapolation through the last two points (λ, γ ≥ 0, t in [0, 1])."""
    older, last = points[-2], points[-1]
    share = (s - last.s) / (last.s - older.s)
    lam, gamma, t = (
        b + (b - a) * share for a, b in ((older.lam, last.lam), (older.gamma, last.gamma), (older.t, last.t))
    )
    return Controls(max(lam, 0.0), max(gamma, 0.0), min(max(t, 0.0), 1.0))


def jump_past(
    fold: Fold,
    points: tuple[StabilityPoint, ...],
    theta: Tensor,
    linear_solve: LinearSolve,
    corrector: Corrector,
    process: Process,
    target: float | None,
    *,
    grad_tol: float,
    drift_tol: float,
    eigen_iterations: int,
) -> tuple[Correction, Jump]:
    """Jump from θ, the last accepted point before ``fold`` (``points``: its stability history),
    to a minimum on another branch just past the fold, with the process constraint re-imposed
    (see the module docstring); (where it landed, with the relaxation's and the corrector's
    iterations, and what the jump did). A relaxation that does not reach
    ``grad_tol``, ends on a saddle, returns to the branch it left (within grad_tol/λ_min of θ),
    raises J, or whose constraint cannot be re-imposed raises :class:`FoldError`."""
    objective = linear_solve.objective
    # just past the fold, and no farther past the collapse of the steps than the collapse is from
    # the last accepted point (an extrapolated fold far ahead of it is not trusted)
    s_past = min(max(fold.failed_s, 2 * fold.s - fold.last_accepted_s), 2 * fold.failed_s - fold.last_accepted_s, 1.0)
    controls = _controls_at(points, s_past)
    critical = linear_solve.last("eigenvector")
    start = theta.detach()
    if critical is not None:
        direction = critical[:, 0]
        downhill = -1.0 if float(objective.gradient(start, controls) @ direction) > 0 else 1.0
        start = start + downhill * 1e-2 * max(1.0, float(torch.linalg.vector_norm(start))) * direction

    def refuse(why: str) -> FoldError:
        return FoldError(f"{fold.describe()}: the jump past it failed: {why}", fold)

    relaxed = polish(linear_solve, start, controls, grad_tol=grad_tol)
    if not relaxed.converged:
        raise refuse(f"the relaxation at fixed controls reached |grad J| = {relaxed.grad_norm:.3e} > {grad_tol:g}")
    lambda_min = float(
        linear_solve.smallest_eigenpairs(
            relaxed.theta,
            controls,
            count=EIGEN_BLOCK,
            iterations=10 * max(eigen_iterations, 1),
        ).values[0]
    )
    if not lambda_min > 0:
        raise refuse(f"the relaxation ended on a saddle (lambda_min = {lambda_min:.3e})")
    moved = float(torch.linalg.vector_norm(relaxed.theta - theta))
    if moved <= grad_tol / lambda_min:  # within what the tolerance alone lets θ move: the same minimum
        raise refuse(
            f"the relaxation returned to the branch it left (|dtheta| = {moved:.3e} <= grad_tol / "
            f"lambda_min = {grad_tol / lambda_min:.3e}): the steps did not collapse at a fold"
        )
    with torch.no_grad():
        before, after = float(objective.value(theta, controls)), float(objective.value(relaxed.theta, controls))
    dissipation = before - after
    if dissipation < -1e-12 * max(abs(before), 1.0):
        raise refuse(f"J rose by {-dissipation:.3e} in a relaxation")
    landed = Correction(relaxed.theta, controls, relaxed.iterations, 0, relaxed.grad_norm, 0.0, True)
    if process.constraint is not None and target is not None:
        # the new branch's tangents, kept by the linear solve: the corrector's border (q = −θ_γ) on this branch
        linear_solve.forget("tangent", "newton")
        if not equilibrium_tangents(objective, relaxed.theta, controls, linear_solve, tol=1e-2).solve.converged:
            raise refuse("the tangent solve on the new branch did not converge")
        correction = corrector.correct(
            linear_solve, relaxed.theta, controls, process, target, grad_tol=grad_tol, drift_tol=drift_tol
        )
        for _ in range(2):  # where Newton stalls (near the new branch's own fold: on digits at lambda
            # 1.60312, |grad J| 1.5e-5 and |g - g0| 1.3e-5 after two tries), relax at the controls it
            # reached and correct again from that minimum (fresh damping and stall count)
            if correction.converged:
                break
            settled = polish(linear_solve, correction.theta, correction.controls, grad_tol=grad_tol)
            again = corrector.correct(
                linear_solve,
                settled.theta,
                correction.controls,
                process,
                target,
                grad_tol=grad_tol,
                drift_tol=drift_tol,
            )
            correction = replace(
                again,
                iterations=correction.iterations + settled.iterations + again.iterations,
                cg_iterations=correction.cg_iterations + again.cg_iterations,
            )
        if not correction.converged:
            raise refuse(
                f"the constraint could not be re-imposed on the new branch (|grad J| = "
                f"{correction.grad_norm:.3e}, |g - g0| = {correction.constraint_error:.3e})"
            )
        landed = replace(correction, iterations=relaxed.iterations + correction.iterations)
    distance = float(torch.linalg.vector_norm(landed.theta - theta))
    return landed, Jump(fold, s_past, distance, dissipation, lambda_min)
