"""Start on the surface: drive ‖∇θJ‖ below the run's tolerance before a process starts.

The first law and the tangent equations hold only at equilibrium (eq. 15), and an Adam run stops
short of it (its last updates are at a tiny learning rate, so ‖∇θJ‖ stays at the level of the
minibatch noise). The polish minimizes the full-batch J at fixed controls in three phases, all
through the run's :class:`~quasistatic.linalg.LinearSolve`:

1. L-BFGS (scipy's L-BFGS-B, memory 30, one gradient per evaluation) down to ``switch_tol``: out
   of Adam the iterate is in a non-convex region (the Hessian there has ~100 negative eigenvalues
   on the digits model) where no preconditioner built at one point fits the next.
2. Whitened L-BFGS: the run's whitening preconditioner P (``LinearSolveConfig.whitening``; kfac
   by default) is built at the current point and L-BFGS runs in u with θ = θ₀ + P^{-1/2}u, where
   the valley that is long and flat in θ (most Hessian eigenvalues near 0) is rounder; P is rebuilt
   and L-BFGS restarted after each 1000-fold decrease of ‖∇θJ‖ or when a round stalls. The
   whitening need not be the solves' preconditioner: it is rebuilt for each round, so its cost
   per build matters more than its fit. Measured on the digits default model from the Adam start
   (‖∇θJ‖ 0.6) to 7.5e-7, one thread (2026-12-01): K-FAC whitening 1,106 gradient-equivalents
   (L-BFGS 162 + 779 + 126 iterations, two builds of a few GE each), the dense preconditioner on
   25 % of the data 2,825 (two builds of 656 GE, 12 s each, and 1,243 + 43 whitened iterations),
   on 10 % 2,030, L-BFGS alone 3,741. Each lands in a different minimum of J (C = 0.15442,
   0.15645, 0.15332): the polish's path decides which. With preconditioner ``none`` this phase is
   L-BFGS restarted with a fresh memory.
3. The unconstrained ``newton`` corrector, should a tail remain (quadratic convergence once in the
   basin).

A small gradient does not make a minimum: on the (64, 64) digits model the polish ended at
‖∇θJ‖ 8e-7 on a saddle (λ_min −2.0e-4, found by Lanczos-type LOBPCG started from the directions CG
met; 80 cold LOBPCG iterations read +2.3e-4), and the whole path was followed on that saddle branch,
every Newton solve meeting negative curvature. So the point reached is probed
(:meth:`~quasistatic.linalg.LinearSolve.probe`: preconditioned CG on random right-hand sides, which
stops at a direction of negative curvature); where the probe meets one, LOBPCG started from it gives
the most negative eigenvector v, θ steps downhill along ±v (backtracking until J falls below the
saddle's value, so the phases cannot return to it) and the phases run again, at most ``escapes``
times. A probe that meets none is evidence, not proof, of a minimum (the start's λ_min is then
tracked by the engine, with the same solves' directions).

scipy works on host numpy arrays, so each gradient crosses the host boundary once: negligible on
CPU, acceptable on a GPU for a one-off start.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import minimize
from torch import Tensor
from tqdm.auto import tqdm

from .correctors import NewtonCorrector
from ..errors import InputError, bad_value
from ..linalg.linear_solve import LinearSolve
from ..thermo.objective import Controls

__all__ = [
    "POLISH_ITERATIONS",
    "PROBE_ITERATIONS",
    "PolishResult",
    "NotOnSurfaceError",
    "polish",
    "require_equilibrium",
]

logger = logging.getLogger(__name__)

POLISH_ITERATIONS = 20_000  # L-BFGS iterations of all phases at most, by default
PROBE_ITERATIONS = 300  # CG iterations of the negative-curvature probe, by default (see the module docstring)


class NotOnSurfaceError(InputError):
    """The starting model could not be brought to equilibrium within the budget."""


@dataclass(frozen=True)
class PolishResult:
    theta: Tensor
    grad_norm_before: float
    grad_norm: float
    iterations: int  # L-BFGS iterations of all rounds, Newton iterations and the probes' CG iterations
    converged: bool
    escapes: int = 0  # saddles left along a direction of negative curvature
    saddle: bool = False  # the last probe met negative curvature (no escape left, or none downhill)


def polish(
    linear_solve: LinearSolve,
    theta: Tensor,
    controls: Controls,
    *,
    grad_tol: float = 1e-6,
    switch_tol: float = 1e-1,
    rounds: int = 6,
    max_iter: int = POLISH_ITERATIONS,
    newton_iterations: int = 30,
    probe_iterations: int = PROBE_ITERATIONS,
    escapes: int = 3,
    progress: bool = False,
) -> PolishResult:
    """Minimize J(·; λ, γ, t) of ``linear_solve.objective`` from θ until ‖∇θJ‖ ≤ grad_tol (eq. 15)
    at a point where a probe of ``probe_iterations`` CG iterations (0: none) meets no negative
    curvature: L-BFGS down to ``switch_tol``, then at most ``rounds`` rounds of whitened L-BFGS,
    then Newton (at most ``newton_iterations``), and after a probe that met negative curvature a
    step downhill along it and the phases again, at most ``escapes`` times (the module docstring);
    ``max_iter`` bounds the L-BFGS iterations of all phases and the probes' CG iterations (a probe
    runs only while the budget has room for all of its ``probe_iterations``)."""
    if not grad_tol > 0:
        raise bad_value("polish tolerance", "a number > 0", grad_tol)
    objective = linear_solve.objective
    like = theta.detach()
    before = float(torch.linalg.vector_norm(objective.gradient(like, controls)))
    bar = tqdm(desc="polish (L-BFGS)", unit="it", disable=not progress, leave=False)
    settings = (grad_tol, switch_tol, rounds, newton_iterations, bar)
    like, norm, iterations = _descend(linear_solve, like, controls, before, max_iter, *settings)
    escaped, saddle = 0, False
    while norm <= grad_tol and 0 < probe_iterations <= max_iter - iterations:
        probe = linear_solve.probe(like, controls, iterations=probe_iterations)
        iterations += probe.iterations
        saddle = bool(probe.negative_curvature.any())
        if not saddle or escaped == escapes:
            break
        pairs = linear_solve.smallest_eigenpairs(like, controls, count=1)  # starts from the direction met
        downhill = _downhill(objective, like, controls, pairs.vectors[:, 0])
        if downhill is None:
            break
        escaped += 1
        logger.info(
            "the polish reached |grad J| = %.3e on a saddle of J (lambda_min <= %.3e, LOBPCG from the "
            "direction of negative curvature its probe met): stepped downhill along it and polishes again (%d of %d)",
            norm,
            float(pairs.values[0]),
            escaped,
            escapes,
        )
        like, norm, used = _descend(linear_solve, downhill, controls, math.inf, max_iter - iterations, *settings)
        iterations += used
    bar.close()
    return PolishResult(like, before, norm, iterations, norm <= grad_tol, escaped, saddle)


def _descend(
    linear_solve: LinearSolve,
    theta: Tensor,
    controls: Controls,
    norm: float,
    max_iter: int,
    grad_tol: float,
    switch_tol: float,
    rounds: int,
    newton_iterations: int,
    bar: tqdm,
) -> tuple[Tensor, float, int]:
    """The three phases from θ whose ‖∇θJ‖ is ``norm`` (inf: not yet evaluated): (θ, ‖∇θJ‖, L-BFGS
    and Newton iterations)."""
    objective = linear_solve.objective
    if norm == math.inf:
        norm = float(torch.linalg.vector_norm(objective.gradient(theta, controls)))
    iterations = 0
    if norm <= grad_tol:
        return theta, norm, iterations
    if norm > switch_tol:
        theta, norm, iterations = _lbfgs(objective, controls, theta, None, max(switch_tol, grad_tol), max_iter, bar)
    for _ in range(rounds):
        if norm <= grad_tol or iterations >= max_iter:
            break
        whiten = linear_solve.whitening(theta, controls).apply_inverse_sqrt
        theta, reached, used = _lbfgs(
            objective, controls, theta, whiten, max(grad_tol, 1e-3 * norm), max_iter - iterations, bar
        )
        iterations += used
        stalled, norm = reached > 0.5 * norm, reached
        if stalled:
            break
    if norm <= grad_tol:
        return theta, norm, iterations
    # no early rejection: nothing retries the polish with a smaller step, so a slow contraction is still progress
    finish = NewtonCorrector(grad_tol=grad_tol, max_iter=newton_iterations, early_rejection=False).correct(
        linear_solve, theta, controls, None, None
    )
    return finish.theta, finish.grad_norm, iterations + finish.iterations


def _downhill(objective, theta: Tensor, controls: Controls, direction: Tensor) -> Tensor | None:
    """θ + αv along the eigenvector v of a negative eigenvalue, signed so that ∇θJ·v ≤ 0 (a descent
    direction), with the largest α = 1e-2 max(1, ‖θ‖) / 2^k that brings J below J(θ) (k < 40: along
    negative curvature J falls for every small enough α); None when none does (rounding)."""
    with torch.no_grad():
        value = float(objective.value(theta, controls))
    sign = -1.0 if float(objective.gradient(theta, controls) @ direction) > 0 else 1.0
    alpha = 1e-2 * max(1.0, float(torch.linalg.vector_norm(theta)))
    for _ in range(40):
        trial = theta + sign * alpha * direction
        with torch.no_grad():
            if float(objective.value(trial, controls)) < value:
                return trial
        alpha /= 2
    return None


def _lbfgs(
    objective,
    controls: Controls,
    theta: Tensor,
    whiten: Callable[[Tensor], Tensor] | None,
    goal: float,
    max_iter: int,
    bar: tqdm,
) -> tuple[Tensor, float, int]:
    """L-BFGS-B on J(θ + S u) in u from u = 0, S = ``whiten`` (symmetric) or I, until ‖∇θJ‖ ≤ goal;
    (θ reached, its ‖∇θJ‖, iterations). Restarted with a fresh memory after an early line-search
    stop while restarts still reduce ‖∇θJ‖ by 10 %."""

    def to_theta(u: np.ndarray) -> Tensor:
        step = torch.as_tensor(np.asarray(u), dtype=theta.dtype).to(theta.device)
        return theta + (step if whiten is None else whiten(step[:, None])[:, 0])

    last = [float("inf")]

    def value_and_gradient(u: np.ndarray) -> tuple[float, np.ndarray]:
        value, gradient = objective.value_and_gradient(to_theta(u), controls)
        last[0] = float(torch.linalg.vector_norm(gradient))
        if whiten is not None:
            gradient = whiten(gradient[:, None])[:, 0]
        return float(value), gradient.cpu().numpy()

    def stop_when_close(intermediate_result: object) -> None:
        bar.update()
        bar.set_postfix(grad_norm=f"{last[0]:.2e}")
        if last[0] <= goal:
            raise StopIteration

    u, iterations, best = np.zeros(theta.numel()), 0, float("inf")
    while iterations < max_iter:
        result = minimize(
            value_and_gradient,
            u,
            jac=True,
            method="L-BFGS-B",
            callback=stop_when_close,
            options={"maxiter": max_iter - iterations, "maxcor": 30, "gtol": 0.0, "ftol": 0.0},
        )
        iterations += max(int(result.nit), 1)
        u, reached = result.x, last[0]
        if reached <= goal or reached >= 0.9 * best:
            break
        best = reached
    value_and_gradient(u)  # last[0] is ‖∇θJ‖ at u (scipy's last evaluation may be a rejected trial)
    return to_theta(u).detach(), last[0], iterations


def require_equilibrium(result: PolishResult, grad_tol: float) -> None:
    """Refuse to start a process from a point that is not on the surface, or not at a minimum of J."""
    if result.converged and result.saddle:
        raise NotOnSurfaceError(
            f"the starting model must be a minimum of J before a process starts; after {result.escapes} "
            f"escapes along negative curvature the polish still ends on a saddle (|grad J| = "
            f"{result.grad_norm:.3e}); equilibrate longer, or start from another model"
        )
    if not result.converged:
        raise NotOnSurfaceError(
            f"the starting model must reach equilibrium |grad J| <= {grad_tol:g} before a process starts, got "
            f"{result.grad_norm:.3e} after {result.iterations} L-BFGS and Newton iterations (from "
            f"{result.grad_norm_before:.3e}); equilibrate longer or raise --grad-tol"
        )
