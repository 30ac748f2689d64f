"""The quasi-static engine: predictor (an ODE integrator), corrector, step control, recording.

The state y = (θ, λ, γ, t) obeys dy/ds = (θ̇, λ̇, γ̇, ṫ) over s ∈ [0, 1], with the control rates
from the process (its constraint solved on the current sensitivities) and θ̇ = θ_λλ̇ + θ_γγ̇ +
θ_tṫ (eqs. 17, 24) from one three-column Krylov solve with A = ∇²θJ per evaluation (warm-started
from the previous one). After each step the corrector returns to ∇θJ = 0 and to the process
constraint. Step control, as in numerical continuation: a step is capped before it is tried so
that λ and γ change by at most a fraction of their size; it is retried at h/2 when the corrector
does not converge within its budget or the step leaves λ, γ ≥ 0; it grows back after an easy
correction. The last step is corrected at least as tightly as the start was polished.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .correctors import Correction, Corrector
from .errors import InputError, bad_value
from .integrators import Integrator
from .objective import Controls, Objective
from .processes import Process
from .tangents import equilibrium_tangents

__all__ = ["ControlDomainError", "EngineConfig", "EngineState", "QuasiStaticEngine", "StepReport", "StepSizeError",
           "first_law_residual"]


class StepSizeError(RuntimeError):
    """The step had to shrink below ``EngineConfig.min_step``: the process cannot be followed."""


class ControlDomainError(StepSizeError):
    """A step left the domain of the process (λ or γ below 0, or a non-finite tangent, as at a fold
    of the constraint); fatal only when the step cannot shrink (no corrector to judge it)."""


@dataclass(frozen=True)
class EngineConfig:
    """Settings of the predictor and the step control."""

    steps: int = 10  # steps over s ∈ [0, 1] at the nominal (largest) step size h = 1/steps
    solver: str = "cg"  # linear solver of the tangent systems (solvers.available_solvers())
    solver_tol: float = 1e-8  # relative residual of the tangent solves
    max_solver_iter: int | None = None  # Krylov iteration cap per solve (None: the solver's default)
    operator: str = "hessian"  # "hessian" (exact A) or "ggn"
    damping: float = 0.0  # μ in (A + μI) for the tangent solves
    max_corrector_iterations: int = 6  # a step whose corrector needs more iterations is retried at h/2
    min_step: float = 1e-5  # smallest step before StepSizeError
    max_control_change: float = 0.2  # a step changes λ and γ by at most this × max(|value|, 1)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise bad_value("steps", "an integer >= 1", self.steps)


@dataclass
class EngineState:
    """Everything needed to continue a run exactly (saved after every step)."""

    theta: Tensor
    controls: Controls
    s: float = 0.0
    step: int = 0
    h: float = 0.0
    target: float | None = None  # the constraint value g₀ the corrector holds
    warm_start: Tensor | None = None  # the last tangent solution (N, 3)
    start_grad_norm: float | None = None  # ‖∇θJ‖ at s = 0: the last step's correction ends at least as close


@dataclass(frozen=True)
class StepReport:
    """What one accepted step did."""

    state: EngineState
    correction: Correction
    tangent_cg_iterations: int
    rejected: int  # steps retried at a smaller h before this one was accepted


class QuasiStaticEngine:
    """Runs ``process`` on ``objective`` with ``integrator`` and ``corrector``."""

    def __init__(self, objective: Objective, process: Process, integrator: Integrator, corrector: Corrector,
                 config: EngineConfig = EngineConfig()) -> None:
        if process.uses_mixture and not objective.is_mixture:
            raise InputError(f"process {type(process).__name__} must run on a source/target mixture, "
                             "got a single data set")
        self.objective, self.process, self.integrator, self.corrector = objective, process, integrator, corrector
        self.config = config
        self._warm: Tensor | None = None
        self._tangent_cg_iterations = 0  # Krylov iterations of the tangent solves in the current step
        self._start_field: tuple[float, Tensor, Tensor] | None = None  # (s, y, dy/ds) at the step's start

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
            raise ControlDomainError(f"the process left lambda, gamma >= 0: lambda={lam:.6g}, gamma={gamma:.6g}")
        return y[:-3], Controls(lam, gamma, min(max(t, 0.0), 1.0))

    def field(self, s: float, y: Tensor) -> Tensor:
        """dy/ds: the process's control rates and θ̇ = θ_λλ̇ + θ_γγ̇ + θ_tṫ (eqs. 17, 24). The value
        at the start of a step is kept: the step control reads it, and the integrator's first stage
        asks for it again."""
        if self._start_field is not None and self._start_field[0] == s and torch.equal(self._start_field[1], y):
            return self._start_field[2]
        theta, controls = self.unpack(y)
        tangents = equilibrium_tangents(self.objective, theta, controls, method=self.config.solver,
                                        tol=self.config.solver_tol, max_iter=self.config.max_solver_iter,
                                        operator=self.config.operator, damping=self.config.damping,
                                        x0=self._warm)
        self._tangent_cg_iterations += tangents.solve.iterations
        rates = self.process.control_velocity(s, controls, tangents.sensitivities())
        velocity = torch.cat([tangents.velocity(*rates), torch.tensor(rates, dtype=theta.dtype, device=theta.device)])
        if not bool(torch.isfinite(velocity).all()):
            raise ControlDomainError(f"the tangent is not finite at s={s:.6g}, lambda={controls.lam:.6g}, "
                                     f"gamma={controls.gamma:.6g}, t={controls.t:.6g} (a fold of the constraint?)")
        self._warm = tangents.directions
        return velocity

    def start(self, theta: Tensor, controls: Controls) -> EngineState:
        """The initial state: the constraint target g₀ at the (already polished) starting point."""
        values = self.objective.functionals(theta.detach(), controls.t).detach()
        target = self.process.constraint_value(values)
        grad_norm = float(torch.linalg.vector_norm(self.objective.gradient(theta.detach(), controls)))
        return EngineState(theta.detach(), controls, h=1.0 / self.config.steps,
                           target=None if target is None else float(target), start_grad_norm=grad_norm)

    def run(self, state: EngineState, on_step: Callable[[StepReport], None] | None = None) -> EngineState:
        """Integrate from ``state`` to s = 1, calling ``on_step`` after every accepted step."""
        h_max = 1.0 / self.config.steps
        self._warm = state.warm_start
        while state.s < 1.0 - 1e-12:
            y0 = self.pack(state.theta, state.controls)
            self._start_field = None
            self._tangent_cg_iterations = 0
            slope = self.field(state.s, y0)
            self._start_field = (state.s, y0, slope)
            h = min(state.h or h_max, 1.0 - state.s)
            if self.corrector.adapts_step:  # without a corrector the steps stay the uniform 1/steps
                h = min(h, self._control_step_limit(state.controls, slope))
            rejected = 0
            while True:
                try:
                    y = self.integrator.step(self.field, state.s, y0, h)
                    theta, controls = self.unpack(y)
                except ControlDomainError as error:
                    if not self.corrector.adapts_step:
                        raise
                    failure = str(error)
                else:
                    correction = self.corrector.correct(self.objective, theta, controls, self.process, state.target,
                                                        max_iter=self.config.max_corrector_iterations)
                    if not self.corrector.adapts_step or correction.converged:
                        break
                    failure = f"the corrector did not return to the surface (|grad J| = {correction.grad_norm:.3e})"
                rejected += 1
                self._tangent_cg_iterations = 0
                h /= 2
                if h < self.config.min_step:
                    raise StepSizeError(
                        f"the step size fell below {self.config.min_step:g} at s={state.s:.6g} (lambda="
                        f"{state.controls.lam:.6g}, gamma={state.controls.gamma:.6g}, t={state.controls.t:.6g}): "
                        f"{failure}; a step that keeps shrinking usually means the equilibrium branch ends or "
                        "branches here (a fold or bifurcation of the surface, where the Hessian of J becomes singular)")
            # as in numerical continuation: grow after an easy correction (at most half the budget)
            # of a step that was not itself retried at a smaller h
            grow = (self.corrector.adapts_step and not rejected
                    and correction.iterations <= self.config.max_corrector_iterations // 2)
            if state.s + h >= 1.0 - 1e-12 and state.start_grad_norm is not None:
                correction = self._finish(correction, state)
            state = EngineState(correction.theta.detach(), correction.controls, s=state.s + h,
                                step=state.step + 1, h=min(2 * h, h_max) if grow else h,
                                target=state.target, warm_start=self._warm, start_grad_norm=state.start_grad_norm)
            if on_step is not None:
                on_step(StepReport(state, correction, self._tangent_cg_iterations, rejected))
        return state

    def _control_step_limit(self, controls: Controls, slope: Tensor) -> float:
        """The largest h for which a step changes λ and γ by at most ``max_control_change`` of
        max(|value|, 1) at the current rates: a steep stretch of the path (γ̇ large, as at the start
        of a transfer) gets small steps up front instead of rejected ones."""
        limit = float("inf")
        for value, rate in zip((controls.lam, controls.gamma), slope[-3:-1].tolist()):
            if rate != 0:
                limit = min(limit, self.config.max_control_change * max(abs(value), 1.0) / abs(rate))
        return limit

    def _finish(self, correction: Correction, state: EngineState) -> Correction:
        """The last step ends at least as close to the surface as the start: one more correction
        with the tolerance ‖∇θJ‖(s = 0) when the corrector's own is looser (a Newton iteration or
        two, converging quadratically there)."""
        if not correction.grad_norm > state.start_grad_norm:  # also when the corrector does not measure it
            return correction
        final = self.corrector.correct(self.objective, correction.theta, correction.controls, self.process,
                                       state.target, grad_tol=state.start_grad_norm)
        return replace(final, iterations=correction.iterations + final.iterations,
                       cg_iterations=correction.cg_iterations + final.cg_iterations)


def first_law_residual(rows: list[dict[str, float]], sigma: float = 0.0) -> tuple[float, float]:
    """(|ΔR + Σλ ΔD + Σγ ΔC + σΔS|, |ΔR|) over recorded rows, trapezoidal in λ and γ: the first
    law dR = −λ dD − γ dC − σ dS (eq. 7) integrated along the path. Rows need R, D, C, lam, gamma
    and, when σ > 0, S."""
    total, delta_r = 0.0, 0.0
    for a, b in zip(rows[:-1], rows[1:]):
        d_r = b["R"] - a["R"]
        total += (d_r + 0.5 * (a["lam"] + b["lam"]) * (b["D"] - a["D"])
                  + 0.5 * (a["gamma"] + b["gamma"]) * (b["C"] - a["C"]) + (sigma * (b["S"] - a["S"]) if sigma else 0.0))
        delta_r += d_r
    return abs(total), abs(delta_r)
