"""The quasi-static engine: predictor (an ODE integrator or the secant), corrector, step control,
recording.

The state y = (θ, λ, γ, t) obeys dy/ds = (θ̇, λ̇, γ̇, ṫ) over s ∈ [0, 1], with the control rates
from the process (its constraint solved on the current sensitivities) and θ̇ = θ_λλ̇ + θ_γγ̇ +
θ_tṫ (eqs. 17, 24) from one multi-column Krylov solve with A = ∇²θJ per evaluation, through the
run's :class:`~quasistatic.linalg.LinearSolve` (its preconditioner, warm-started from the last
tangents). After each step the corrector returns to ∇θJ = 0 and to the process constraint.

Tolerance-driven: the run states what every accepted step must hold, ‖∇θJ‖ ≤ ``grad_tol`` and
|g − g₀| ≤ ``drift_tol`` |g₀| for the process constraint g, both on the full training set; the
engine derives its inner tolerances from them (the tangent solves to ``tangent_tol``: 10·grad_tol
within [1e-2, 0.1] when a corrector removes the predictor's error, 0.1·drift_tol without one; the
corrector's Newton forcing from grad_tol). A step whose corrector does not reach both within its
budget, whose corrector moved θ farther than the predictor did and farther than its own tolerance
allows (``max_correction``: past a fold, Newton can converge onto another branch, the silent jump
of the paper's re-equilibration), that
leaves the control domain, or whose tangent solve does not converge is not accepted: it is
retried at h/2 (:mod:`quasistatic.continuation.step_control`).

At every accepted point the smallest eigenvalue λ_min of A is tracked (a few warm-started LOBPCG
iterations on one vector, ``eigen_iterations``: a Ritz value, an upper bound that can follow another
eigenvector than the smallest; wherever λ_min decides something it is refined on a block of
:data:`~quasistatic.continuation.folds.EIGEN_BLOCK` vectors); when the steps collapse where λ_min
was falling towards 0, the fold ahead is located
(:mod:`quasistatic.continuation.folds`) and a :class:`~quasistatic.continuation.folds.FoldError`
names it. Why each tried step was not accepted is logged (DEBUG) and counted in its row.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .arclength import ARCLENGTH_COORDINATES, ArclengthState, PseudoArclength
from .correctors import Correction, Corrector
from ..errors import InputError, bad_value, choice_error
from .folds import AT_FOLD, EIGEN_BLOCK, Fold, FoldError, Jump, StabilityPoint, jump_past, locate_fold
from ..integrators import Integrator
from ..linalg.linear_solve import LinearSolve
from ..thermo.objective import Controls, Objective
from ..processes import Process
from .step_control import StepControl, StepSizeError
from .tangents import equilibrium_tangents

__all__ = [
    "REJECTION_REASONS",
    "ControlDomainError",
    "EngineConfig",
    "EngineState",
    "FoldError",
    "NegativeControlsError",
    "QuasiStaticEngine",
    "StepReport",
    "StepSizeError",
    "first_law_residual",
    "rejection_summary",
]

logger = logging.getLogger(__name__)

# why a tried step was not accepted (StepReport.rejections, the trajectory's rejected_because):
# "domain" (λ or γ < 0), "tangent" (a tangent solve did not converge or was not finite), "corrector"
# (the corrector missed the tolerances within its budget), "branch-hop" (it converged farther from the
# prediction than max_correction allows), "angle" (arclength: the tangent turned too far)
REJECTION_REASONS = ("domain", "tangent", "corrector", "branch-hop", "angle")


def rejection_summary(rejections: tuple[str, ...]) -> str:
    """``rejections`` counted, in the order of :data:`REJECTION_REASONS`: "corrector:3;branch-hop:1"."""
    counts = Counter(rejections)
    return ";".join(f"{reason}:{counts[reason]}" for reason in REJECTION_REASONS if counts[reason])


class ControlDomainError(StepSizeError):
    """A step left the domain of the process (λ or γ below 0, a non-finite tangent, as at a fold
    of the constraint, or a tangent solve that did not converge); fatal only when the step cannot
    shrink (no corrector to judge it)."""


class NegativeControlsError(ControlDomainError):
    """A step (or an integrator stage) reached λ < 0 or γ < 0: a boundary of the controls, not a fold."""


@dataclass(frozen=True)
class EngineConfig:
    """What every accepted step must hold, and the step control's settings."""

    steps: int = 10  # steps over s ∈ [0, 1] at the nominal (largest) step size h = 1/steps
    grad_tol: float = 1e-6  # ‖∇θJ‖ (full data) at every accepted step
    drift_tol: float = 1e-4  # |g − g₀| / |g₀| of the process constraint at every accepted step
    tangent_tol: float | None = None  # relative residual of the tangent solves (None: from the tolerances)
    max_corrector_iterations: int = 6  # a step whose corrector needs more iterations is retried at h/2
    min_step: float = 1e-5  # smallest step before StepSizeError
    max_control_change: float = 0.2  # a step changes λ and γ by at most this × max(|value|, 1)
    max_correction: float = 1.0  # the corrector may move θ at most this × max(predictor's ‖Δθ‖, grad_tol/λ_min)
    # (farther: it may have converged onto another branch past a fold, a silent jump; retried at h/2)
    eigen_iterations: int = 8  # LOBPCG iterations for λ_min(∇²θJ) at every accepted point (0: not tracked)
    at_fold: str = "jump"  # at a located fold: "jump" to another branch (dissipation booked), "stop", or "arclength"
    # (follow the branch through the fold by pseudo-arclength continuation)
    arclength: str = "theta-s-gamma"  # the coordinates whose arclength "arclength" continuation measures:
    # all of u = (θ, s, γ) (Keller's), or the controls (s, log γ) ("s-log-gamma": a transfer's γ, eqs. 26–28)

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise bad_value("steps", "an integer >= 1", self.steps)
        for name in ("grad_tol", "drift_tol"):
            value = getattr(self, name)
            if not value > 0:
                raise bad_value(name.replace("_", "-"), "a number > 0", value)
        if (
            isinstance(self.eigen_iterations, bool)
            or not isinstance(self.eigen_iterations, int)
            or self.eigen_iterations < 0
        ):
            raise bad_value("eigen-iterations", "an integer >= 0", self.eigen_iterations)
        if self.at_fold not in AT_FOLD:
            raise choice_error("at-fold", AT_FOLD, self.at_fold)
        if self.arclength not in ARCLENGTH_COORDINATES:
            raise choice_error("arclength", ARCLENGTH_COORDINATES, self.arclength)
        if self.tangent_tol is not None and not 0 < self.tangent_tol < 1:
            raise bad_value("tangent-tol", "a number in (0, 1)", self.tangent_tol)
        if not self.max_correction > 0:
            raise bad_value("max-correction", "a number > 0", self.max_correction)

    def tangent_tolerance(self, corrected: bool) -> float:
        """The tangent solves' relative residual. With a corrector it only sets how far from the
        surface the prediction lands (its θ error is ~h·rate·tol), which the corrector removes:
        10·grad_tol within [1e-2, 0.1], so that a loose run (grad_tol ≥ 1e-2) often accepts the
        prediction as it is. Without one, 0.1·drift_tol (at most 1e-2)."""
        if self.tangent_tol is not None:
            return self.tangent_tol
        return min(0.1, max(1e-2, 10 * self.grad_tol)) if corrected else min(1e-2, 0.1 * self.drift_tol)


@dataclass
class EngineState:
    """Everything needed to continue a run exactly (saved after every step)."""

    theta: Tensor
    controls: Controls
    s: float = 0.0
    step: int = 0
    h: float = 0.0
    target: float | None = None  # the constraint value g₀ the corrector holds
    previous: tuple[float, Tensor] | None = None  # the accepted (s, y) before this one (the secant predictor)
    stability: tuple[StabilityPoint, ...] = ()  # λ_min(A) at the last (up to 3) accepted points, this one last
    arclength: ArclengthState | None = None  # set once the run continues by pseudo-arclength (past a fold)
    start_grad_norm: float | None = None  # ‖∇θJ‖ at the start: the last step is corrected to at most this


@dataclass(frozen=True)
class StepReport:
    """What one accepted step did."""

    state: EngineState
    correction: Correction
    tangent_cg_iterations: int
    rejections: tuple[str, ...] = ()  # why each try before this one was not accepted (REJECTION_REASONS)
    jump: Jump | None = None  # set when this "step" is a jump past a fold
    fold: Fold | None = None  # set when this step ends on a fold located by arclength continuation

    @property
    def rejected(self) -> int:
        """Tries retried at a smaller step before this one was accepted."""
        return len(self.rejections)


class QuasiStaticEngine:
    """Runs ``process`` on ``objective`` with ``integrator`` (the predictor) and ``corrector``;
    every linear solve goes through ``linear_solve`` (a default one on ``objective`` when None)."""

    def __init__(
        self,
        objective: Objective,
        process: Process,
        integrator: Integrator,
        corrector: Corrector,
        config: EngineConfig = EngineConfig(),
        linear_solve: LinearSolve | None = None,
    ) -> None:
        if process.uses_mixture and not objective.is_mixture:
            raise InputError(
                f"process {type(process).__name__} must run on a source/target mixture, got a single data set"
            )
        if linear_solve is not None and linear_solve.objective is not objective:
            raise InputError("the engine's linear solve must be built on the engine's objective")
        self.objective, self.process, self.integrator, self.corrector = objective, process, integrator, corrector
        self.config = config
        self.linear_solve = linear_solve or LinearSolve(objective)
        self._arclength = (
            None
            if config.at_fold != "arclength"
            else PseudoArclength(
                self.linear_solve,
                process,
                grad_tol=config.grad_tol,
                drift_tol=config.drift_tol,
                max_iter=config.max_corrector_iterations,
                min_step=config.min_step,
                eigen_iterations=config.eigen_iterations,
                coordinates=config.arclength,
            )
        )  # refuses a process without a residual form (and "s-log-gamma" one whose constraint does not fix γ)
        self.control = StepControl(
            1.0 / config.steps, config.min_step, config.max_control_change, config.max_corrector_iterations
        )
        self._tangent_tol = config.tangent_tolerance(corrector.adapts_step)
        self._tangent_cg_iterations = 0  # Krylov iterations of the tangent solves in the current step
        self._start_field: tuple[float, Tensor, Tensor] | None = None  # (s, y, dy/ds) at the step's start
        self._met_negative_curvature = False  # whether the last tangent solve found pᵀAp ≤ 0 (A indefinite)

    @staticmethod
    def pack(theta: Tensor, controls: Controls) -> Tensor:
        tail = torch.tensor([controls.lam, controls.gamma, controls.t], dtype=theta.dtype, device=theta.device)
        return torch.cat([theta, tail])

    @staticmethod
    def unpack(y: Tensor) -> tuple[Tensor, Controls]:
        """(θ, controls) from a state; a state with λ < 0 or γ < 0 raises :class:`ControlDomainError`
        (an integrator stage or step that overshot: the engine retries at a smaller step)."""
        lam, gamma, t = y[-3:].tolist()
        if not (lam >= 0 and gamma >= 0):
            raise NegativeControlsError(f"the process left lambda, gamma >= 0: lambda={lam:.6g}, gamma={gamma:.6g}")
        return y[:-3], Controls(lam, gamma, min(max(t, 0.0), 1.0))

    def field(self, s: float, y: Tensor) -> Tensor:
        """dy/ds: the process's control rates and θ̇ = θ_λλ̇ + θ_γγ̇ + θ_tṫ (eqs. 17, 24). The value
        at the start of a step is kept: the step control reads it, and the integrator's first stage
        asks for it again."""
        if self._start_field is not None and self._start_field[0] == s and torch.equal(self._start_field[1], y):
            return self._start_field[2]
        theta, controls = self.unpack(y)
        tangents = equilibrium_tangents(self.objective, theta, controls, self.linear_solve, tol=self._tangent_tol)
        self._tangent_cg_iterations += tangents.solve.iterations
        self._met_negative_curvature = bool(tangents.solve.negative_curvature.any())
        if not tangents.solve.converged:
            raise ControlDomainError(f"the tangent solve did not converge at s={s:.6g} ({tangents.solve.summary()})")
        rates = self.process.control_velocity(s, controls, tangents.sensitivities())
        velocity = torch.cat([tangents.velocity(*rates), torch.tensor(rates, dtype=theta.dtype, device=theta.device)])
        if not bool(torch.isfinite(velocity).all()):
            raise ControlDomainError(
                f"the tangent is not finite at s={s:.6g}, lambda={controls.lam:.6g}, "
                f"gamma={controls.gamma:.6g}, t={controls.t:.6g} (a fold of the constraint?)"
            )
        return velocity

    def start(self, theta: Tensor, controls: Controls) -> EngineState:
        """The initial state: the constraint target g₀ at the (already polished) starting point."""
        values = self.objective.functionals(theta.detach(), controls.t).detach()
        target = self.process.constraint_value(values)
        state = EngineState(
            theta.detach(),
            controls,
            h=1.0 / self.config.steps,
            target=None if target is None else float(target),
            start_grad_norm=float(torch.linalg.vector_norm(self.objective.gradient(theta.detach(), controls))),
        )
        return self._tracked(state)

    def _grad_tol(self, state: EngineState, h: float) -> float:
        """The ‖∇θJ‖ a step of size h from ``state`` must reach: ``grad_tol``, and for the step that
        ends the path at most the start's ‖∇θJ‖ when that is within [0.1 grad_tol, grad_tol] (a start
        polished to this run's tolerance), so that a run ends at least as close to the surface as it
        started (on digits λ 1 → 2 ended at 7.7e-7 from a start at 6.3e-7 without it). A start
        polished far tighter than the run asks (one shared with tighter runs) holds the last step
        only to grad_tol: chasing it cost the benchmark's loose run (grad_tol 2e-2 from a start at
        6e-7) 466 GE instead of 199. Where the last step cannot reach its tolerance, the same step is
        tried at grad_tol; a jump or an arclength step that lands on s = 1 is held to grad_tol."""
        grad_tol = self.config.grad_tol
        if state.start_grad_norm is None or state.s + h < 1.0 - 1e-12 or state.start_grad_norm < 0.1 * grad_tol:
            return grad_tol
        return min(grad_tol, state.start_grad_norm)

    def _tracked(self, state: EngineState) -> EngineState:
        """``state`` with λ_min(A) at its point appended to its stability history (when tracked)."""
        if not self.config.eigen_iterations:
            return state
        c = state.controls
        point = StabilityPoint(state.s, c.lam, c.gamma, c.t, self._lambda_min(state, self.config.eigen_iterations))
        return replace(state, stability=(*state.stability, point)[-3:])

    def _refined(self, state: EngineState) -> EngineState:
        """``state`` with λ_min at its point recomputed with 10 × ``eigen_iterations`` on the kept
        block of :data:`EIGEN_BLOCK` vectors: where the steps collapse, λ_min changes faster than
        the per-step iterations follow (on digits, 8 per step tracked 1.4e-5 where the converged
        value was 3.7e-6), and a tracked vector can follow another eigenvector than the smallest
        (on digits at λ 1.91675, with one tracked vector: tracked 1.9e-3, one vector with 80
        iterations 1.9e-4, a block of 3 −7.1e-6: the point was a saddle)."""
        if not self.config.eigen_iterations or not state.stability or state.stability[-1].s != state.s:
            return state
        value = self._lambda_min(state, 10 * self.config.eigen_iterations, EIGEN_BLOCK)
        return replace(state, stability=(*state.stability[:-1], replace(state.stability[-1], lambda_min=value)))

    def _resolution(self, state: EngineState) -> float:
        """How far the corrector's tolerance alone lets θ move: grad_tol / λ_min at the last point
        (a residual gradient g displaces θ by up to ‖g‖/λ_min along the softest direction; on digits
        near λ 1.41, λ_min 3.4e-5 gives 0.03, where the steps were 7e-5 long). Infinite when λ_min
        is not tracked or not positive (no branch-hop check there)."""
        last = state.stability[-1].lambda_min if state.stability else math.nan
        return self.config.grad_tol / last if last > 0 else math.inf

    def _lambda_min(self, state: EngineState, iterations: int, count: int = 1) -> float:
        pairs = self.linear_solve.smallest_eigenpairs(state.theta, state.controls, iterations=iterations, count=count)
        return float(pairs.values[0])

    def run(self, state: EngineState, on_step: Callable[[StepReport], None] | None = None) -> EngineState:
        """Integrate from ``state`` to s = 1, calling ``on_step`` after every accepted step (and
        after every jump past a fold, with ``at_fold="jump"``).

        A fold shows in two ways: the steps collapse where λ_min falls to 0 (the path turns in s),
        or a step is accepted on a saddle (λ_min changed sign: the constrained path goes on through
        the point where A is singular, but the minimum the model sat on is gone). ``jump`` jumps
        from the last minimum past either; ``stop`` raises :class:`FoldError` at either;
        ``arclength`` follows the path through both (saddle rows are marked), and switches to
        pseudo-arclength continuation wherever the natural steps collapse."""
        while state.s < 1.0 - 1e-12:
            if state.arclength is not None:
                report = self._continue(state)
            else:
                try:
                    report = self._step(state)
                except StepSizeError as error:
                    if self._arclength is not None and not isinstance(error, NegativeControlsError):
                        report = self._continue(self._arclength.begin(state, self.control.h_max))
                    elif self.config.at_fold == "jump" and isinstance(error, FoldError):
                        report = self._jump(state, error.fold, error.rejections)
                    else:
                        raise
                else:
                    fold = self._crossed(state, report.state)
                    if fold is not None and self.config.at_fold == "stop":
                        raise FoldError(
                            f"{fold.describe()}: the step to s={report.state.s:.8g} ended on a saddle "
                            f"(lambda_min changed sign)",
                            fold,
                            report.rejections,
                        )
                    if fold is not None and self.config.at_fold == "jump":
                        report = self._jump(state, fold, report.rejections, report.state.stability)
            state = report.state
            if on_step is not None:
                on_step(report)
        return state

    @staticmethod
    def _crossed(before: EngineState, after: EngineState) -> Fold | None:
        """The fold between two accepted points where λ_min went from > 0 to ≤ 0 (the zero of the
        line through them), or None."""
        if not (
            before.stability
            and after.stability
            and before.stability[-1].s == before.s
            and after.stability[-1].s == after.s
        ):
            return None
        old, new = before.stability[-1], after.stability[-1]
        if not new.lambda_min <= 0 < old.lambda_min:
            return None
        fold = locate_fold((old, new), after.s)
        return None if fold is None else replace(fold, last_accepted_s=old.s, last_lambda_min=old.lambda_min)

    def _step(self, state: EngineState) -> StepReport:
        """One accepted step from ``state`` (retried at smaller h until accepted), or StepSizeError
        (FoldError when a fold is located ahead)."""
        adapts = self.corrector.adapts_step
        y0 = self.pack(state.theta, state.controls)
        self._start_field = None
        self._tangent_cg_iterations = 0
        try:
            slope = self.integrator.slope(self.field, state.s, y0, state.previous)
        except ControlDomainError as error:
            raise (self._unstable_start(state, error) or error) from error
        if self._met_negative_curvature:
            unstable = self._unstable_start(state, None)
            if unstable is not None:
                raise unstable
        self._start_field = (state.s, y0, slope)
        h = self.control.first(state.h, state.s, state.controls, slope, adapts)
        rejections: list[str] = []
        refined = False  # whether λ_min at ``state`` was refined in this step (by the branch-hop check)
        loosened = False  # whether the path's last step, failing at the start's |grad J|, is tried at grad_tol
        while True:
            outside = False  # the step left λ, γ ≥ 0: a boundary of the controls, not a fold
            try:
                y = self.integrator.predict(self.field, state.s, y0, h, state.previous)
                theta, controls = self.unpack(y)
            except ControlDomainError as error:
                if not adapts:
                    raise
                outside = isinstance(error, NegativeControlsError)
                reason, failure = "domain" if outside else "tangent", str(error)
            else:
                grad_tol = self.config.grad_tol if loosened else self._grad_tol(state, h)
                correction = self.corrector.correct(
                    self.linear_solve,
                    theta,
                    controls,
                    self.process,
                    state.target,
                    grad_tol=grad_tol,
                    drift_tol=self.config.drift_tol,
                    max_iter=self.config.max_corrector_iterations,
                )
                step_length = float(torch.linalg.vector_norm(theta - state.theta))
                moved = float(torch.linalg.vector_norm(correction.theta - theta))
                stride = max(step_length, self._resolution(state))
                if adapts and correction.converged and moved > self.config.max_correction * stride and not refined:
                    # before calling it a branch hop, make sure of λ_min: the tracked value can be an
                    # eigenvalue above the smallest (on digits at λ 1.91334: tracked 1.6e-3, a block
                    # of 3 9.2e-4, converged 2.1e-4), which makes grad_tol/λ_min too small
                    state, refined = self._refined(state), True
                    saddle = self._saddle(state)
                    if saddle is not None:  # the step starts on a saddle: the branch of minima ended before it
                        raise saddle
                    stride = max(step_length, self._resolution(state))
                if not adapts or (correction.converged and moved <= self.config.max_correction * stride):
                    break
                if not correction.converged and grad_tol < self.config.grad_tol:
                    # the path's last step could not reach the start's |grad J|: the same step at grad_tol
                    loosened = True
                    rejections.append("corrector")
                    continue
                reason = "corrector" if not correction.converged else "branch-hop"
                failure = (
                    f"the corrector did not reach the tolerances (|grad J| = {correction.grad_norm:.3e}, "
                    f"|g - g0| = {correction.constraint_error:.3e})"
                    if not correction.converged
                    else f"the corrector moved theta by {moved:.3e} from the prediction, more than "
                    f"{self.config.max_correction:g} x max(the step's |dtheta|, grad_tol / lambda_min) = "
                    f"{stride:.3e} (onto another branch?)"
                )
            rejections.append(reason)
            logger.debug("the step from s=%.8g at h=%.3e was rejected (%s): %s", state.s, h, reason, failure)
            self._tangent_cg_iterations = 0
            try:
                h = self.control.retry(h, state.s, state.controls, failure)
            except StepSizeError as error:
                tried = f"{error} (tries rejected: {rejection_summary(tuple(rejections))})"
                points = state.stability if refined else self._refined(state).stability
                fold = None if outside else locate_fold(points, state.s + h)
                if fold is None:
                    raise StepSizeError(tried) from error
                raise FoldError(f"{fold.describe()}: {tried}", fold, tuple(rejections)) from error
        new = self._tracked(
            EngineState(
                correction.theta.detach(),
                correction.controls,
                s=state.s + h,
                step=state.step + 1,
                h=self.control.next(h, correction.iterations, len(rejections), adapts),
                target=state.target,
                previous=(state.s, y0),
                stability=state.stability,
                start_grad_norm=state.start_grad_norm,
            )
        )
        return StepReport(new, correction, self._tangent_cg_iterations, tuple(rejections))

    def _unstable_start(self, state: EngineState, error: ControlDomainError | None) -> StepSizeError | None:
        """The step from ``state`` cannot start: its tangent solve failed (``error``) or met negative
        curvature (None). λ_min refined at the point decides: ≤ 0 means the path went onto saddles
        unseen (the tracked λ_min had followed another eigenvector: on digits it read 5.6e-4 at a
        point where the tangent solve met negative curvature and did not converge): a
        :class:`FoldError` at the zero of λ_min between the last two points, to be jumped from this
        point at its controls (or stopped at). Otherwise the fold just ahead when λ_min falls to 0
        there, else ``error`` itself (None when there is none: the step goes on)."""
        state = self._refined(state)
        points = state.stability
        if points and points[-1].s == state.s:
            if points[-1].lambda_min <= 0:
                return self._saddle(state)
            elif error is not None:
                fold = locate_fold(points, state.s + state.h)
                if fold is not None:
                    return FoldError(f"{fold.describe()}: {error}", fold)
        return error

    @staticmethod
    def _saddle(state: EngineState) -> FoldError | None:
        """The fold at the zero of λ_min between the last two points when ``state``'s (refined)
        λ_min is ≤ 0, as a :class:`FoldError` to be jumped from this saddle at its controls
        (last_accepted_s = failed_s = s); None otherwise."""
        points = state.stability
        if not (points and points[-1].s == state.s and points[-1].lambda_min <= 0):
            return None
        fold = locate_fold(points, state.s)
        if fold is None:
            return None
        return FoldError(
            f"{fold.describe()}: the point at s={state.s:.8g} is a saddle "
            f"(lambda_min = {points[-1].lambda_min:.3e}): the path went past a fold",
            fold,
        )

    def _continue(self, state: EngineState) -> StepReport:
        """One pseudo-arclength step (:mod:`quasistatic.continuation.arclength`)."""
        if self._arclength is None:
            raise bad_value(
                "engine at_fold", "'arclength' to continue a state on an arclength continuation", self.config.at_fold
            )
        new, correction, tangent_iterations, rejections, fold = self._arclength.step(state)
        return StepReport(new, correction, tangent_iterations, rejections, fold=fold)

    def _jump(
        self,
        state: EngineState,
        fold: Fold,
        rejections: tuple[str, ...] = (),
        points: tuple[StabilityPoint, ...] | None = None,
    ) -> StepReport:
        """The jump past ``fold`` from the last accepted ``state`` (:func:`~quasistatic.continuation.folds.jump_past`),
        as a step: the new branch starts with no previous point and a fresh stability history.
        ``points``: the stability history the controls past the fold are extrapolated through
        (default ``state``'s; a step that ended on a saddle passes its own, which holds ``state``'s
        point and the saddle's: just after a jump ``state``'s alone has one point, on digits an
        IndexError)."""
        landed, jump = jump_past(
            fold,
            state.stability if points is None else points,
            state.theta,
            self.linear_solve,
            self.corrector,
            self.process,
            state.target,
            grad_tol=self.config.grad_tol,
            drift_tol=self.config.drift_tol,
            eigen_iterations=self.config.eigen_iterations,
        )
        new = self._tracked(
            EngineState(
                landed.theta.detach(),
                landed.controls,
                s=jump.s,
                step=state.step + 1,
                h=self.control.h_max,
                target=state.target,
                start_grad_norm=state.start_grad_norm,
            )
        )
        if new.stability and not new.stability[-1].lambda_min > 0:
            raise FoldError(
                f"{fold.describe()}: the jump past it failed: re-imposing the constraint ended on a saddle "
                f"(lambda_min = {new.stability[-1].lambda_min:.3e})",
                fold,
            )
        return StepReport(new, landed, 0, rejections, jump)


def first_law_residual(rows: list[dict[str, float]], sigma: float = 0.0) -> tuple[float, float]:
    """(|ΔR + Σλ ΔD + Σγ ΔC + σΔS − Σ J_t Δt|, |ΔR|) over recorded rows, trapezoidal in λ, γ and t:
    the first law dR = −λ dD − γ dC − σ dS (eq. 7) integrated along the path, with the work of
    moving the data, ∂_tJ dt at fixed θ, when t moves (a transfer on the mixture of eq. 23: then
    dF = D dλ + C dγ + ∂_tJ dt, and F = R + λD + γC + σS gives the term). Rows need R, D, C, lam,
    gamma, when σ > 0 S, and when t moves (a row without t is at t = 0) J_t (without it the residual
    is nan)."""
    total, delta_r = 0.0, 0.0
    for a, b in zip(rows[:-1], rows[1:]):
        d_r = b["R"] - a["R"]
        if b.get("t", 0.0) == a.get("t", 0.0):  # rows without t: on one data set
            moved = 0.0
        elif "J_t" in a and "J_t" in b:
            moved = 0.5 * (a["J_t"] + b["J_t"]) * (b["t"] - a["t"])
        else:
            moved = math.nan
        total += (
            d_r
            + 0.5 * (a["lam"] + b["lam"]) * (b["D"] - a["D"])
            + 0.5 * (a["gamma"] + b["gamma"]) * (b["C"] - a["C"])
            + (sigma * (b["S"] - a["S"]) if sigma else 0.0)
            - moved
        )
        delta_r += d_r
    return abs(total), abs(delta_r)
