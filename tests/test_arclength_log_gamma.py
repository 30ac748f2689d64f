"""Pseudo-arclength in the controls (s, log γ) (``arclength="s-log-gamma"``) on an analytic
iso-classification transfer (eqs. 26–28) whose γ rises steeply at t = 0, as on digits 0–4 → 5–9.

Toy: θ = (x, y), R = (x² + y²)/2, D = (y − x)²/2 on both parts, C = e^{−x} on the source and
e^{b−x} on the target, so that under p(x, t) (eq. 23) C = e^{−x}(1 − t + te^b). Holding C = C0 =
e^{−x₀} fixes x(t) = x₀ + log(1 − t + te^b); the surface ∇θJ = 0 gives y = λx/(1 + λ) and
γ(t) = x(t)(1 + λ/(1 + λ))/C0. With b = 5, λ = 1, x₀ = 1: γ rises from 4.08 at ~600 per unit t at
t = 0 (d log γ/dt ≈ 147) and ends at 24.5.
"""

import math

import pytest
import torch

from quasistatic import Controls
from quasistatic.continuation.arclength import PseudoArclength, require_residual_form
from quasistatic.continuation.correctors import make_corrector
from quasistatic.continuation.engine import EngineConfig, QuasiStaticEngine
from quasistatic.errors import InputError
from quasistatic.integrators import make_integrator
from quasistatic.linalg import LinearSolve, LinearSolveConfig
from quasistatic.processes import make_process
from small_problem import toy_mixture_objective

B, LAM, X0 = 5.0, 1.0, 1.0
C0 = math.exp(-X0)
SCALE = 1 + LAM / (1 + LAM)  # γ = x · SCALE / C0 on the surface


def x_of(t: float) -> float:
    return X0 + math.log(1 - t + t * math.exp(B))


def gamma_of(t: float) -> float:
    return x_of(t) * SCALE / C0


def _part(shift: float):
    def functionals(theta):
        x, y = theta[0], theta[1]
        return torch.stack([(x**2 + y**2) / 2, (y - x) ** 2 / 2, torch.exp(shift - x)])

    return functionals


def run_transfer(coordinates: str, steps: int = 10):
    """The transfer followed by arclength from its start, in ``coordinates``: (start, reports, end)."""
    objective = toy_mixture_objective(_part(0.0), _part(B), 2)
    start = Controls(LAM, gamma_of(0.0))
    engine = QuasiStaticEngine(
        objective,
        make_process("iso-classification-transfer", start),
        make_integrator("hermite"),
        make_corrector("newton"),
        EngineConfig(steps=steps, grad_tol=1e-11, drift_tol=1e-11, min_step=1e-7, at_fold="arclength",
                     arclength=coordinates),
        LinearSolve(objective, LinearSolveConfig(preconditioner="none", preconditioner_sample=1.0)),
    )
    state = engine.start(torch.tensor([X0, LAM * X0 / (1 + LAM)], dtype=torch.float64), start)
    assert state.target == pytest.approx(C0, rel=1e-15)
    continued = engine._arclength.begin(state, engine.control.h_max)
    reports = []
    end = engine.run(continued, reports.append)
    return continued, reports, end


@pytest.fixture(scope="module")
def log_gamma_run():
    return run_transfer("s-log-gamma")


def test_the_transfer_reaches_t_1_on_the_closed_form(log_gamma_run):
    _, reports, end = log_gamma_run
    assert end.s == 1.0 and end.controls.t == 1.0
    assert end.controls.gamma == pytest.approx(gamma_of(1.0), rel=1e-9)
    for report in reports:
        t, (x, y) = report.state.controls.t, (float(v) for v in report.state.theta)
        assert report.state.controls.lam == LAM and t == pytest.approx(report.state.s, abs=1e-15)
        assert x == pytest.approx(x_of(t), rel=1e-9) and y == pytest.approx(LAM * x / (1 + LAM), rel=1e-9)
        assert report.state.controls.gamma == pytest.approx(gamma_of(t), rel=1e-9)
        assert report.state.arclength.coordinates == "s-log-gamma"


def test_each_step_moves_the_controls_by_at_most_the_nominal_step(log_gamma_run):
    """Δσ is measured in (s, log γ): no step moves γ by more than a factor e^h (h = 1/steps); the
    steep start (d log γ/dt ≈ 147) is taken in steps of log γ, not of t."""
    start, reports, _ = log_gamma_run
    h = 0.1
    assert start.arclength.max_step == h
    assert start.arclength.tangent[-2:].norm() == pytest.approx(1.0, abs=1e-12)
    points = [start, *(r.state for r in reports)]
    for a, b in zip(points[:-1], points[1:]):
        d_s, d_log = b.s - a.s, math.log(b.controls.gamma / a.controls.gamma)
        assert math.hypot(d_s, d_log) <= 1.05 * h
    first = math.log(gamma_of(0.05) / gamma_of(0.0))  # log γ gains 1.27 by t = 0.05 ...
    assert sum(1 for p in points if p.s <= 0.05) >= first / h  # ... in at least 12 steps
    total = math.log(gamma_of(1.0) / gamma_of(0.0))
    assert len(reports) >= math.hypot(1.0, total) / h


def test_keller_coordinates_reach_the_same_end():
    _, reports, end = run_transfer("theta-s-gamma")
    assert end.s == 1.0 and end.controls.gamma == pytest.approx(gamma_of(1.0), rel=1e-9)
    assert all(r.state.arclength.coordinates == "theta-s-gamma" for r in reports)


def test_log_gamma_coordinates_need_a_constraint_that_fixes_gamma():
    free = make_process("free", Controls(1.0, 2.0), lam_rate=1.0)
    with pytest.raises(InputError, match="s-log-gamma needs a process whose constraint fixes gamma"):
        require_residual_form(free, "s-log-gamma")
    assert require_residual_form(free).solves_gamma is False
    with pytest.raises(InputError, match=r"arclength coordinates must be one of"):
        require_residual_form(free, "log-s")
    with pytest.raises(InputError, match=r"arclength must be one of \{s-log-gamma, theta-s-gamma\}"):
        EngineConfig(arclength="log")


def test_a_state_continues_only_in_its_own_coordinates(log_gamma_run):
    _, reports, _ = log_gamma_run
    middle = reports[len(reports) // 2].state
    objective = toy_mixture_objective(_part(0.0), _part(B), 2)
    other = PseudoArclength(LinearSolve(objective, LinearSolveConfig(preconditioner="none", preconditioner_sample=1.0)),
                            make_process("iso-classification-transfer", Controls(LAM, gamma_of(0.0))),
                            grad_tol=1e-11, drift_tol=1e-11, max_iter=6, min_step=1e-7, eigen_iterations=8)
    with pytest.raises(InputError, match="must be the continued state's 's-log-gamma', got 'theta-s-gamma'"):
        other.step(middle)
