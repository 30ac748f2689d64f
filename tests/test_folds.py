"""Folds on a toy surface with an analytic saddle-node, run through the real engine.

J(x, y; λ) = x⁴/4 − x²/2 + y²/2 + λ(x + y/10) (R = x⁴/4 − x²/2 + y²/2, D = x + y/10, C = 0):
the equilibria are x³ − x + λ = 0, y = −λ/10, and the Hessian is diag(3x² − 1, 1). The right
branch of minima, from (x, λ) = (1, 0), ends in a fold at x = 1/√3, λ_f = 2/(3√3), where
λ_min = 3x² − 1 falls to 0.
"""

import csv
import dataclasses
import json
import logging
import math

import numpy as np
import pytest
import torch

from quasistatic import Controls, ModelConfig, Objective, build_model
from quasistatic.continuation.correctors import Correction, make_corrector
from quasistatic.continuation.engine import (
    REJECTION_REASONS,
    EngineConfig,
    EngineState,
    FoldError,
    QuasiStaticEngine,
    StepReport,
    StepSizeError,
)
from quasistatic.continuation.folds import Fold, Jump, StabilityPoint, jump_past, locate_fold
from quasistatic.experiments.rundir import RunDirectory
from quasistatic.experiments.trajectory import TrajectoryRecorder
from small_problem import small_labeled, toy_objective as functional_objective
from quasistatic.integrators import make_integrator
from quasistatic.linalg import LinearSolve, LinearSolveConfig
from quasistatic.continuation.polish import NotOnSurfaceError, polish, require_equilibrium
from quasistatic.processes import make_process

LAMBDA_FOLD = 2 / (3 * math.sqrt(3))
START = Controls(0.0, 1.0)


def _toy(theta):
    x, y = theta[0], theta[1]
    return torch.stack([x**4 / 4 - x**2 / 2 + y**2 / 2, x + y / 10, torch.zeros_like(x)])


def toy_objective() -> Objective:
    """An Objective whose (R, D, C) is the toy's (the engine sees nothing else)."""
    return functional_objective(_toy, 2)


def branch_x(lam: float) -> float:
    """x on the right branch of x³ − x + λ = 0 (the largest real root)."""
    return max(r.real for r in np.roots([1, 0, -1, lam]) if abs(r.imag) < 1e-12)


def toy_engine(at_fold: str) -> QuasiStaticEngine:
    """The engine on the toy from λ = 0 to λ = 0.5, past the fold at 0.385 (a fresh linear solve)."""
    objective = toy_objective()
    return QuasiStaticEngine(objective, make_process("free", START, lam_rate=0.5), make_integrator("hermite"),
                             make_corrector("newton"),
                             EngineConfig(steps=10, grad_tol=1e-12, min_step=1e-7, at_fold=at_fold),
                             LinearSolve(objective, LinearSolveConfig(preconditioner="none", preconditioner_sample=1.0)))


def toy_run(at_fold: str):
    """The engine from (x, y) = (1, 0) at λ = 0 to λ = 0.5; (error or None, states, reports)."""
    engine = toy_engine(at_fold)
    state = engine.start(torch.tensor([1.0, 0.0], dtype=torch.float64), START)
    reports = []
    try:
        engine.run(state, reports.append)
    except FoldError as error:
        return error, [state] + [r.state for r in reports], reports
    return None, [state] + [r.state for r in reports], reports


def run_to_the_fold():
    error, states, _ = toy_run("stop")
    assert error is not None
    return error, states


def toy_j(x: float, y: float, lam: float) -> float:
    return x**4 / 4 - x**2 / 2 + y**2 / 2 + lam * (x + y / 10)


def test_jump_lands_on_the_other_branch_and_books_the_analytic_dissipation():
    error, states, reports = toy_run("jump")
    assert error is None and states[-1].s == pytest.approx(1.0)
    assert sum(r.jump is not None for r in reports) == 1
    index = next(i for i, r in enumerate(reports) if r.jump is not None)
    jump, before, after = reports[index].jump, states[index], reports[index].state  # before: the right branch's last
    assert reports[index].rejected >= 1  # the collapsed tries before the jump are in its row, with why
    assert set(reports[index].rejections) <= set(REJECTION_REASONS)
    assert jump.fold.lam == pytest.approx(LAMBDA_FOLD, rel=1e-6)
    lam_past = after.controls.lam
    assert LAMBDA_FOLD < lam_past < LAMBDA_FOLD + 1e-3
    left = branch_x_left(lam_past)
    x_before, y_before = (float(v) for v in before.theta)
    expected = toy_j(x_before, y_before, lam_past) - toy_j(left, -lam_past / 10, lam_past)
    assert jump.dissipation == pytest.approx(expected, abs=1e-8) and jump.dissipation > 0.1
    assert float(after.theta[0]) == pytest.approx(left, abs=1e-9)
    assert jump.lambda_min == pytest.approx(min(3 * left**2 - 1, 1.0), abs=1e-9)
    assert jump.distance == pytest.approx(math.hypot(left - x_before, -lam_past / 10 - y_before), abs=1e-9)
    # after the jump the engine follows the left branch to λ = 0.5
    assert float(states[-1].theta[0]) == pytest.approx(branch_x_left(0.5), abs=1e-9)


def branch_x_left(lam: float) -> float:
    return min(r.real for r in np.roots([1, 0, -1, lam]) if abs(r.imag) < 1e-12)


def test_the_fold_is_located_at_the_analytic_value():
    error, states = run_to_the_fold()
    fold = error.fold
    assert fold.lam == pytest.approx(LAMBDA_FOLD, rel=1e-6)
    assert fold.s == pytest.approx(LAMBDA_FOLD / 0.5, rel=1e-6)
    assert fold.uncertainty < 1e-4 and abs(fold.s - LAMBDA_FOLD / 0.5) <= 10 * fold.uncertainty + 1e-9
    assert fold.last_accepted_s <= LAMBDA_FOLD / 0.5 <= fold.failed_s
    assert f"lambda={fold.lam:.8g}" in str(error) and "fold" in str(error)
    assert states[-1].controls.lam < LAMBDA_FOLD  # every accepted point is on the branch, before the fold


def test_lambda_min_is_tracked_exactly_along_the_branch():
    _, states = run_to_the_fold()
    for state in states[::5]:
        x = branch_x(state.controls.lam)
        assert float(state.theta[0]) == pytest.approx(x, abs=1e-9)
        assert state.stability[-1].s == state.s
        assert state.stability[-1].lambda_min == pytest.approx(min(3 * x * x - 1, 1.0), abs=1e-9)


def test_no_fold_is_claimed_when_lambda_min_does_not_fall():
    rising = (StabilityPoint(0.1, 1.0, 1.0, 0.0, 0.2), StabilityPoint(0.2, 1.1, 1.0, 0.0, 0.3))
    assert locate_fold(rising, 0.3) is None
    assert locate_fold(rising[:1], 0.3) is None
    barely = (StabilityPoint(0.0, 1.0, 1.0, 0.0, 1.0), StabilityPoint(0.01, 1.01, 1.0, 0.0, 0.999999))
    assert locate_fold(barely, 0.0101) is None  # its zero (s ≈ 5000) is not where the steps collapsed
    falling = (StabilityPoint(0.0, 1.0, 2.0, 0.0, 2.0), StabilityPoint(0.5, 1.5, 3.0, 0.0, 1.0))
    fold = locate_fold(falling, 0.6)  # λ_min² 4 → 1 over Δs 0.5: reaches 0 at s = 0.5 + 1/6
    assert fold.s == pytest.approx(0.5 + 1 / 6) and fold.lam == pytest.approx(1.5 + 1 / 6)
    assert fold.gamma == pytest.approx(3.0 + 1 / 3) and math.isnan(fold.uncertainty)


def test_a_jump_and_an_unstable_point_are_recorded(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="quasistatic")
    model = build_model(ModelConfig(input_shape=(1, 2, 3), num_classes=3, latent_dim=1, hidden=()), seed=0).double()
    objective = Objective(model, small_labeled(12, 1, 0.0), samples=1, sigma=1e-2)
    run = RunDirectory(tmp_path / "run")
    run.prepare()
    recorder = TrajectoryRecorder(run, objective, objective)
    theta, controls = objective.initial_theta(), Controls(1.2, 4.0)
    fold = Fold(s=0.49, lam=1.19, gamma=4.0, t=0.0, last_accepted_s=0.48, last_lambda_min=1e-4, failed_s=0.495,
                uncertainty=1e-6)
    jump = Jump(fold, s=0.5, distance=1.5, dissipation=0.25, lambda_min=0.01)
    state = EngineState(theta, controls, s=0.5, step=3)
    tries = ("corrector", "branch-hop", "corrector")
    recorder.on_step(StepReport(state, Correction(theta, controls, 0, 0, 0.0, 0.0, True), 0, tries, jump))
    saddle = EngineState(theta, controls, s=0.6, step=4, stability=(StabilityPoint(0.6, 1.2, 4.0, 0.0, -1e-3),))
    recorder.on_step(StepReport(saddle, Correction(theta, controls, 0, 0, 0.0, 0.0, True), 0))
    with run.file("trajectory.csv").open() as f:
        row, unstable = list(csv.DictReader(f))
    assert row["event"] == "jump" and float(row["jump_distance"]) == 1.5 and float(row["dissipation"]) == 0.25
    assert row["rejected_steps"] == "3" and row["rejected_because"] == "corrector:2;branch-hop:1"
    assert unstable["rejected_steps"] == "0" and unstable["rejected_because"] == ""
    assert unstable["event"] == "unstable" and float(unstable["lambda_min"]) == -1e-3 and unstable["dissipation"] == ""
    (saved,) = json.loads(run.file("jumps.json").read_text())
    assert saved["dissipation"] == 0.25 and saved["fold"]["lam"] == 1.19 and saved["s"] == 0.5
    assert "lambda=1.19" in caplog.text  # logged by quasistatic.experiments.trajectory (the CLI shows it on stderr)


def test_a_sign_change_of_lambda_min_between_two_points_is_located_at_its_zero():
    crossed = (StabilityPoint(0.0, 1.0, 2.0, 0.0, 3e-4), StabilityPoint(0.1, 1.1, 2.0, 0.0, 2e-4),
               StabilityPoint(0.2, 1.2, 2.0, 0.0, -2e-4))
    fold = locate_fold(crossed, 0.21)
    assert fold.s == pytest.approx(0.15) and fold.lam == pytest.approx(1.15)


def test_a_run_resumed_after_the_jump_ends_where_the_uninterrupted_one_does():
    """The state saved after the jump (θ on the new branch, its stability history, no previous
    point) is all a fresh engine needs to go on: same end point to 1e-9."""
    _, states, reports = toy_run("jump")
    index = next(i for i, r in enumerate(reports) if r.jump is not None)
    resumed = toy_engine("jump").run(reports[index].state)
    assert resumed.s == pytest.approx(1.0) and resumed.controls.lam == pytest.approx(0.5)
    assert torch.allclose(resumed.theta, states[-1].theta, rtol=0, atol=1e-9)


def test_a_jump_that_relaxes_back_onto_the_followed_branch_is_refused():
    """A collapse of the steps that is not a fold (here: a made-up fold on the right branch at
    λ = 0.2, far from the real one): the relaxation returns to the minimum the run was on, within
    grad_tol/λ_min, and the jump is refused instead of booked as a transition."""
    objective = toy_objective()
    linear_solve = LinearSolve(objective, LinearSolveConfig(preconditioner="none", preconditioner_sample=1.0))
    x = branch_x(0.2)
    theta = torch.tensor([x, -0.02], dtype=torch.float64)
    points = (StabilityPoint(0.3, 0.15, 1.0, 0.0, 3 * branch_x(0.15) ** 2 - 1),
              StabilityPoint(0.4, 0.2, 1.0, 0.0, 3 * x**2 - 1))
    fold = Fold(s=0.4, lam=0.2, gamma=1.0, t=0.0, last_accepted_s=0.4, last_lambda_min=3 * x**2 - 1, failed_s=0.4,
                uncertainty=0.0)
    with pytest.raises(FoldError, match="returned to the branch it left"):
        jump_past(fold, points, theta, linear_solve, make_corrector("newton"), make_process("free", START, lam_rate=0.5),
                  None, grad_tol=1e-10, drift_tol=1e-9, eigen_iterations=8)


@pytest.mark.parametrize("at_fold", ["stop", "jump"])
def test_a_step_accepted_on_a_saddle_is_a_fold_from_the_last_minimum(monkeypatch, at_fold):
    """A constrained path can pass smoothly through the point where A is singular (the corrector
    converges to a saddle): λ_min changed sign between two accepted points. ``stop`` names the
    fold at the zero of λ_min between them; ``jump`` jumps from the last minimum, not the saddle."""
    engine = toy_engine(at_fold)
    start = engine.start(torch.tensor([1.0, 0.0], dtype=torch.float64), START)  # λ_min = min(3 − 1, 1) = 1
    saddle = EngineState(start.theta, Controls(0.1, 1.0), s=0.2, step=1,
                         stability=(*start.stability, StabilityPoint(0.2, 0.1, 1.0, 0.0, -0.1)))
    accepted = Correction(saddle.theta, saddle.controls, 1, 0, 0.0, 0.0, True)
    monkeypatch.setattr(engine, "_step", lambda state: StepReport(saddle, accepted, 0, ("corrector", "tangent")))
    jumps = []

    def fake_jump(state, fold, rejections, points=None):
        jumps.append((state, fold, rejections))
        return StepReport(EngineState(state.theta, Controls(0.5, 1.0), s=1.0, step=2), accepted, 0, rejections)

    monkeypatch.setattr(engine, "_jump", fake_jump)
    if at_fold == "stop":
        with pytest.raises(FoldError, match="ended on a saddle") as caught:
            engine.run(start)
        fold, rejected = caught.value.fold, caught.value.rejections
    else:
        engine.run(start)
        (state, fold, rejected), = jumps
        assert state is start
    assert fold.s == pytest.approx(0.2 / 1.1) and fold.last_accepted_s == 0.0 and fold.failed_s == 0.2
    assert rejected == ("corrector", "tangent")


def test_a_jump_from_a_saddle_step_extrapolates_through_the_saddle(monkeypatch):
    """Just after a start (or a jump) the state's stability history has one point: the jump past a
    fold that the next step crossed extrapolates the controls through that point and the saddle's
    (on digits its one-point history raised an IndexError in folds._controls_at)."""
    engine = toy_engine("jump")
    start = engine.start(torch.tensor([1.0, 0.0], dtype=torch.float64), START)
    assert len(start.stability) == 1
    saddle = EngineState(start.theta, Controls(0.1, 1.0), s=0.2, step=1,
                         stability=(*start.stability, StabilityPoint(0.2, 0.1, 1.0, 0.0, -0.1)))
    accepted = Correction(saddle.theta, saddle.controls, 1, 0, 0.0, 0.0, True)
    monkeypatch.setattr(engine, "_step", lambda state: StepReport(saddle, accepted, 0, ()))
    seen = []

    def fake_jump_past(fold, points, theta, *args, **kwargs):
        seen.append(points)
        raise FoldError("stop here", fold)

    monkeypatch.setattr("quasistatic.continuation.engine.jump_past", fake_jump_past)
    with pytest.raises(FoldError, match="stop here"):
        engine.run(start)
    (points,) = seen
    assert [p.s for p in points] == [0.0, 0.2] and points[-1].lambda_min == -0.1


@pytest.mark.parametrize("at_fold", ["stop", "jump"])
def test_a_saddle_missed_by_the_tracking_is_found_by_the_next_tangent_solve(at_fold):
    """The tracked λ_min can follow another eigenvector while the path goes onto saddles (on digits:
    5.6e-4 tracked where the tangent solve met negative curvature). The next step's tangent solve
    meets the negative curvature; λ_min refined there is < 0, so the fold lies between the last
    two points: ``stop`` names it, ``jump`` relaxes from the saddle at its controls and books the
    analytic dissipation."""
    engine = toy_engine(at_fold)
    lam = 0.3  # below the fold (0.385): minima at x ≈ 0.79 and x ≈ −1.15, the saddle between
    x_saddle = sorted(r.real for r in np.roots([1, 0, -1, lam]) if abs(r.imag) < 1e-12)[1]
    saddle = torch.tensor([x_saddle, -lam / 10], dtype=torch.float64)
    assert 3 * x_saddle**2 - 1 < -0.5
    missed = (StabilityPoint(0.5, 0.25, 1.0, 0.0, 0.2), StabilityPoint(0.6, lam, 1.0, 0.0, 0.1))  # tracked > 0
    state = EngineState(saddle, Controls(lam, 1.0), s=0.6, step=6, h=0.05, stability=missed)
    if at_fold == "stop":
        with pytest.raises(FoldError, match="is a saddle") as caught:
            engine.run(state)
        fold = caught.value.fold
    else:
        reports = []
        engine.run(state, reports.append)
        jump = reports[0].jump
        assert jump is not None and jump.s == 0.6
        x = float(reports[0].state.theta[0])
        assert x in (pytest.approx(branch_x(lam)), pytest.approx(min(r.real for r in np.roots([1, 0, -1, lam]))))
        assert jump.dissipation == pytest.approx(toy_j(x_saddle, -lam / 10, lam) - toy_j(x, -lam / 10, lam), abs=1e-8)
        assert jump.dissipation > 0 and jump.lambda_min > 0
        fold = jump.fold
    assert 0.5 < fold.s < 0.6 and fold.last_lambda_min < 0 and fold.failed_s == fold.last_accepted_s == 0.6


def test_the_refined_lambda_min_is_not_fooled_by_a_tracked_vector_of_another_eigenvalue():
    """One tracked vector can sit on another eigenvector than the smallest (on digits at λ 1.91675 it
    read 1.9e-3 where the smallest eigenvalue was −7.1e-6). The refinement runs a block of
    EIGEN_BLOCK vectors and finds the smallest; the tracking then follows it."""
    scales = torch.tensor([-0.5, 2.0, 3.0, 5.0, 7.0, 11.0], dtype=torch.float64)
    objective = functional_objective(lambda th: torch.stack([0.5 * (scales * th**2).sum(), th[0] * 0, th[0] * 0]), 6)
    engine = QuasiStaticEngine(objective, make_process("free", START, lam_rate=0.5), make_integrator("hermite"),
                               make_corrector("newton"), EngineConfig(steps=10),
                               LinearSolve(objective, LinearSolveConfig(preconditioner="none", preconditioner_sample=1.0)))
    theta = torch.zeros(6, dtype=torch.float64)
    wrong = torch.zeros(6, 1, dtype=torch.float64)
    wrong[1] = 1.0  # the eigenvector of 2.0
    engine.linear_solve.remember("eigenvector", wrong)
    state = EngineState(theta, START, s=0.3, stability=(StabilityPoint(0.3, 0.0, 1.0, 0.0, 2.0),))
    assert engine._lambda_min(state, 8) == pytest.approx(2.0)  # one vector stays where it was put
    refined = engine._refined(state).stability[-1].lambda_min
    assert refined == pytest.approx(-0.5, abs=1e-8)
    assert engine._lambda_min(state, 8) == pytest.approx(-0.5, abs=1e-8)  # tracked from the refined block


class _ShiftedCorrector:
    """The newton corrector, with its result moved by ``shift`` (as Newton converging farther away)."""

    adapts_step = True

    def __init__(self, shift: float) -> None:
        self.inner, self.shift = make_corrector("newton"), shift

    def correct(self, *args, **kwargs) -> Correction:
        correction = self.inner.correct(*args, **kwargs)
        moved = correction.theta + torch.tensor([self.shift, 0.0], dtype=correction.theta.dtype)
        return dataclasses.replace(correction, theta=moved)


def _shifted_engine(refined: float, tracked: float) -> QuasiStaticEngine:
    """The engine on the toy with corrections moved 0.5 off (grad_tol 1), whose tracked λ_min reads
    ``tracked`` and whose refined one (more iterations) reads ``refined``."""
    objective = toy_objective()
    engine = QuasiStaticEngine(objective, make_process("free", START, lam_rate=0.5), make_integrator("hermite"),
                               _ShiftedCorrector(0.5), EngineConfig(steps=10, grad_tol=1.0, min_step=1e-3),
                               LinearSolve(objective, LinearSolveConfig(preconditioner="none",
                                                                        preconditioner_sample=1.0)))
    tracking = engine.config.eigen_iterations
    engine._lambda_min = lambda state, iterations, count=1: refined if iterations > tracking else tracked
    return engine


def test_a_branch_hop_check_that_finds_a_saddle_is_a_fold_at_the_start_of_the_step():
    """Where the refinement of the branch-hop check finds λ_min ≤ 0 at the step's start, the step is
    not accepted: the point is a saddle, a fold lies between it and the point before."""
    engine = _shifted_engine(refined=-0.5, tracked=100.0)
    state = engine.start(torch.tensor([1.0, 0.0], dtype=torch.float64), START)
    state = dataclasses.replace(state, s=0.1, stability=(StabilityPoint(0.0, 0.0, 1.0, 0.0, 1.0),
                                                          dataclasses.replace(state.stability[-1], s=0.1)))
    with pytest.raises(FoldError, match="is a saddle") as caught:
        engine._step(state)
    assert caught.value.fold.s == pytest.approx(0.1 / 1.5) and caught.value.fold.failed_s == 0.1


@pytest.mark.parametrize("refined_is_true", [True, False])
def test_the_branch_hop_guard_refines_lambda_min_before_rejecting(refined_is_true):
    """A correction that moves θ by 0.5 with grad_tol 1: within grad_tol/λ_min = 1 of the true λ_min
    (1 at the start), not of a tracked value 100× too large (0.01). The guard refines λ_min before
    rejecting, and accepts; where the refined value is as wrong, every try is a branch hop and the
    steps collapse with the reasons counted in the error."""
    engine = _shifted_engine(refined=1.0 if refined_is_true else 100.0, tracked=100.0)
    state = engine.start(torch.tensor([1.0, 0.0], dtype=torch.float64), START)
    assert state.stability[-1].lambda_min == 100.0
    if refined_is_true:
        report = engine._step(state)
        assert report.rejections == () and report.state.s > 0
        assert report.state.stability[-2].lambda_min == 1.0  # the start's point, refined
    else:
        with pytest.raises(StepSizeError, match=r"tries rejected: branch-hop:\d+") as caught:
            engine._step(state)
        assert not isinstance(caught.value, FoldError)


# the polish leaves saddles: at λ = 0 the toy's critical points are x ∈ {−1, 0, 1}, y = 0; (0, 0) is a
# saddle (Hessian diag(−1, 1)) where ∇J = 0 exactly


@pytest.mark.parametrize("preconditioner", ["none", "dense"])
def test_the_polish_leaves_a_saddle_along_its_negative_curvature_for_a_minimum(preconditioner, caplog):
    """From the saddle (0, 0), whose gradient already meets any tolerance, the polish probes,
    meets negative curvature, steps downhill along e_x and lands on a minimum x = ±1 (J = −1/4,
    Hessian diag(2, 1)); without the probe it returns the saddle itself."""
    saddle = torch.zeros(2, dtype=torch.float64)
    config = LinearSolveConfig(preconditioner=preconditioner, preconditioner_sample=1.0, whitening=preconditioner)
    objective = toy_objective()
    kept = polish(LinearSolve(objective, config), saddle, START, grad_tol=1e-10, probe_iterations=0)
    assert torch.equal(kept.theta, saddle) and (kept.escapes, kept.saddle) == (0, False)
    with caplog.at_level(logging.INFO, logger="quasistatic.continuation.polish"):
        result = polish(LinearSolve(objective, config), saddle, START, grad_tol=1e-10)
    assert result.converged and (result.escapes, result.saddle) == (1, False)
    assert "on a saddle of J (lambda_min <= -1.000e+00" in caplog.text
    assert abs(float(result.theta[0])) == pytest.approx(1.0, abs=1e-9) and abs(float(result.theta[1])) < 1e-9
    assert float(objective.value(result.theta, START)) == pytest.approx(-0.25, abs=1e-12)
    require_equilibrium(result, 1e-10)


def test_a_polish_that_may_not_escape_refuses_to_start_from_the_saddle():
    """With no escape allowed the probe still reports the saddle, and no process starts there."""
    objective = toy_objective()
    result = polish(LinearSolve(objective, LinearSolveConfig(preconditioner="none", preconditioner_sample=1.0)),
                    torch.zeros(2, dtype=torch.float64), START, grad_tol=1e-10, escapes=0)
    assert result.converged and (result.escapes, result.saddle) == (0, True)
    with pytest.raises(NotOnSurfaceError, match="ends on a saddle"):
        require_equilibrium(result, 1e-10)
