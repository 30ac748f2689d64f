"""Pseudo-arclength continuation (Keller 1977) of a process's residual form, through folds.

A process with a residual form (:class:`~quasistatic.processes.ResidualForm`) defines its path as
the curve G(u) = 0 in u = (θ, p), p = (s, γ) when its constraint fixes γ, else p = (s):

    G(u) = [∇θJ(θ; c(p)); w·(R, D, C)(θ) − g₀],    J_G = [[A, ∂_p∇θJ], [∇gᵀ, ∂_p g]],

with ∂_s∇θJ = λ̇∇D + γ̇∇C + ṫ ∂_t∇θJ and ∂_γ∇θJ = ∇C (the columns of eqs. 18 and 25). The engine
parametrizes the curve by s and needs A⁻¹, so it stops where A is singular: at a fold. The curve
itself goes on, and here it is followed by its arclength σ in u. Each step predicts u₀ + Δσ τ
along the unit tangent τ (the null vector of J_G, oriented by the previous tangent) and corrects
by Newton on [G(u); τᵀ(u − u₀) − Δσ] = 0. Both solves use the bordered matrix [[J_G], [τᵀ]], which
stays non-singular at a fold; it is solved whole (GMRES, :meth:`LinearSolve.solve_bordered`), never
by elimination through A.

Past a fold the curve is a branch of saddles: every accepted point counts the negative
eigenvalues of A (a few warm LOBPCG iterations), and the recorder marks those rows ``unstable``.
Where the s-component of τ changes sign between two points, the turning point (the fold, where
∂s/∂σ = 0) is located by the Illinois variant of regula falsi on τ_s and becomes a row of its own
(event ``fold``). The run ends at s = 1 exactly: a step whose prediction passes s = 1 is corrected
on the plane s = 1 instead (past it a transfer's t stays 1, and G is no longer smooth in s).

Coordinates (``coordinates``, the engine's ``arclength`` setting, :data:`ARCLENGTH_COORDINATES`):
``theta-s-gamma`` (Keller's, the default) measures the arclength in all of u = (θ, s, γ);
``s-log-gamma``, for a process whose constraint fixes γ, takes ℓ = log γ as the unknown in place of
γ (its column is ∂_ℓ∇θJ = γ∇θC, and ∂_ℓg = 0) and measures the arclength in the controls (s, ℓ)
alone: τ is scaled to τ_s² + τ_ℓ² = 1 and the step's plane is (0, τ_s, τ_ℓ)ᵀ(u − u₀) = Δσ, so a step
moves s by at most Δσ and γ by at most a factor e^Δσ, however fast θ or γ itself move. It is meant
for the iso-classification transfer (eqs. 26–28): on digits 0–4 → 5–9 at t = 0, γ̇ = −C_t/C_γ is
1,100 per unit t (d(log γ)/dt 110) and θ_t alone has norm 278, so in u the step length is set by θ
and γ while nothing bounds γ's relative change. It does not remove the folds of that path
(docs/results.md, "Fig. 5 on digits").

Step length (as BifurcationKit's and pacopy's): ×1.5 after a correction of at most 2 Newton
iterations, ×0.7 after one of ``max_corrector_iterations``, halved after a failed correction or
when successive tangents differ by more than ``MAX_ANGLE``; at most the engine's nominal h times
max(1, ‖u‖) at the switch (the nominal h with ``s-log-gamma``). A branch that turns back past s = 0
ends the run (StepSizeError).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .correctors import Correction
from ..errors import InputError, choice_error
from .folds import Fold, StabilityPoint
from ..linalg.linear_solve import LinearSolve
from ..thermo.objective import Controls
from ..processes import Process, ResidualForm
from .step_control import StepSizeError
from .tangents import surface_gradients

__all__ = [
    "ARCLENGTH_COORDINATES",
    "ArclengthState",
    "PseudoArclength",
    "MAX_ANGLE",
    "RESIDUAL_FORM_PROCESSES",
    "require_residual_form",
]

# the built-in processes with a residual form (a registered process has one when its residual_form() is not None)
RESIDUAL_FORM_PROCESSES = (
    "free",
    "iso-classification (with lam_end, not alpha)",
    "iso-c-rate",
    "iso-classification-transfer",
    "constant-lambda-rate",
)
MAX_ANGLE = 0.5  # radians between successive tangents before a step is retried at half the length
# the coordinates whose arclength a step measures: all of u = (θ, s, γ), or the controls (s, log γ)
ARCLENGTH_COORDINATES = ("theta-s-gamma", "s-log-gamma")
TANGENT_TOL = 1e-8  # relative residual of the tangent solves (the turning point is located on τ_s)


@dataclass(frozen=True)
class ArclengthState:
    """What continuation keeps between steps (saved with the engine state)."""

    tangent: Tensor  # unit τ in u = (θ, s[, γ]) (u = (θ, s, log γ), unit in (s, log γ), with "s-log-gamma")
    step: float  # the next Δσ
    max_step: float
    at_turn: bool = False  # this point is a located turning point (its τ_s ≈ 0: no sign change to judge)
    coordinates: str = ARCLENGTH_COORDINATES[0]  # the run's coordinates (ARCLENGTH_COORDINATES)


def require_residual_form(process: Process, coordinates: str = ARCLENGTH_COORDINATES[0]) -> ResidualForm:
    """The process's residual form, or an InputError naming the processes that have one; with
    ``coordinates`` "s-log-gamma" it must solve for γ (its constraint fixes γ)."""
    if coordinates not in ARCLENGTH_COORDINATES:
        raise choice_error("arclength coordinates", ARCLENGTH_COORDINATES, coordinates)
    form = process.residual_form()
    if form is None:
        raise InputError(
            f"--at-fold arclength needs a process with a residual form (a path G(theta, s, gamma) = 0), "
            f"got {type(process).__name__} {process.describe()}; the built-in processes with one: "
            f"{', '.join(RESIDUAL_FORM_PROCESSES)}"
        )
    if coordinates == "s-log-gamma" and not form.solves_gamma:
        raise InputError(
            f"--arclength s-log-gamma needs a process whose constraint fixes gamma, got "
            f"{type(process).__name__} {process.describe()}"
        )
    return form


@dataclass
class _Point:
    """G and the borders of J_G at u."""

    u: Tensor
    theta: Tensor
    controls: Controls
    gradient: Tensor  # ∇θJ (n,)
    violation: float  # g − g₀ (0 without a constraint)
    columns: Tensor  # ∂_p∇θJ (n, m)
    constraint_row: Tensor | None  # ∇g (n,) with a constraint
    constraint_corner: Tensor | None  # ∂_p g (m,) with a constraint

    @property
    def grad_norm(self) -> float:
        return float(torch.linalg.vector_norm(self.gradient))


class PseudoArclength:
    """Continues a process's residual form from an engine state (see the module docstring); the
    tolerances are the engine's: ‖∇θJ‖ ≤ ``grad_tol`` and |g − g₀| ≤ ``drift_tol`` |g₀| at every
    accepted point."""

    def __init__(
        self,
        linear_solve: LinearSolve,
        process: Process,
        *,
        grad_tol: float,
        drift_tol: float,
        max_iter: int,
        min_step: float,
        eigen_iterations: int,
        eigen_count: int = 3,
        coordinates: str = ARCLENGTH_COORDINATES[0],
    ) -> None:
        self.form = require_residual_form(process, coordinates)
        self.coordinates, self.log_gamma = coordinates, coordinates == "s-log-gamma"
        self.process, self.linear_solve, self.objective = process, linear_solve, linear_solve.objective
        self.grad_tol, self.drift_tol, self.max_iter, self.min_step = grad_tol, drift_tol, max_iter, min_step
        self.eigen_iterations, self.eigen_count = max(eigen_iterations, 1), eigen_count
        self.weights = process.constraint if self.form.solves_gamma else None

    # -- the curve -----------------------------------------------------------------------------

    def unknowns(self, theta: Tensor, s: float, controls: Controls) -> Tensor:
        """u = (θ, s[, γ or log γ])."""
        if self.log_gamma and not controls.gamma > 0:
            raise InputError(f"arclength coordinates 's-log-gamma' need gamma > 0, got {controls.gamma:g}")
        free = math.log(controls.gamma) if self.log_gamma else controls.gamma
        tail = [s, free] if self.form.solves_gamma else [s]
        return torch.cat([theta.detach(), torch.tensor(tail, dtype=theta.dtype, device=theta.device)])

    def plane(self, tangent: Tensor) -> Tensor:
        """The normal of the step's plane for ``tangent``: itself, or with ``s-log-gamma`` its
        control part (s, log γ), θ's part zeroed; planeᵀx is the metric's inner product ⟨τ, x⟩."""
        if not self.log_gamma:
            return tangent
        controls = torch.zeros_like(tangent)
        controls[-2:] = tangent[-2:]
        return controls

    def norm(self, vector: Tensor) -> float:
        """The length of ``vector`` in the arclength's coordinates."""
        return float(torch.linalg.vector_norm(self.plane(vector)))

    def _point(self, u: Tensor, target: float | None) -> _Point:
        """G's pieces at u; a u outside λ, γ ≥ 0 raises :class:`StepSizeError`."""
        n = u.numel() - (2 if self.form.solves_gamma else 1)
        theta, s = u[:n], float(u[n])
        try:
            free = float(u[n + 1]) if self.form.solves_gamma else None
            gamma = math.exp(free) if self.log_gamma and free is not None else free
            controls = self.form.controls(s, gamma)
        except InputError as error:
            raise StepSizeError(f"continuation left the controls' domain at s={s:.6g}: {error}") from error
        gradients, d_parts, values, partial_t = surface_gradients(self.objective, theta, controls.t)
        w_j = controls.weights(theta)
        lam_rate, gamma_rate, t_rate = self.form.rates
        d_s = lam_rate * gradients[1] + gamma_rate * gradients[2] + t_rate * (w_j @ d_parts)
        # ∂_γ∇θJ = ∇θC, and ∂_{log γ}∇θJ = γ∇θC
        d_free = gradients[2] * controls.gamma if self.log_gamma else gradients[2]
        columns = torch.stack([d_s, d_free], 1) if self.form.solves_gamma else d_s[:, None]
        gradient = w_j @ gradients + self.objective.sigma * theta  # ∇θJ, with ∇(σS) = σθ
        row = corner = None
        violation = 0.0
        if self.weights is not None:
            assert target is not None  # a constrained process's state carries its constraint value g₀
            w = torch.tensor(self.weights, dtype=theta.dtype, device=theta.device)
            row = w @ gradients
            corner = torch.tensor([t_rate * float(w @ partial_t), 0.0], dtype=theta.dtype, device=theta.device)
            violation = float(w @ values) - target
        return _Point(u, theta, controls, gradient, violation, columns, row, corner)

    def _bordered(self, point: _Point, plane: Tensor, rhs: Tensor, tol: float, kind: str):
        """Solve [[J_G(u)], [planeᵀ]] x = rhs whole."""
        n = point.theta.numel()
        rows = [plane[:n]] if point.constraint_row is None else [point.constraint_row, plane[:n]]
        corner = [plane[n:]] if point.constraint_corner is None else [point.constraint_corner, plane[n:]]
        return self.linear_solve.solve_bordered(
            point.theta,
            point.controls,
            point.columns,
            torch.stack(rows, 1),
            torch.stack(corner),
            rhs,
            tol=tol,
            kind=kind,
        )

    def _tangent(self, point: _Point, plane: Tensor) -> tuple[Tensor, int]:
        """The null vector x of J_G at ``point`` with planeᵀx = 1 (not normalized), and the GMRES
        iterations; an unconverged solve raises :class:`StepSizeError`."""
        rhs = torch.zeros_like(point.u)
        rhs[-1] = 1.0
        result = self._bordered(point, plane, rhs, TANGENT_TOL, "arclength-tangent")
        if not result.converged:
            raise StepSizeError(
                f"the arclength tangent solve did not converge at "
                f"s={float(point.u[point.theta.numel()]):.6g} ({result.summary()})"
            )
        return result.solution, result.iterations

    def _unit_tangent(self, point: _Point, orientation: Tensor) -> tuple[Tensor, int]:
        """The unit tangent at ``point`` with ⟨τ, orientation⟩ > 0, and the GMRES iterations."""
        tangent, iterations = self._tangent(point, self.plane(orientation))
        return tangent / self.norm(tangent), iterations

    def _correct(self, start: Tensor, plane: Tensor, level: float, target: float | None) -> tuple[_Point, Correction]:
        """Newton on [G(u); planeᵀu − level] = 0 from ``start``."""
        point = self._point(start, target)
        allowed = self.drift_tol * abs(target) if target else self.drift_tol
        krylov, previous, stalls = 0, math.inf, 0
        for iteration in range(self.max_iter + 1):
            off_plane = float(plane @ point.u) - level
            if point.grad_norm <= self.grad_tol and abs(point.violation) <= allowed:
                return point, Correction(
                    point.theta, point.controls, iteration, krylov, point.grad_norm, abs(point.violation), True
                )
            residual = math.sqrt(point.grad_norm**2 + point.violation**2 + off_plane**2)
            stalls = stalls + 1 if residual > 0.9 * previous else 0
            if iteration == self.max_iter or stalls == 2:
                break
            previous = residual
            tail = [-point.violation, -off_plane] if point.constraint_row is not None else [-off_plane]
            rhs = torch.cat([-point.gradient, torch.tensor(tail, dtype=start.dtype, device=start.device)])
            tol = min(0.1, max(0.5 * self.grad_tol / residual, 1e-12))
            result = self._bordered(point, plane, rhs, tol, "arclength-newton")
            krylov += result.iterations
            if not result.converged:
                break
            point = self._point(point.u + result.solution, target)
        return point, Correction(
            point.theta, point.controls, iteration, krylov, point.grad_norm, abs(point.violation), False
        )

    def _stability(self, point: _Point, s: float) -> StabilityPoint:
        pairs = self.linear_solve.smallest_eigenpairs(
            point.theta, point.controls, count=self.eigen_count, iterations=self.eigen_iterations
        )
        c = point.controls
        return StabilityPoint(s, c.lam, c.gamma, c.t, float(pairs.values[0]), int((pairs.values < 0).sum()))

    # -- the steps -----------------------------------------------------------------------------

    def begin(self, state, nominal_step: float):
        """``state`` (an engine state on the curve) with continuation set up: the tangent oriented
        along increasing s; the first step the arclength of the engine's last step size there
        (tiny next to a fold, where the natural tangent's length blows up); the largest
        ``nominal_step`` × max(1, ‖u‖) (the steps are in u = (θ, s[, γ]))."""
        u = self.unknowns(state.theta, state.s, state.controls)
        along_s = torch.zeros_like(u)
        along_s[state.theta.numel()] = 1.0
        natural, _ = self._tangent(self._point(u, state.target), along_s)  # (θ_s, 1[, γ_s or (log γ)_s])
        length = self.norm(natural)
        largest = nominal_step * (1.0 if self.log_gamma else max(1.0, float(torch.linalg.vector_norm(u))))
        memory = ArclengthState(natural / length, min(state.h * length, largest), largest, coordinates=self.coordinates)
        return replace(state, arclength=memory)

    def step(self, state):
        """One accepted continuation step from ``state`` (retried at half the length until
        accepted): (the new engine state, its Correction, tangent iterations, rejections, the
        located turning point or None)."""
        n = state.theta.numel()
        memory: ArclengthState = state.arclength
        if memory.coordinates != self.coordinates:
            raise InputError(
                f"arclength coordinates must be the continued state's {memory.coordinates!r}, got {self.coordinates!r}"
            )
        tau, ds = memory.tangent, memory.step
        u0 = self.unknowns(state.theta, state.s, state.controls)
        s0, rate = float(u0[n]), float(tau[n])
        end_plane = torch.zeros_like(u0)
        end_plane[n] = 1.0
        rejections: list[str] = []
        while True:
            if ds < self.min_step * memory.max_step:
                raise StepSizeError(f"the arclength step fell below {self.min_step:g} of its largest at s={s0:.6g}")
            # a step whose prediction passes s = 1 lands on the plane s = 1 (beyond it t is no longer
            # eq. 23's: the residual form holds t at 1)
            lands = rate > 0 and s0 + ds * rate >= 1.0
            plane = end_plane if lands else self.plane(tau)
            reason = "corrector"
            try:
                if lands:
                    point, correction = self._correct(u0 + (1.0 - s0) / rate * tau, plane, 1.0, state.target)
                else:
                    point, correction = self._correct(u0 + ds * tau, plane, float(plane @ u0) + ds, state.target)
                if correction.converged:
                    new_tau, tangent_iterations = self._unit_tangent(point, tau)
                    if float(self.plane(tau) @ new_tau) >= math.cos(MAX_ANGLE):
                        break
                    reason = "angle"
            except StepSizeError as error:  # from an InputError: the controls' domain; else a tangent solve
                reason = "domain" if isinstance(error.__cause__, InputError) else "tangent"
            rejections.append(reason)
            ds /= 2
        turning = None
        s1 = 1.0 if lands else float(point.u[n])
        if s1 < 0:
            raise StepSizeError(
                f"arclength continuation went back past the start of the path (s = {s1:.6g} < 0 at "
                f"lambda={point.controls.lam:.6g}, gamma={point.controls.gamma:.6g}): this branch does "
                "not reach s = 1"
            )
        if not lands and not memory.at_turn and rate * float(new_tau[n]) < 0:  # ∂s/∂σ changed sign: a fold
            point, correction, new_tau, turning = self._turning_point(state, u0, tau, ds, point, correction, new_tau)
            s1 = float(point.u[n])
        iterations = correction.iterations
        grow = 1.5 if iterations <= 2 else 0.7 if iterations >= self.max_iter else 1.0
        stability = self._stability(point, s1)
        new = replace(
            state,
            theta=point.theta.detach(),
            controls=point.controls,
            s=s1,
            step=state.step + 1,
            h=abs(s1 - s0),
            previous=None,
            stability=(*state.stability, stability)[-3:],
            arclength=replace(
                memory, tangent=new_tau, step=min(ds * grow, memory.max_step), at_turn=turning is not None
            ),
        )
        return new, correction, tangent_iterations, tuple(rejections), turning

    def _turning_point(
        self, state, u0: Tensor, tau: Tensor, ds: float, point: _Point, correction: Correction, new_tau: Tensor
    ):
        """The point between u₀ (σ = 0) and ``point`` (σ = ds) where τ_s = 0, by the Illinois
        variant of regula falsi on τ_s(σ) (each evaluation a correction and a tangent)."""
        n = state.theta.numel()
        a, fa = 0.0, float(tau[n])
        b, fb = ds, float(new_tau[n])
        best = (point, correction, new_tau)
        plane = self.plane(tau)
        for _ in range(30):
            c = b - fb * (b - a) / (fb - fa)
            candidate, fixed = self._correct(u0 + c * tau, plane, float(plane @ u0) + c, state.target)
            if not fixed.converged:
                break
            tangent, _ = self._unit_tangent(candidate, tau)
            fc = float(tangent[n])
            best = (candidate, fixed, tangent)
            if abs(fc) <= 1e-10 or abs(b - a) <= 1e-14 * ds:
                break
            if fc * fb < 0:
                a, fa = b, fb
            else:
                fa /= 2  # Illinois: the kept end's value halved, so that the bracket closes from both sides
            b, fb = c, fc
        point, correction, new_tau = best
        at = point.controls
        s_a, s_b = float(u0[n]), float(point.u[n])
        # s(σ) ≈ s_f − κ(σ − σ_f)²/2 near the fold and τ_s ≈ −κ(σ − σ_f): the error in s is ≲ |τ_s| |b − a| / 2
        last_lambda_min = state.stability[-1].lambda_min if state.stability else math.nan
        fold = Fold(
            s=s_b,
            lam=at.lam,
            gamma=at.gamma,
            t=at.t,
            last_accepted_s=s_a,
            last_lambda_min=last_lambda_min,
            failed_s=s_b,
            uncertainty=0.5 * abs(fb) * abs(b - a),
        )
        return point, correction, new_tau, fold
