"""Equilibrium tangents and sensitivities against finite differences of re-equilibrated minimizers.

A reference minimizer written here (scipy ``trust-exact`` on value, gradient and Hessian from
``torch.func``, then Newton steps) drives ‖∇θJ‖ below 1e-12 on a small linear model under a data
mixture at t = 0.4, at the base controls and at λ ± h, γ ± h, t ± h. Then:

- θ_λ, θ_γ, θ_t from ``equilibrium_tangents`` (every registered solver) equal the central differences
  (θ*(s + h) − θ*(s − h)) / 2h (eqs. 18, 25), and the exact dense solution −A⁺b;
- F(λ, γ) = J(θ*(λ, γ)) has ∂F/∂λ = D and ∂F/∂γ = C (Remark 7), its Hessian [[D_λ, D_γ], [C_λ, C_γ]] is
  symmetric and negative semi-definite (Lemma 3, eq. 29) with C_γ < 0, and every entry of the (R, D, C, F)
  × (λ, γ, t) sensitivity matrix (eqs. 21, 27) equals the finite difference of the re-equilibrated value;
- the first law dR = −λ dD − γ dC (eq. 7) holds along a change of λ and of γ.

Gauge: softmax cross-entropy is invariant under adding one vector to every row of the classifier weight
and one constant to every classifier bias, so ∇²θJ has exactly latent_dim + 1 zero eigenvalues at every θ
(null space U, the same everywhere) and the minimizers form affine orbits θ* + span(U). R, D and C are
invariant, so all right-hand sides of the tangent solves are orthogonal to U and the tangents are defined
modulo U. The reference minimizer adds ½‖Uᵀθ‖² (zero on the representative orthogonal to U, which leaves
J's minimum value and ∇J = 0 unchanged) so that its minimizer is unique and smooth in the controls, and
tangents are compared after projecting out span(U). Strict minimality is asserted as A ⪰ 0 with exactly
that null space and A + UUᵀ ≻ 0.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.optimize
import torch
from torch.func import grad, grad_and_value, hessian

from quasistatic import Controls, DataMixture, ModelConfig, Objective, build_model
from quasistatic.linalg.operators import CurvatureOperator
from quasistatic.linalg.krylov import available_solvers
from quasistatic.linalg import LinearSolve, LinearSolveConfig
from quasistatic.continuation.tangents import CONTROLS, FUNCTIONALS, equilibrium_tangents
from small_problem import small_labeled

BASE = Controls(lam=1.0, gamma=1.0, t=0.4)
STEP = {"lam": 1e-3, "gamma": 1e-3, "t": 1e-4}  # θ* bends fastest in t; O(h²) truncation ≲ 1e-6 relative
TANGENT_TOL = 1e-12  # tolerance of the iterative solves
TANGENT_RTOL = 1e-4  # tangents vs finite differences
SENSITIVITY_RTOL = 1e-4  # second derivatives of F vs finite differences of D, C
GRADIENT_TOL = 1e-9  # ‖∇θJ‖ at every reference minimizer
LATENT = 1  # 32 parameters, latent_dim + 1 = 2 of them along the gauge null space


def gauge_basis(objective: Objective) -> torch.Tensor:
    """(N, latent_dim + 1) orthonormal basis of the softmax shift symmetry of a full classifier
    head; (N, 0) for the default reference-class head, which has no such symmetry."""
    if objective.model.config.reference_class:
        return torch.zeros(objective.layout.numel, 0, dtype=torch.float64)
    weight = dict(zip(objective.layout.names, objective.layout.shapes))["classifier.weight"]
    classes, latent = weight
    zeros = {name: torch.zeros(shape, dtype=torch.float64)
             for name, shape in zip(objective.layout.names, objective.layout.shapes)}
    columns = []
    for j in range(latent + 1):
        params = dict(zeros)
        if j < latent:
            params["classifier.weight"] = torch.zeros(weight, dtype=torch.float64)
            params["classifier.weight"][:, j] = 1.0
        else:
            params["classifier.bias"] = torch.ones(classes, dtype=torch.float64)
        u = objective.layout.flatten(params)
        columns.append(u / u.norm())
    return torch.stack(columns, dim=1)


def exact_solve(objective: Objective, method: str, **options) -> LinearSolve:
    """Unpreconditioned solves with ``method`` (the references here need no preconditioner)."""
    return LinearSolve(objective, LinearSolveConfig(solver=method, preconditioner="none", **options))


def minimize(objective: Objective, controls: Controls, theta0: torch.Tensor, gauge: torch.Tensor) -> torch.Tensor:
    """The reference minimizer of J(·; controls) + ½‖Uᵀθ‖² from θ0 (see the module docstring)."""

    def penalized(theta: torch.Tensor) -> torch.Tensor:
        return objective.value(theta, controls) + 0.5 * (gauge.T @ theta).pow(2).sum()

    gradient_and_value, curvature, gradient = grad_and_value(penalized), hessian(penalized), grad(penalized)

    def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
        g, v = gradient_and_value(torch.from_numpy(x))
        return float(v), g.numpy()

    result = scipy.optimize.minimize(fun, theta0.numpy(), jac=True, method="trust-exact",
                                     hess=lambda x: curvature(torch.from_numpy(x)).numpy(),
                                     options={"gtol": 1e-12, "maxiter": 500})
    theta = torch.from_numpy(result.x)
    # trust-exact stalls near ‖∇J‖ ≈ √(ε|J|λ_min) ≈ 1e-9: the decrease it must confirm drops below the
    # rounding of J. Plain Newton steps, kept while they reduce ‖∇‖, converge quadratically from there.
    g = gradient(theta)
    for _ in range(8):
        trial = theta - torch.from_numpy(np.linalg.solve(curvature(theta).numpy(), g.numpy()))
        g_trial = gradient(trial)
        if not g_trial.norm() < g.norm():
            break
        theta, g = trial, g_trial
    return theta


def shifted(controls: Controls, control: str, delta: float) -> Controls:
    values = controls.to_dict()
    values[control] += delta
    return Controls(**values)


class Surface:
    """θ* at BASE and at each control ± its step, on one mixture objective."""

    def __init__(self, reference_class: bool, sigma: float = 0.0) -> None:
        config = ModelConfig(input_shape=(1, 2, 3), num_classes=3, latent_dim=LATENT, hidden=(),
                             reference_class=reference_class)
        self.model = build_model(config, seed=0).double()
        self.objective = Objective(self.model, DataMixture(small_labeled(12, 1, 0.0), small_labeled(10, 2, 0.5)), samples=2,
                                   sigma=sigma)
        self.gauge = gauge_basis(self.objective)
        self.theta = minimize(self.objective, BASE, self.objective.initial_theta(), self.gauge)
        self.controls = {(None, 0): BASE}
        self.thetas = {(None, 0): self.theta}
        for control, h in STEP.items():
            for sign in (-1, 1):
                c = shifted(BASE, control, sign * h)
                self.controls[control, sign] = c
                self.thetas[control, sign] = minimize(self.objective, c, self.theta, self.gauge)
        self._tangents: dict = {}

    def hessian(self, key=(None, 0)) -> torch.Tensor:
        c = self.controls[key]
        return hessian(lambda th: self.objective.value(th, c))(self.thetas[key])

    def functionals(self, key) -> torch.Tensor:
        """(4,) R, D, C, F = R + λD + γC + σS at θ*(controls[key]) under p(x, t of those controls)."""
        c = self.controls[key]
        rdc = self.objective.functionals(self.thetas[key], c.t).detach()
        return torch.cat([rdc, self.objective.value(self.thetas[key], c).detach().reshape(1)])

    def entropy(self, key) -> torch.Tensor:
        """S = ½‖θ*‖² at controls[key]."""
        return self.objective.weight_entropy(self.thetas[key])

    def finite_difference(self, control: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Central differences of θ* and of (R, D, C, F) in ``control``."""
        h = STEP[control]
        theta = (self.thetas[control, 1] - self.thetas[control, -1]) / (2 * h)
        values = (self.functionals((control, 1)) - self.functionals((control, -1))) / (2 * h)
        return theta, values

    def project(self, v: torch.Tensor) -> torch.Tensor:
        """v without its components along the gauge null space."""
        return v - self.gauge @ (self.gauge.T @ v)

    def tangents(self, method: str):
        if method not in self._tangents:
            with warnings.catch_warnings():
                # the direct solver warns that A is singular (the gauge null space) and uses pinv
                warnings.filterwarnings("ignore", "A is singular to working precision")
                self._tangents[method] = equilibrium_tangents(self.objective, self.theta, BASE,
                                                              exact_solve(self.objective, method), tol=TANGENT_TOL)
        return self._tangents[method]


@pytest.fixture(scope="module", params=[(False, 0.0), (True, 0.0), (True, 1e-2)],
                ids=["full-softmax-head", "reference-class-head", "reference-class-head-sigma"])
def surface(request) -> Surface:
    """Both classifier heads: the full softmax head has the gauge null space U; the default head
    (last logit fixed at 0) has none, so its minimizers are strict and A is non-singular. The third
    case adds eq. 6's σS term (S = ½‖θ‖²): the identities must hold for J = R + λD + γC + σS."""
    return Surface(*request.param)


def relative(got, want) -> float:
    got, want = torch.as_tensor(got), torch.as_tensor(want)
    return float((got - want).norm() / want.norm())


# --- the reference minimizer ---------------------------------------------------------------------

def test_reference_minimizers_are_strict_local_minima_modulo_the_gauge(surface: Surface) -> None:
    objective, u = surface.objective, surface.gauge
    # U is a symmetry of J at any θ: J(θ + s u) = J(θ)
    shifted_theta = surface.theta + u @ torch.linspace(-0.7, 1.1, u.shape[1], dtype=torch.float64)
    assert abs(float(objective.value(shifted_theta, BASE) - objective.value(surface.theta, BASE))) <= 1e-13
    for key, theta in surface.thetas.items():
        c = surface.controls[key]
        g = grad(lambda th: objective.value(th, c))(theta)
        assert g.norm() < GRADIENT_TOL, (key, float(g.norm()))
        assert (u.T @ theta).norm() < 1e-12, key  # the gauge representative
        a = surface.hessian(key)
        eigenvalues = torch.linalg.eigvalsh(a)
        scale = float(eigenvalues[-1])
        # exactly the gauge null space is flat, and it is flat:
        assert int((eigenvalues.abs() <= 1e-10 * scale).sum()) == u.shape[1], (key, eigenvalues[:5])
        assert (a @ u).norm() <= 1e-12 * scale
        # positive definite on its complement: a strict, locally unique minimum modulo U
        fixed = torch.linalg.eigvalsh(a + scale * u @ u.T)
        assert fixed[0] > 1e-6 * scale, (key, fixed[:3])
    # the controls moved the minimizer by much more than its accuracy
    for control in STEP:
        assert (surface.thetas[control, 1] - surface.thetas[control, -1]).norm() > 1e-4


# --- tangents θ_λ, θ_γ, θ_t ------------------------------------------------------------------------

@pytest.mark.parametrize("method", available_solvers())
def test_tangents_match_finite_differences_of_minimizers(surface: Surface, method: str) -> None:
    tangents = surface.tangents(method)
    assert tangents.solve.converged, tangents.solve.summary()
    assert tangents.directions.shape == (surface.theta.numel(), 3)
    for i, control in enumerate(CONTROLS):
        fd, _ = surface.finite_difference(control)
        assert (surface.gauge.T @ fd).norm() <= 1e-6 * fd.norm()  # the gauge-fixed minimizers stay ⟂ U
        direction = surface.project(tangents.directions[:, i])
        assert torch.equal(tangents.direction(control), tangents.directions[:, i])
        error = relative(direction, fd)
        assert error <= TANGENT_RTOL, f"{method}: θ_{control} vs finite difference: relative error {error:.2e}"
        # a flipped sign or a missing factor would be far off
        assert relative(-direction, fd) > 1.9 and relative(2 * direction, fd) > 0.9


def right_hand_sides(surface: Surface) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3) −[∇D, ∇C, ∂_t∇J] under p(x, t) at θ* (eqs. 18, 25), and the (3, N) gradients of R, D, C."""
    source, target = (torch.func.jacrev(part)(surface.theta) for part in surface.objective.parts)  # (3, N)
    mixed = (1 - BASE.t) * source + BASE.t * target
    weights = torch.tensor([1.0, BASE.lam, BASE.gamma], dtype=torch.float64)
    return -torch.stack([mixed[1], mixed[2], weights @ (target - source)], dim=1), mixed


@pytest.mark.parametrize("method", available_solvers())
def test_tangents_match_dense_minimum_norm_solution(surface: Surface, method: str) -> None:
    """θ_s = −A⁺ b_s with the exact dense Hessian and right-hand sides built here (eqs. 18, 25)."""
    a = surface.hessian()
    rhs, mixed = right_hand_sides(surface)
    eigenvalues, vectors = torch.linalg.eigh(a)
    keep = eigenvalues > 1e-10 * eigenvalues[-1]
    exact = (vectors[:, keep] / eigenvalues[keep]) @ (vectors[:, keep].T @ rhs)
    cond = float(eigenvalues[-1] / eigenvalues[keep][0])
    tangents = surface.tangents(method)
    for i in range(3):
        error = relative(surface.project(tangents.directions[:, i]), exact[:, i])
        assert error <= cond * TANGENT_TOL + 1e-12, (method, CONTROLS[i], error, cond)
    assert relative(tangents.gradients, mixed) <= 1e-13


def test_plain_data_set_has_no_t_tangent_and_matches_mixture_at_t0(surface: Surface) -> None:
    """On one data set θ_t = 0; on it, θ_λ and θ_γ equal those of a mixture at t = 0 with the same noise."""
    model, theta = surface.model, surface.theta
    mixture = surface.objective.mixture
    plain = Objective(model, mixture.source, samples=2)
    at_source = Objective(model, mixture, samples=2)
    c = Controls(BASE.lam, BASE.gamma, 0.0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "A is singular to working precision")
        one = equilibrium_tangents(plain, theta, Controls(BASE.lam, BASE.gamma), exact_solve(plain, "direct"))
        two = equilibrium_tangents(at_source, theta, c, exact_solve(at_source, "direct"))
    assert torch.equal(one.directions[:, 2], torch.zeros_like(theta))
    assert torch.equal(one.partials, torch.zeros(3, 3, dtype=torch.float64))
    assert relative(surface.project(one.directions[:, :2]), surface.project(two.directions[:, :2])) <= 1e-10
    assert two.directions[:, 2].norm() > 0


@pytest.mark.parametrize("method", ["cg", "minres"])
def test_warm_start_from_the_solution_needs_no_iterations(surface: Surface, method: str) -> None:
    if method not in available_solvers():
        pytest.skip(f"{method} is not registered")
    exact = surface.tangents("direct").directions
    linear_solve = exact_solve(surface.objective, method)
    linear_solve.remember("tangent", exact)
    tangents = equilibrium_tangents(surface.objective, surface.theta, BASE, linear_solve, tol=1e-10)
    assert tangents.solve.converged and tangents.solve.iterations == 0, tangents.solve.summary()
    assert relative(tangents.directions, exact) <= 1e-14


def test_damped_gauss_newton_tangents_solve_the_damped_ggn_system(surface: Surface) -> None:
    """operator="ggn", damping=μ: X = −(G + μI)⁻¹ [∇D, ∇C, ∂_t∇J] with G the operator's dense GGN (which
    test_curvature checks against an independent dense Gauss–Newton matrix); velocity = X·(λ̇, γ̇, ṫ)."""
    mu = 1e-2
    exact_hessian = surface.tangents("direct")
    tangents = equilibrium_tangents(surface.objective, surface.theta, BASE,
                                    exact_solve(surface.objective, "direct", operator="ggn"), damping=mu)
    g = CurvatureOperator(surface.objective, surface.theta, BASE, kind="ggn").dense()
    rhs, _ = right_hand_sides(surface)
    expected = torch.linalg.solve(g + mu * torch.eye(g.shape[0], dtype=g.dtype), rhs)
    assert relative(tangents.directions, expected) <= 1e-10
    assert relative(tangents.directions, exact_hessian.directions) > 1e-3  # a different operator
    rates = torch.tensor([0.3, -1.2, 0.5], dtype=torch.float64)
    assert relative(tangents.velocity(0.3, -1.2, 0.5), tangents.directions @ rates) <= 1e-15


# --- the free energy F(λ, γ) and its derivatives ----------------------------------------------------

def test_free_energy_first_derivatives_are_d_and_c(surface: Surface) -> None:
    """D = ∂F/∂λ and C = ∂F/∂γ (Remark 7): finite differences of F(λ, γ) = J(θ*(λ, γ))."""
    values = surface.functionals((None, 0))
    sensitivities = surface.tangents("direct").sensitivities()
    for control, index in (("lam", 1), ("gamma", 2)):
        _, fd = surface.finite_difference(control)
        assert abs(fd[3] - values[index]) <= 1e-6 * abs(values[index]), (control, float(fd[3]), float(values[index]))
    assert sensitivities("F", "lam") == pytest.approx(float(values[1]), rel=1e-12)
    assert sensitivities("F", "gamma") == pytest.approx(float(values[2]), rel=1e-12)
    # and along t: dF/dt = J_target − J_source at θ* (envelope theorem)
    _, fd = surface.finite_difference("t")
    assert sensitivities("F", "t") == pytest.approx(float(fd[3]), rel=1e-6)


@pytest.mark.parametrize("method", available_solvers())
def test_free_energy_hessian_is_symmetric_negative_semidefinite(surface: Surface, method: str) -> None:
    """Hess F = [[D_λ, D_γ], [C_λ, C_γ]] (eq. 29): symmetric, ⪯ 0 (Lemma 3), and C_γ < 0."""
    hess = surface.tangents(method).sensitivities().free_energy_hessian()
    assert hess.shape == (2, 2)
    assert abs(hess[0, 1] - hess[1, 0]) <= 1e-8 * abs(hess[0, 1]), hess  # D_γ = C_λ
    eigenvalues = torch.linalg.eigvalsh((hess + hess.T) / 2)
    assert eigenvalues[-1] <= 0, hess
    assert hess[1, 1] < 0 and hess[0, 0] < 0, hess


@pytest.mark.parametrize("method", available_solvers())
def test_sensitivities_match_finite_differences_of_reequilibrated_functionals(surface: Surface, method: str) -> None:
    """Every X_s, X ∈ {R, D, C, F}, s ∈ {λ, γ, t} (eqs. 21, 27, 30): in particular D_λ, D_γ, C_λ, C_γ of
    the free-energy Hessian and C_t of the transfer process, against (X(s + h) − X(s − h)) / 2h at the
    re-equilibrated θ*(s ± h) under p(x, t ± h)."""
    matrix = surface.tangents(method).sensitivities().matrix
    assert matrix.shape == (len(FUNCTIONALS), len(CONTROLS))
    for j, control in enumerate(CONTROLS):
        _, fd = surface.finite_difference(control)
        for i, functional in enumerate(FUNCTIONALS):
            error = abs(float(matrix[i, j] - fd[i]))
            assert error <= SENSITIVITY_RTOL * abs(float(fd[i])), (
                f"{method}: {functional}_{control} = {float(matrix[i, j]):.10g}, finite difference "
                f"{float(fd[i]):.10g}, relative error {error / abs(float(fd[i])):.2e}")


@pytest.mark.parametrize("control", ["lam", "gamma"])
def test_first_law(surface: Surface, control: str) -> None:
    """dR = −λ dD − γ dC − σ dS (eq. 7) between the re-equilibrated models at control ± h."""
    d = surface.functionals((control, 1)) - surface.functionals((control, -1))
    d_entropy = surface.entropy((control, 1)) - surface.entropy((control, -1))
    residual = d[0] + BASE.lam * d[1] + BASE.gamma * d[2] + surface.objective.sigma * d_entropy
    assert abs(residual) <= 1e-5 * abs(d[0]), (control, float(residual), float(d[0]))
    # not trivially: each term moved by much more than the residual allows
    assert min(abs(d[0]), BASE.lam * abs(d[1]), BASE.gamma * abs(d[2])) > 1e-5, d
