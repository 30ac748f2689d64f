"""Start on the surface: drive ‖∇θJ‖ below a tolerance before a process starts.

The first law and the tangent equations hold only at equilibrium (eq. 15), and an Adam run stops
short of it (its last updates are at a tiny learning rate, so ‖∇θJ‖ stays at the level of the
minibatch noise). The polish has two phases on the full-batch J:

1. L-BFGS (scipy's L-BFGS-B, memory 30) while ‖∇θJ‖ > max(``switch_tol``, tol): after Adam the
   iterate is in a long, flat, non-convex valley (most Hessian eigenvalues are near 0) where Newton
   steps are mostly rejected and a trust-region Newton (scipy trust-krylov/trust-ncg) spends ~100
   Hessian products per iteration; L-BFGS descends it for one gradient per iteration.
2. The unconstrained ``newton`` corrector (Newton–CG with Levenberg–Marquardt damping and a line
   search) from there, which converges quadratically once inside the basin. Started higher up
   (‖∇θJ‖ ≈ 3e-4) it can wander off on the digits MLP, hence the low switch.

On the CLI's default digits model (hidden 16, σ = 3e-2) the L-BFGS phase takes about 3500
iterations and 50 s to reach ‖∇θJ‖ ≤ 1e-6 from an Adam run (‖∇θJ‖ ≈ 0.5).

scipy works on host numpy arrays, so each gradient crosses the host boundary once: negligible on
CPU, acceptable on a GPU for a one-off start.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import minimize
from torch import Tensor
from tqdm.auto import tqdm

from .correctors import NewtonCorrector
from .errors import InputError, bad_value
from .objective import Controls, Objective

__all__ = ["PolishResult", "NotOnSurfaceError", "polish", "require_equilibrium"]


class NotOnSurfaceError(InputError):
    """The starting model could not be brought to equilibrium within the budget."""


@dataclass(frozen=True)
class PolishResult:
    theta: Tensor
    grad_norm_before: float
    grad_norm: float
    iterations: int
    converged: bool


def polish(objective: Objective, theta: Tensor, controls: Controls, *, grad_tol: float = 1e-6,
           switch_tol: float = 1e-7, max_iter: int = 20_000, newton_iterations: int = 30,
           operator: str = "hessian", progress: bool = False) -> PolishResult:
    """Minimize J(·; λ, γ, t) from θ until ‖∇θJ‖ ≤ grad_tol: L-BFGS (at most ``max_iter``
    iterations in all) down to ``switch_tol``, then Newton (at most ``newton_iterations``).

    L-BFGS-B ends early when its line search fails on a stale curvature memory; it is restarted
    from where it stopped, with a fresh memory, for as long as restarts still reduce ‖∇θJ‖."""
    if not grad_tol > 0:
        raise bad_value("polish tolerance", "a number > 0", grad_tol)
    like = theta.detach()
    before = float(torch.linalg.vector_norm(objective.gradient(like, controls)))
    if before <= grad_tol:
        return PolishResult(like, before, before, 0, True)
    goal = max(switch_tol, grad_tol)
    bar = tqdm(desc="polish (L-BFGS)", unit="it", disable=not progress, leave=False)
    last_norm = [before]

    def value_and_gradient(x: np.ndarray) -> tuple[float, np.ndarray]:
        point = torch.as_tensor(np.asarray(x), dtype=like.dtype).to(like.device)
        objective.work.forwards += 1
        value = float(objective.value(point, controls))
        gradient = objective.gradient(point, controls)
        last_norm[0] = float(torch.linalg.vector_norm(gradient))
        return value, gradient.cpu().numpy()

    def stop_when_close(intermediate_result: object) -> None:
        bar.update()
        bar.set_postfix(grad_norm=f"{last_norm[0]:.2e}")
        if last_norm[0] <= goal:
            raise StopIteration

    iterations, best = 0, before
    x = like.cpu().numpy()
    while best > goal and iterations < max_iter:
        result = minimize(value_and_gradient, x, jac=True, method="L-BFGS-B", callback=stop_when_close,
                          options={"maxiter": max_iter - iterations, "maxcor": 30, "gtol": 0.0, "ftol": 0.0})
        iterations += max(int(result.nit), 1)
        reached, x = float(np.linalg.norm(result.jac)), result.x
        if reached >= 0.9 * best:  # a restart that no longer helps: leave the rest to Newton
            break
        best = reached
    bar.close()
    like = torch.as_tensor(x, dtype=like.dtype).to(like.device)
    finish = NewtonCorrector(grad_tol=grad_tol, max_iter=newton_iterations, solver_tol=min(1e-8, grad_tol),
                             operator=operator).correct(objective, like, controls, None, None)
    return PolishResult(finish.theta, before, finish.grad_norm, iterations + finish.iterations, finish.converged)


def require_equilibrium(result: PolishResult, grad_tol: float) -> None:
    """Refuse to start a process from a point that is not on the surface."""
    if not result.converged:
        raise NotOnSurfaceError(
            f"the starting model must reach equilibrium |grad J| <= {grad_tol:g} before a process starts, got "
            f"{result.grad_norm:.3e} after {result.iterations} L-BFGS and Newton iterations (from "
            f"{result.grad_norm_before:.3e}); equilibrate longer or raise the polish tolerance")
