"""Equilibrium tangents (eqs. 17–18, 24–25) and sensitivities (eqs. 21, 27, 29, 30).

At a point θ on the equilibrium surface ∇θJ = 0 (eq. 15), differentiating that condition in a
control s ∈ {λ, γ, t} gives A θ_s = −∂_s∇θJ with A = ∇²θJ:

    θ_λ = −A⁻¹∇θD,   θ_γ = −A⁻¹∇θC,   θ_t = −A⁻¹(∇θJ_target − ∇θJ_source)   (eqs. 18, 25)

solved together as one multi-right-hand-side solve. Along the surface every functional
X ∈ {R, D, C, F} has total derivatives X_s = ∂_sX + ∇θX·θ_s: C_λ, C_γ (eq. 21), C_t (eq. 27),
the ∂D/∂λ, ∂D/∂γ, ∂D/∂t, ∂R/∂t of eq. 30; since D = ∂F/∂λ and C = ∂F/∂γ, the Hessian of F(λ, γ)
is [[D_λ, D_γ], [C_λ, C_γ]] (Remark 7, eq. 29), negative semi-definite by Lemma 3.

Here J is a deterministic function (fixed noise), so the Gibbs-measure covariance terms of the
paper's expressions (21) and (27) are folded into exact derivatives of R, D, C: autodiff computes
them exactly rather than by sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import jacrev

from ..errors import InputError, choice_error
from ..linalg.krylov import SolveResult
from ..linalg.linear_solve import LinearSolve
from ..thermo.objective import Controls, Objective
from ..thermo.sensitivities import CONTROLS, FUNCTIONALS, Sensitivities

__all__ = ["Tangents", "Sensitivities", "equilibrium_tangents", "surface_gradients", "FUNCTIONALS", "CONTROLS"]


@dataclass(frozen=True)
class Tangents:
    """θ_λ, θ_γ and (for a mixture) θ_t at one point, with what produced them.

    directions: (N, 3) columns θ_λ, θ_γ, θ_t (θ_t = 0 when the data do not change).
    gradients: (3, N) ∇θR, ∇θD, ∇θC under p(x, t).
    partials: (3, 3) ∂_sX of R, D, C (rows) in λ, γ, t (columns): only the t column is non-zero,
              X_target − X_source for a mixture (eq. 23 is linear in t).
    values: (3,) R, D, C under p(x, t).
    entropy_rates: (3,) σ·dS/ds = σθ·θ_s, the rates of eq. 6's σS term (0 when σ = 0).
    solve: the linear solve's statistics.
    """

    directions: Tensor
    gradients: Tensor
    partials: Tensor
    values: Tensor
    controls: Controls
    solve: SolveResult
    entropy_rates: Tensor

    def direction(self, control: str) -> Tensor:
        """θ_s for s in {"lam", "gamma", "t"}."""
        if control not in CONTROLS:
            raise choice_error("control", CONTROLS, control)
        return self.directions[:, CONTROLS.index(control)]

    def velocity(self, lam_dot: float, gamma_dot: float, t_dot: float = 0.0) -> Tensor:
        """θ̇ = θ_λλ̇ + θ_γγ̇ + θ_tṫ (eqs. 17 and 24)."""
        rates = torch.tensor([lam_dot, gamma_dot, t_dot], dtype=self.directions.dtype, device=self.directions.device)
        return self.directions @ rates

    def sensitivities(self) -> Sensitivities:
        """Total derivatives X_s = ∂_sX + ∇θX·θ_s for X in R, D, C and F = R + λD + γC."""
        rdc = self.partials + self.gradients @ self.directions  # (3, 3)
        c = self.controls
        # F = R + λD + γC + σS: dF/ds = ∂_sF + ∇θJ·θ_s, with ∂_λF = D, ∂_γF = C (the envelope
        # theorem at equilibrium gives D = ∂F/∂λ and C = ∂F/∂γ).
        weights = torch.tensor([1.0, c.lam, c.gamma], dtype=rdc.dtype, device=rdc.device)
        f_row = (
            weights @ rdc
            + self.entropy_rates
            + torch.stack([self.values[1], self.values[2], torch.zeros_like(self.values[0])])
        )
        return Sensitivities(torch.cat([rdc, f_row.unsqueeze(0)]).detach(), self.values.detach())


def equilibrium_tangents(
    objective: Objective,
    theta: Tensor,
    controls: Controls,
    linear_solve: LinearSolve | None = None,
    *,
    tol: float = 1e-8,
    damping: float = 0.0,
) -> Tangents:
    """θ_λ, θ_γ, θ_t at (θ, λ, γ, t) from one solve of (A + μI) X = −[∇D, ∇C, ∂_t∇J] (eqs. 18, 25)
    to relative residual ``tol``, through ``linear_solve`` (the run's: its preconditioner and its
    warm start of the last tangents; a fresh default one when None)."""
    if linear_solve is None:
        linear_solve = LinearSolve(objective)
    elif linear_solve.objective is not objective:
        raise InputError("the linear solve of equilibrium_tangents must be built on the same objective")
    theta = theta.detach()
    gradients, d_parts, values, partial_t = surface_gradients(objective, theta, controls.t)
    weights = controls.weights(theta)
    rhs = -torch.stack([gradients[1], gradients[2], weights @ d_parts], dim=1)  # (N, 3)
    result = linear_solve.solve(theta, controls, rhs.detach(), tol=tol, kind="tangent", damping=damping)
    partials = torch.zeros(3, 3, dtype=theta.dtype, device=theta.device)
    partials[:, 2] = partial_t
    entropy_rates = objective.sigma * (theta @ result.solution)
    return Tangents(result.solution, gradients.detach(), partials, values, controls, result, entropy_rates)


def surface_gradients(objective: Objective, theta: Tensor, t: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """∇θ(R, D, C) under p(x, t) (3, N), their t-derivatives ∂_t∇θ(R, D, C) (3, N; zero on a single
    data set), the values (R, D, C) (3,) and ∂_t(R, D, C) (3,) at fixed θ: the columns of eqs. 18
    and 25 and of a residual form's Jacobian. Counts 3 gradients (6 on a mixture) and a forward."""
    if objective.mixture is not None:
        parts = jacrev(objective.part_functionals)(theta)  # (2, 3, N)
        objective.work.gradients += 6
        values_parts = objective.part_functionals(theta).detach()  # (2, 3)
        gradients = objective.mixture.mix(parts[0], parts[1], t)
        d_parts = parts[1] - parts[0]  # ∂_t∇θX for R, D, C
        partial_t = values_parts[1] - values_parts[0]
        values = objective.mixture.mix(values_parts[0], values_parts[1], t)
    else:
        gradients = jacrev(objective.functionals)(theta)  # (3, N)
        objective.work.gradients += 3
        d_parts = torch.zeros_like(gradients)
        partial_t = torch.zeros(3, dtype=theta.dtype, device=theta.device)
        values = objective.functionals(theta).detach()
    objective.work.forwards += 1
    return gradients.detach(), d_parts.detach(), values, partial_t
