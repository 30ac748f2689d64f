"""Start on the surface: drive ‖∇θJ‖ below a tolerance before a process starts.

The first law and the tangent equations hold only at equilibrium (eq. 15), and an Adam run stops
short of it (its last updates are at a tiny learning rate, so ‖∇θJ‖ stays at the level of the
minibatch noise). The polish is a trust-region Newton–Krylov minimization of the full-batch J
with our Hessian-vector products: scipy's ``trust-krylov`` (GLTR; Gould et al. 1999) moves along
directions of negative curvature instead of stalling at saddles, which a line-search Newton or
L-BFGS does not. scipy works on host numpy arrays, so each HVP crosses the host boundary once;
that is negligible on CPU and acceptable on a GPU for a one-off start.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import minimize
from torch import Tensor

from .correctors import NewtonCorrector
from .curvature import CurvatureOperator
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
           max_iter: int = 300, newton_iterations: int = 10, operator: str = "hessian") -> PolishResult:
    """Minimize J(·; λ, γ, t) from θ until ‖∇θJ‖ ≤ grad_tol: trust-region Newton–Krylov
    (``max_iter`` iterations at most), then Newton (``newton_iterations`` at most)."""
    if not grad_tol > 0:
        raise bad_value("polish tolerance", "a number > 0", grad_tol)
    like = theta.detach()

    def tensor(x: np.ndarray) -> Tensor:
        return torch.as_tensor(np.asarray(x), dtype=like.dtype).to(like.device)

    def value(x: np.ndarray) -> float:
        objective.work.forwards += 1
        return float(objective.value(tensor(x), controls))

    def gradient(x: np.ndarray) -> np.ndarray:
        return objective.gradient(tensor(x), controls).cpu().numpy()

    def hessp(x: np.ndarray, p: np.ndarray) -> np.ndarray:
        return CurvatureOperator(objective, tensor(x), controls, kind=operator)(tensor(p)).cpu().numpy()

    before = float(torch.linalg.vector_norm(objective.gradient(like, controls)))
    if before <= grad_tol:
        return PolishResult(like, before, before, 0, True)
    result = minimize(value, like.cpu().numpy(), jac=gradient, hessp=hessp, method="trust-krylov",
                      options={"gtol": grad_tol, "maxiter": max_iter})
    finish = NewtonCorrector(grad_tol=grad_tol, max_iter=newton_iterations, solver_tol=min(1e-8, grad_tol),
                             operator=operator).correct(objective, tensor(result.x), controls, None, None)
    return PolishResult(finish.theta, before, finish.grad_norm, int(result.nit) + finish.iterations,
                        finish.converged)


def require_equilibrium(result: PolishResult, grad_tol: float) -> None:
    """Refuse to start a process from a point that is not on the surface."""
    if not result.converged:
        raise NotOnSurfaceError(
            f"the starting model must reach equilibrium |grad J| <= {grad_tol:g} before a process starts, got "
            f"{result.grad_norm:.3e} after {result.iterations} trust-region Newton iterations (from "
            f"{result.grad_norm_before:.3e}); equilibrate longer or raise the polish tolerance")
