"""Correctors: after each predictor step, return to the equilibrium surface (and the constraint).

- ``none``: pure ODE integration; the drift is left as it is.
- ``newton``: damped Newton–Krylov on the bordered system in (θ, γ) (numerical continuation):

      [ A     ∇θC ] [δθ]     [ ∇θJ      ]
      [ ∇θgᵀ  0   ] [δγ] = − [ g − g₀   ]     A = ∇²θJ, g = w·(R, D, C) the process constraint,

  solved by block elimination, δγ = (g − g₀ − ∇gᵀp) / ∇gᵀq, δθ = −p − q δγ, with p = (A + μI)⁻¹∇θJ
  from a Krylov solve through the run's :class:`~quasistatic.linalg.LinearSolve` (its
  preconditioner) to a relative residual min(0.1, max(η, ½ grad_tol / ‖∇θJ‖)) (the forcing): with
  ``forcing="adaptive"`` (the default) Eisenstat & Walker's choice 2, η = 0.9 (‖∇θJ‖ /
  ‖∇θJ‖_previous)², tight only while Newton converges fast; with ``forcing="quadratic"`` η =
  ‖∇θJ‖, which over-solves where the nonlinearity, not the solve, limits the iteration. The solves
  are truncated (``LinearSolve.solve(truncate=True)``): one that meets negative curvature returns at
  once and raises the damping (no MINRES fallback: near a fold of the (64, 64) model MINRES ran
  10⁵ iterations for a step that was then discarded), one that stops at the iteration cap is a
  step like any other, judged by the line search. The border
  column q = A⁻¹∇θC is, with ``border="tangent"`` (the default), −θ_γ of the run's last tangent
  solve (eq. 18, at the start of the step): a chord on the one-dimensional border, which halves the
  Krylov work of an iteration and leaves the convergence test, on the full residual, unchanged
  (the error (∇θC − Aq)δγ it leaves in the first row shrinks with δγ); ``border="solve"`` solves
  for q beside p in every iteration (exact bordered Newton). A backtracking line search on the residual
  ‖(∇θJ, g − g₀)‖ (on J itself for an unconstrained process, so that it descends to a minimum,
  not a saddle) accepts the step; a rejected step or negative curvature in the solve raises the
  damping μ (Levenberg–Marquardt, up to ``max_damping``), a full step lowers it, and with
  ``damp_cut_steps`` (the default) a step the line search had to cut raises it too, at most to
  ``max_damping`` (the quadratic model overreached: the next step trusts it less, as a trust
  region would). A plain Newton step
  with small damping diverges here because A is indefinite away from the surface. The corrector
  gives up (not converged) when no damping up to ``max_damping`` gives an accepted step, when the
  residual fails twice in a row to shrink by ``contraction``, or (``early_rejection``, the
  default) when, from the second iteration on, the last contraction of ‖∇θJ‖, continued over the
  iterations left, cannot bring it within 10 × grad_tol (:func:`predicted_to_fail`): the predicted
  point is outside Newton's basin, and the engine's answer is a smaller step, not more iterations.
- ``equilibrate``: the paper's relaxation, Adam with the η(s) schedule (Sec. 5.1).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from .equilibrate import EquilibrationConfig, equilibrate
from ..errors import bad_value, choice_error
from ..linalg.linear_solve import LinearSolve
from ..thermo.objective import Controls, Objective
from ..processes import Process
from ..registry import Registry

__all__ = [
    "Correction",
    "Corrector",
    "NoCorrector",
    "NewtonCorrector",
    "EquilibrateCorrector",
    "CORRECTORS",
    "register_corrector",
    "available_correctors",
    "make_corrector",
    "BORDERS",
    "predicted_to_fail",
]

PREDICTION_MARGIN = 10.0  # early rejection: how far above grad_tol the extrapolated ‖∇θJ‖ may end

BORDERS = ("tangent", "solve")  # where the Newton corrector's border column q = A⁻¹∇θC comes from
FORCINGS = ("quadratic", "adaptive")  # how tight the Newton corrector's Krylov solves are (NewtonCorrector)


@dataclass(frozen=True)
class Correction:
    """The corrected point and what it took."""

    theta: Tensor
    controls: Controls
    iterations: int  # Newton iterations (or epochs for equilibrate)
    cg_iterations: int  # Krylov iterations summed over the solves
    grad_norm: float  # ‖∇θJ‖ at the returned point
    constraint_error: float  # |g − g₀| at the returned point (0 without a constraint)
    converged: bool


class Corrector(ABC):
    """Maps a predicted point (θ, controls) back to the surface at the same λ and t."""

    adapts_step: bool = True  # False: the engine keeps the step size fixed (no effort to judge)

    @abstractmethod
    def correct(
        self,
        linear_solve: LinearSolve,
        theta: Tensor,
        controls: Controls,
        process: Process | None,
        target: float | None,
        grad_tol: float | None = None,
        drift_tol: float | None = None,
        max_iter: int | None = None,
    ) -> Correction:
        """Correct θ (and γ, for a constrained process, towards g = ``target``) on
        ``linear_solve.objective``, solving through ``linear_solve``. For this call ``grad_tol``
        (‖∇θJ‖) and ``drift_tol`` (|g − g₀| / |g₀|) replace the corrector's own tolerances (the
        engine's, from the run's settings) and ``max_iter`` lowers its iteration budget (the engine
        retries a step that needs more)."""


class NoCorrector(Corrector):
    """Pure ODE integration: the point is returned unchanged."""

    adapts_step = False

    def correct(
        self,
        linear_solve: LinearSolve,
        theta: Tensor,
        controls: Controls,
        process: Process | None,
        target: float | None,
        grad_tol: float | None = None,
        drift_tol: float | None = None,
        max_iter: int | None = None,
    ) -> Correction:
        return Correction(theta, controls, 0, 0, math.nan, math.nan, True)


class NewtonCorrector(Corrector):
    """Damped Newton–Krylov on the bordered system (see the module docstring)."""

    def __init__(
        self,
        grad_tol: float = 1e-6,
        drift_tol: float = 1e-9,
        max_iter: int = 20,
        initial_damping: float = 1e-4,
        max_damping: float = 1.0,
        contraction: float = 0.9,
        border: str = "tangent",
        forcing: str = "adaptive",
        damp_cut_steps: bool = True,
        early_rejection: bool = True,
    ) -> None:
        if border not in BORDERS:
            raise choice_error("corrector border", BORDERS, border)
        if forcing not in FORCINGS:
            raise choice_error("corrector forcing", FORCINGS, forcing)
        if not grad_tol > 0:
            raise bad_value("corrector grad_tol", "a number > 0", grad_tol)
        if not drift_tol > 0:
            raise bad_value("corrector drift_tol", "a number > 0", drift_tol)
        if max_iter < 1:
            raise bad_value("corrector max_iter", "an integer >= 1", max_iter)
        self.grad_tol, self.drift_tol, self.max_iter = grad_tol, drift_tol, max_iter
        self.initial_damping, self.max_damping, self.contraction = initial_damping, max_damping, contraction
        self.border, self.forcing, self.damp_cut_steps = border, forcing, damp_cut_steps
        self.early_rejection = early_rejection

    def _residual(
        self, objective: Objective, theta: Tensor, controls: Controls, weights: Tensor | None, target: float | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Values (J, C[, g]) and their gradients under p(x, t); rows: J, C, then g if constrained."""
        rows = [controls.weights(theta), torch.tensor([0.0, 0.0, 1.0], dtype=theta.dtype, device=theta.device)]
        if weights is not None:
            rows.append(weights)
        entropy = torch.zeros(len(rows), dtype=theta.dtype, device=theta.device)
        entropy[0] = 1.0  # J carries σS; C and g do not
        values, gradients = objective.combination_gradients(theta, torch.stack(rows), controls.t, entropy)
        return values, gradients, torch.linalg.vector_norm(gradients[0])

    def correct(
        self,
        linear_solve: LinearSolve,
        theta: Tensor,
        controls: Controls,
        process: Process | None,
        target: float | None,
        grad_tol: float | None = None,
        drift_tol: float | None = None,
        max_iter: int | None = None,
    ) -> Correction:
        objective = linear_solve.objective
        grad_tol = self.grad_tol if grad_tol is None else grad_tol
        drift_tol = self.drift_tol if drift_tol is None else drift_tol
        max_iter = self.max_iter if max_iter is None else min(max_iter, self.max_iter)
        constraint = None if process is None or target is None else process.constraint
        constrained = constraint is not None
        goal = 0.0 if target is None else target  # g₀, read only when constrained
        allowed = drift_tol * abs(goal) if constrained and goal else drift_tol
        weights = torch.tensor(constraint, dtype=theta.dtype, device=theta.device) if constraint is not None else None
        values, gradients, grad_norm = self._residual(objective, theta, controls, weights, target)
        damping, cg_total, stalls, iteration = 0.0, 0, 0, 0
        residual, previous_norm = math.inf, None
        while True:
            violation = float(values[2] - goal) if constrained else 0.0
            if float(grad_norm) <= grad_tol and abs(violation) <= allowed:
                return Correction(theta, controls, iteration, cg_total, float(grad_norm), abs(violation), True)
            # a residual that no longer contracts (twice) means the start is outside Newton's basin:
            # give up early, so that the engine retries with a smaller step
            previous, residual = residual, math.hypot(float(grad_norm), violation)
            stalls = stalls + 1 if residual > self.contraction * previous else 0
            if iteration == max_iter or stalls == 2:
                break
            # from the second iteration on: the first contraction is not representative (on the digits
            # default a correction went 1.77e-3 -> 9.35e-4 -> 7.8e-5 -> 1.1e-6 -> 8.4e-8)
            if (
                self.early_rejection
                and iteration >= 2
                and predicted_to_fail(float(grad_norm), previous_norm, max_iter - iteration, grad_tol)
            ):
                break
            iteration += 1
            forcing = self._forcing(float(grad_norm), previous_norm, grad_tol)
            previous_norm = float(grad_norm)
            accepted = None
            while accepted is None and damping <= self.max_damping:  # raise the damping until a step is accepted
                d_theta, d_gamma, iterations, negative = self._newton_step(
                    linear_solve,
                    theta,
                    controls,
                    gradients,
                    violation,
                    constrained,
                    damping,
                    forcing,
                )
                cg_total += iterations
                if not negative:
                    accepted = self._line_search(
                        objective,
                        theta,
                        controls,
                        d_theta,
                        d_gamma,
                        values,
                        gradients,
                        grad_norm,
                        violation,
                        weights,
                        goal,
                        constrained,
                    )
                if accepted is None:
                    damping = max(10 * damping, self.initial_damping)
            if accepted is None:
                break
            theta, controls, values, gradients, grad_norm, full_step = accepted
            if full_step:
                damping /= 10
            elif self.damp_cut_steps:  # a cut step: the quadratic model overreached, trust it less
                damping = min(max(10 * damping, self.initial_damping), self.max_damping)
        violation = float(values[2] - goal) if constrained else 0.0
        return Correction(theta, controls, iteration, cg_total, float(grad_norm), abs(violation), False)

    def _newton_step(
        self,
        linear_solve: LinearSolve,
        theta: Tensor,
        controls: Controls,
        gradients: Tensor,
        violation: float,
        constrained: bool,
        damping: float,
        tol: float,
    ) -> tuple[Tensor, float, int, bool]:
        """(δθ, δγ, Krylov iterations, negative curvature met) from (A + μI)p = ∇J, solved to
        relative residual ``tol``, and the border column q = A⁻¹∇C (solved beside p, or −θ_γ of the
        last tangent solve)."""
        tangents = linear_solve.last("tangent") if self.border == "tangent" and constrained else None
        chord = tangents is not None and tangents.shape[0] == gradients.shape[1]
        rhs = gradients[:2].T if constrained and not chord else gradients[:1].T  # (N, 2) or (N, 1)
        result = linear_solve.solve(
            theta, controls, rhs.contiguous(), tol=tol, kind="newton", damping=damping, truncate=True
        )
        negative = bool(result.negative_curvature.any())
        p = result.solution[:, 0]
        if not constrained:
            return -p, 0.0, result.iterations, negative
        q = -tangents[:, 1] if chord and tangents is not None else result.solution[:, 1]
        grad_g = gradients[2]
        denominator = float(grad_g @ q)
        if denominator == 0:
            return -p, 0.0, result.iterations, True
        delta_gamma = (violation - float(grad_g @ p)) / denominator
        return -p - q * delta_gamma, delta_gamma, result.iterations, negative

    def _forcing(self, grad_norm: float, previous_norm: float | None, grad_tol: float) -> float:
        """The relative residual of this iteration's Krylov solve (of the damped A + μI),
        min(0.1, max(η, ½ grad_tol / ‖∇θJ‖)): no tighter than what lands the linear model's
        residual below grad_tol, never looser than 0.1. ``quadratic``: η = ‖∇θJ‖, which keeps Newton
        quadratic where it converges quadratically. ``adaptive``: Eisenstat & Walker's choice 2
        (SIAM J. Sci. Comput. 17(1), 1996), η = 0.9 (‖∇θJ‖ / ‖∇θJ‖_previous)² (0.1 at the first
        iteration), on the gradient part of the bordered residual (the part the Krylov solve
        reduces): tight only while Newton converges fast, loose while the nonlinearity limits it
        (their safeguard against a fast fall of η only acts above η = 0.1, the cap here)."""
        if self.forcing == "quadratic":
            eta = grad_norm
        else:
            eta = 0.1 if previous_norm is None else 0.9 * (grad_norm / previous_norm) ** 2
        return min(0.1, max(eta, 0.5 * grad_tol / grad_norm, 1e-12))

    def _line_search(
        self,
        objective: Objective,
        theta: Tensor,
        controls: Controls,
        d_theta: Tensor,
        d_gamma: float,
        values: Tensor,
        gradients: Tensor,
        grad_norm: Tensor,
        violation: float,
        weights: Tensor | None,
        target: float,
        constrained: bool,
    ) -> tuple | None:
        """Backtracking, α = 1, ½, …, 1/16, with a sufficient-decrease test.

        Constrained: on the residual ½‖(∇θJ, g − g₀)‖², whose slope along an exact Newton step is
        −‖·‖² (half of it is asked for, the solve being inexact). Unconstrained: Armijo on J (so
        the iteration descends to a minimum, not a saddle), or — near the surface, where J's
        decrease ~‖∇θJ‖² is lost in rounding — a decrease of ‖∇θJ‖ with J not rising."""
        residual = 0.5 * (float(grad_norm) ** 2 + violation**2)
        slope = float(gradients[0] @ d_theta)  # dJ/dα at fixed γ
        if not constrained and slope >= 0:
            return None
        j = float(values[0])
        for halvings in range(5):
            alpha = 0.5**halvings
            gamma = controls.gamma + alpha * d_gamma
            if gamma < 0:
                continue
            trial_controls = replace(controls, gamma=gamma)
            trial = theta + alpha * d_theta
            trial_values, trial_gradients, trial_norm = self._residual(
                objective, trial, trial_controls, weights, target
            )
            trial_violation = float(trial_values[2] - target) if constrained else 0.0
            trial_j = float(trial_values[0])
            if not math.isfinite(trial_j) or not math.isfinite(float(trial_norm)):
                continue
            if constrained:
                ok = 0.5 * (float(trial_norm) ** 2 + trial_violation**2) <= (1 - 0.5 * alpha) * residual
            else:
                ok = trial_j <= j + 1e-4 * alpha * slope or (
                    float(trial_norm) <= (1 - 1e-4 * alpha) * float(grad_norm) and trial_j <= j + 1e-12 * abs(j)
                )
            if ok:
                return trial, trial_controls, trial_values, trial_gradients, trial_norm, halvings == 0
        return None


def predicted_to_fail(grad_norm: float, previous_norm: float | None, remaining: int, grad_tol: float) -> bool:
    """Whether a Newton correction at ‖∇θJ‖ = ``grad_norm`` after ``previous_norm`` cannot reach
    ``grad_tol`` in the ``remaining`` iterations if it keeps its last contraction θ = grad_norm /
    previous_norm: grad_norm θ^remaining > PREDICTION_MARGIN · grad_tol (a prediction on the
    residual, after the contraction monitors of Deuflhard's Newton codes, Newton Methods for
    Nonlinear Problems, 2004, which watch the Newton corrections instead: stop a correction that
    will fail, and let the step control retry with a smaller step). Newton accelerates as it
    converges, so the prediction is pessimistic; the margin allows for that. Measured on the logged
    corrections of four (64, 64) digits runs (72 corrections), applied from the second iteration
    on: the rule stops the failing ones after 2–3 iterations instead of 6, saving 18,132 of the
    56,000 GE they cost, and stops 2 that would have converged at their 6th iteration. False
    without a previous norm or when the gradient did not shrink (the stall rule judges that)."""
    if previous_norm is None or not grad_norm < previous_norm:
        return False
    return grad_norm * (grad_norm / previous_norm) ** remaining > PREDICTION_MARGIN * grad_tol


class EquilibrateCorrector(Corrector):
    """The paper's relaxation: Adam on J at the new controls with the η(s) schedule (Sec. 5.1).

    It does not restore a constraint: the iso-classification constraint is held only as well as
    the finite-difference process rates hold it, as in the paper."""

    adapts_step = False

    def __init__(self, epochs: int = 10, batch_size: int = 32, eta_max: float = 1.5e-3, seed: int = 0) -> None:
        self.config = EquilibrationConfig(
            epochs=epochs, batch_size=batch_size, schedule="equilibration", eta_max=eta_max
        )
        self.seed = seed
        self.calls = 0

    def correct(
        self,
        linear_solve: LinearSolve,
        theta: Tensor,
        controls: Controls,
        process: Process | None,
        target: float | None,
        grad_tol: float | None = None,
        drift_tol: float | None = None,
        max_iter: int | None = None,
    ) -> Correction:
        objective = linear_solve.objective
        objective.layout.write(objective.model, theta)
        self.calls += 1
        theta = equilibrate(objective, controls, self.config, seed=self.seed + self.calls, progress=False)
        grad_norm = float(torch.linalg.vector_norm(objective.gradient(theta, controls)))
        return Correction(theta, controls, self.config.epochs, 0, grad_norm, math.nan, True)


CORRECTORS: Registry[Corrector] = Registry("corrector")
CORRECTORS.register("none", NoCorrector)
CORRECTORS.register("newton", NewtonCorrector)
CORRECTORS.register("equilibrate", EquilibrateCorrector)


def register_corrector(name: str, factory: Callable[..., Corrector], *, replace: bool = False) -> None:
    """Make ``factory(**options)`` available under ``name`` (the CLI's ``--corrector``, its options
    ``--corrector-option NAME=VALUE``)."""
    CORRECTORS.register(name, factory, replace=replace)


def available_correctors() -> list[str]:
    return CORRECTORS.available()


def make_corrector(name: str, **options: Any) -> Corrector:
    """The corrector registered as ``name``; an option it does not take raises :class:`InputError`
    listing those it does."""
    return CORRECTORS.make(name, **options)
