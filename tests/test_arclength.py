"""Pseudo-arclength continuation through both folds of an analytic S-curve, and the bordered solve.

Toy: R = x⁴/4 − x²/2 + y²/2 − x, D = x + y/10, C = 0, so J = R + λD has the equilibria
λ = 1 + x − x³, y = −λ/10 (an S-curve in (λ, x)) and the Hessian diag(3x² − 1, 1). From λ = 0.25
to 1.75 (the free process, λ̇ = 1.5) the upper branch of minima ends in a fold at x = 1/√3,
λ = 1 + 2/(3√3); the curve turns back along saddles (one negative eigenvalue) to the fold at
x = −1/√3, λ = 1 − 2/(3√3), and goes on along the lower branch of minima to λ = 1.75.
"""

import math

import numpy as np
import pytest
import torch

from quasistatic import Controls, Objective
from quasistatic.continuation.arclength import require_residual_form
from quasistatic.continuation.correctors import make_corrector
from quasistatic.continuation.engine import EngineConfig, QuasiStaticEngine
from quasistatic.errors import InputError
from quasistatic.integrators import make_integrator
from quasistatic.linalg import LinearSolve, LinearSolveConfig
from quasistatic.linalg.bordered import solve_bordered
from quasistatic.processes import make_process
from small_problem import toy_objective

FOLD_UP, FOLD_DOWN = 1 + 2 / (3 * math.sqrt(3)), 1 - 2 / (3 * math.sqrt(3))
START = Controls(0.25, 1.0)


def _s_curve(theta):
    x, y = theta[0], theta[1]
    return torch.stack([x**4 / 4 - x**2 / 2 + y**2 / 2 - x, x + y / 10, torch.zeros_like(x)])


def s_curve_objective() -> Objective:
    return toy_objective(_s_curve, 2)


def root(lam: float, which: str) -> float:
    """x on the upper ("max") or lower ("min") branch of x³ − x + (λ − 1) = 0."""
    real = [r.real for r in np.roots([1, 0, -1, lam - 1]) if abs(r.imag) < 1e-10]
    return max(real) if which == "max" else min(real)


def run_s_curve(at_fold: str = "arclength"):
    objective = s_curve_objective()
    engine = QuasiStaticEngine(objective, make_process("free", START, lam_rate=1.5), make_integrator("hermite"),
                               make_corrector("newton"),
                               EngineConfig(steps=10, grad_tol=1e-12, min_step=1e-7, at_fold=at_fold),
                               LinearSolve(objective, LinearSolveConfig(preconditioner="none",
                                                                        preconditioner_sample=1.0)))
    x0 = root(START.lam, "max")
    state = engine.start(torch.tensor([x0, -START.lam / 10], dtype=torch.float64), START)
    reports = []
    final = engine.run(state, reports.append)
    return state, reports, final


@pytest.fixture(scope="module")
def s_curve():
    return run_s_curve()


def test_arclength_traces_the_whole_s_curve_through_both_folds(s_curve):
    _, reports, final = s_curve
    assert final.s == 1.0 and final.controls.lam == pytest.approx(1.75, abs=1e-12)
    assert float(final.theta[0]) == pytest.approx(root(1.75, "min"), abs=1e-9)
    for report in reports:
        x, y = (float(v) for v in report.state.theta)
        lam = report.state.controls.lam
        assert lam == pytest.approx(START.lam + 1.5 * report.state.s, abs=1e-12)
        assert abs(1 + x - x**3 - lam) <= 1e-6 * abs(lam) and y == pytest.approx(-lam / 10, abs=1e-9)
    xs = [float(r.state.theta[0]) for r in reports]
    assert max(xs) > 1 / math.sqrt(3) and min(xs) < -1 / math.sqrt(3)  # both stable branches visited
    assert any(abs(x) < 0.3 for x in xs)  # and the saddle branch between them


def test_arclength_locates_both_turning_points_analytically(s_curve):
    _, reports, _ = s_curve
    folds = [r.fold for r in reports if r.fold is not None]
    assert len(folds) == 2
    assert folds[0].lam == pytest.approx(FOLD_UP, rel=1e-6) and folds[1].lam == pytest.approx(FOLD_DOWN, rel=1e-6)
    at = [r for r in reports if r.fold is not None]
    assert float(at[0].state.theta[0]) == pytest.approx(1 / math.sqrt(3), abs=1e-3)
    assert float(at[1].state.theta[0]) == pytest.approx(-1 / math.sqrt(3), abs=1e-3)


def test_rows_between_the_folds_are_saddles_with_one_negative_eigenvalue(s_curve):
    _, reports, _ = s_curve
    saddles = 0
    for report in reports:
        point = report.state.stability[-1]
        x = float(report.state.theta[0])
        assert point.lambda_min == pytest.approx(min(3 * x * x - 1, 1.0), abs=1e-8)
        if report.state.arclength is not None and report.fold is None:
            assert point.negative == (1 if 3 * x * x < 1 else 0)
            saddles += point.negative
    assert saddles >= 3


def test_arclength_needs_a_residual_form():
    process = make_process("iso-classification", Controls(1.0, 10.0), alpha=0.5)
    with pytest.raises(InputError, match="residual form.*iso-c-rate"):
        require_residual_form(process)
    assert make_process("geodesic-transfer", Controls(1.0, 10.0), slope=1.0).residual_form() is None
    form = make_process("iso-classification", Controls(1.0, 10.0), lam_end=2.0).residual_form()
    assert form.solves_gamma and form.controls(0.5, 12.0) == Controls(1.5, 12.0)


@pytest.mark.parametrize("preconditioned", [False, True])
def test_bordered_solve_matches_numpy_where_a_is_singular(preconditioned):
    rng = np.random.default_rng(3)
    n, m = 40, 2
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    eigenvalues = np.concatenate([[0.0, -0.5], rng.uniform(0.1, 10, n - 2)])  # singular and indefinite
    a = (q * eigenvalues) @ q.T
    u, v, w = rng.standard_normal((n, m)), rng.standard_normal((n, m)), rng.standard_normal((m, m))
    full = np.block([[a, u], [v.T, w]])
    rhs = rng.standard_normal(n + m)
    expected = np.linalg.solve(full, rhs)
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    p_inverse = t((q / np.maximum(np.abs(eigenvalues), 0.1)) @ q.T)
    result = solve_bordered(lambda block: t(a) @ block, t(u), t(v), t(w), t(rhs), tol=1e-12,
                            preconditioner=(lambda block: p_inverse @ block) if preconditioned else None)
    assert result.converged
    np.testing.assert_allclose(result.solution.numpy(), expected, rtol=1e-8, atol=1e-8 * np.abs(expected).max())
    if preconditioned:  # P⁻¹ from |A| floored: M_P⁻¹M is the identity plus rank 2 or so
        assert result.iterations <= 6


def test_a_run_resumed_on_the_saddle_branch_ends_where_the_uninterrupted_one_does(s_curve):
    """The saved state of a continuation step (θ, s, γ and the tangent with the step length) is all a
    fresh engine needs: resumed between the folds, it ends at the same point to 1e-9."""
    _, reports, final = s_curve
    middle = next(r.state for r in reports if r.state.stability[-1].negative == 1 and r.fold is None)
    objective = s_curve_objective()
    engine = QuasiStaticEngine(objective, make_process("free", START, lam_rate=1.5), make_integrator("hermite"),
                               make_corrector("newton"),
                               EngineConfig(steps=10, grad_tol=1e-12, min_step=1e-7, at_fold="arclength"),
                               LinearSolve(objective, LinearSolveConfig(preconditioner="none",
                                                                        preconditioner_sample=1.0)))
    resumed = engine.run(middle)
    assert resumed.s == 1.0 and torch.allclose(resumed.theta, final.theta, rtol=0, atol=1e-9)


def test_fold_and_saddle_rows_are_recorded(tmp_path, s_curve, caplog, monkeypatch):
    import csv
    import json
    import logging

    import quasistatic.experiments.trajectory as trajectory
    from quasistatic.experiments.rundir import RunDirectory
    caplog.set_level(logging.INFO, logger="quasistatic")
    _, reports, _ = s_curve
    monkeypatch.setattr(trajectory, "measure", lambda *args, **kwargs: {})  # the toy has no data to measure on
    run = RunDirectory(tmp_path / "run")
    run.prepare()
    recorder = trajectory.TrajectoryRecorder(run, s_curve_objective(), None)
    turning = next(i for i, r in enumerate(reports) if r.fold is not None)
    for report in reports[turning:turning + 2]:
        recorder.on_step(report)
    with run.file("trajectory.csv").open() as f:
        fold_row, saddle_row = list(csv.DictReader(f))
    assert fold_row["event"] == "fold" and saddle_row["event"] == "unstable"
    assert fold_row["parametrization"] == saddle_row["parametrization"] == "theta-s-gamma"  # Keller's, the default
    assert saddle_row["negative_eigenvalues"] == "1" and float(saddle_row["lambda_min"]) < 0
    (saved,) = json.loads(run.file("folds.json").read_text())
    assert saved["lam"] == pytest.approx(FOLD_UP, rel=1e-6)
    assert "turned at a fold" in caplog.text  # logged by quasistatic.experiments.trajectory (the CLI: on stderr)


def test_bordered_solve_falls_back_when_the_preconditioners_schur_complement_vanishes():
    """A = 2I with P = I: S = W − VᵀP⁻¹U = 1 − 1 = 0 (M_P singular) while M is not (its Schur
    complement is 1/2); the block-diagonal fallback still solves M x = r exactly."""
    n = 5
    a = 2 * torch.eye(n, dtype=torch.float64)
    e1 = torch.zeros(n, 1, dtype=torch.float64)
    e1[0] = 1.0
    corner = torch.ones(1, 1, dtype=torch.float64)
    rhs = torch.arange(1.0, n + 2, dtype=torch.float64)
    result = solve_bordered(lambda block: a @ block, e1, e1, corner, rhs, tol=1e-12)
    full = torch.cat([torch.cat([a, e1], 1), torch.cat([e1.T, corner], 1)])
    assert result.converged and torch.allclose(result.solution, torch.linalg.solve(full, rhs), atol=1e-10)
