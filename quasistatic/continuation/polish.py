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

scipy works on host numpy arrays, so each gradient crosses the host boundary once: negligible on
CPU, acceptable on a GPU for a one-off start.
"""

from __future__ import annotations

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

__all__ = ["POLISH_ITERATIONS", "PolishResult", "NotOnSurfaceError", "polish", "require_equilibrium"]

POLISH_ITERATIONS = 20_000  # L-BFGS iterations of all phases at most, by default


class NotOnSurfaceError(InputError):
    """The starting model could not be brought to equilibrium within the budget."""


@dataclass(frozen=True)
class PolishResult:
    theta: Tensor
    grad_norm_before: float
    grad_norm: float
    iterations: int  # L-BFGS iterations of all rounds plus Newton iterations
    converged: bool


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
    progress: bool = False,
) -> PolishResult:
    """Minimize J(·; λ, γ, t) of ``linear_solve.objective`` from θ until ‖∇θJ‖ ≤ grad_tol:
    L-BFGS down to ``switch_tol``, then at most ``rounds`` rounds of whitened L-BFGS, then Newton
    (at most ``newton_iterations``); ``max_iter`` bounds the L-BFGS iterations of all phases."""
    if not grad_tol > 0:
        raise bad_value("polish tolerance", "a number > 0", grad_tol)
    objective = linear_solve.objective
    like = theta.detach()
    before = float(torch.linalg.vector_norm(objective.gradient(like, controls)))
    if before <= grad_tol:
        return PolishResult(like, before, before, 0, True)
    bar = tqdm(desc="polish (L-BFGS)", unit="it", disable=not progress, leave=False)
    iterations, norm = 0, before
    if before > switch_tol:
        like, norm, used = _lbfgs(objective, controls, like, None, max(switch_tol, grad_tol), max_iter, bar)
        iterations += used
    for _ in range(rounds):
        if norm <= grad_tol or iterations >= max_iter:
            break
        whiten = linear_solve.whitening(like, controls).apply_inverse_sqrt
        like, reached, used = _lbfgs(
            objective, controls, like, whiten, max(grad_tol, 1e-3 * norm), max_iter - iterations, bar
        )
        iterations += used
        stalled, norm = reached > 0.5 * norm, reached
        if stalled:
            break
    bar.close()
    if norm <= grad_tol:
        return PolishResult(like, before, norm, iterations, True)
    finish = NewtonCorrector(grad_tol=grad_tol, max_iter=newton_iterations).correct(
        linear_solve, like, controls, None, None
    )
    return PolishResult(finish.theta, before, finish.grad_norm, iterations + finish.iterations, finish.converged)


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
    """Refuse to start a process from a point that is not on the surface."""
    if not result.converged:
        raise NotOnSurfaceError(
            f"the starting model must reach equilibrium |grad J| <= {grad_tol:g} before a process starts, got "
            f"{result.grad_norm:.3e} after {result.iterations} L-BFGS and Newton iterations (from "
            f"{result.grad_norm_before:.3e}); equilibrate longer or raise --grad-tol"
        )
