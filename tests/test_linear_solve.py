"""The run's LinearSolve against dense references: every registered preconditioner, the reused
preconditioner, warm starts, unconverged solves, checkpoint/restore; the engine's tolerances and
step acceptance; bad linear-algebra input through the CLI."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.func import jacrev

from quasistatic import Controls, ModelConfig, Objective, build_model
from quasistatic.cli import main
from quasistatic.continuation.correctors import make_corrector
from quasistatic.continuation.engine import EngineConfig, QuasiStaticEngine, StepSizeError
from quasistatic.errors import InputError
from quasistatic.integrators import make_integrator
from quasistatic.linalg import (LinearSolve, LinearSolveConfig, SolveResult, available_preconditioners,
                                dense_hessian, make_preconditioner)
from quasistatic.linalg.preconditioners import CholeskyPreconditioner
from quasistatic.linalg.linear_solve import NEGATIVE
from quasistatic.continuation.polish import polish, require_equilibrium
from quasistatic.processes import make_process
from quasistatic.continuation.tangents import equilibrium_tangents
from small_problem import register_small_dataset, small_labeled

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

SIGMA = 1e-2
START = Controls(1.0, 4.0)


def small_objective() -> Objective:
    model = build_model(ModelConfig(input_shape=(1, 2, 3), num_classes=3, latent_dim=1, hidden=()), seed=0).double()
    return Objective(model, small_labeled(12, 1, 0.0), samples=2, sigma=SIGMA)


@pytest.fixture(scope="module")
def surface():
    objective = small_objective()
    result = polish(LinearSolve(objective), objective.initial_theta(), START, grad_tol=1e-10)
    require_equilibrium(result, 1e-10)
    return objective, result.theta.detach()


def tangent_rhs(objective, theta):
    """−[∇D, ∇C] (N, 2)."""
    gradients = jacrev(objective.functionals)(theta.detach())
    return -torch.stack([gradients[1], gradients[2]], dim=1).detach()


def reference(objective, theta, controls, rhs):
    hessian = dense_hessian(objective, theta, controls).detach().numpy()
    return np.linalg.solve(hessian, rhs.numpy())


def nearby(theta, scale, seed):
    """θ + a fixed random perturbation of norm ``scale`` (still well inside the convex basin)."""
    direction = torch.randn(theta.shape, generator=torch.Generator().manual_seed(seed), dtype=theta.dtype)
    return theta + scale * direction / torch.linalg.vector_norm(direction)


def relative_error(x, ref):
    x = x.detach().numpy() if isinstance(x, torch.Tensor) else x
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


# 1. every registered preconditioner, CG and MINRES, against numpy.linalg.solve


@pytest.mark.parametrize("solver", ["cg", "minres"])
@pytest.mark.parametrize("name", available_preconditioners())
def test_every_preconditioner_solves_the_dense_system(surface, name, solver):
    objective, theta = surface
    controls = Controls(1.02, 4.0)  # off the point the problem was polished at: a generic SPD system
    theta = nearby(theta, 1e-2, seed=3)
    rhs = tangent_rhs(objective, theta)
    options = {"rank": 4} if name == "deflation" else {}  # the tiny model has n = 30 parameters
    ls = LinearSolve(objective, LinearSolveConfig(solver=solver, preconditioner=name, preconditioner_sample=0.5,
                                                  preconditioner_options=options))
    result = ls.solve(theta, controls, rhs, tol=1e-10, kind="tangent")
    assert result.converged, (name, solver, result.relative_residual)
    assert ls.stats.builds == 1 and ls.preconditioner is not None
    error = relative_error(result.solution, reference(objective, theta, controls, rhs))
    assert error <= 1e-8, (name, solver, error)


# 2. a preconditioner built at another point still gives the exact tangents


def test_reused_preconditioner_gives_the_exact_tangents(surface):
    objective, theta1 = surface
    c1, c2 = START, Controls(1.05, 4.1)
    theta2 = nearby(theta1, 2e-2, seed=5)
    ls = LinearSolve(objective, LinearSolveConfig(preconditioner="dense", preconditioner_sample=0.5))
    ls.rebuild(theta1, c1)
    tangents = equilibrium_tangents(objective, theta2, c2, ls, tol=1e-10)
    assert tangents.solve.converged
    expected = reference(objective, theta2, c2, tangent_rhs(objective, theta2))
    assert relative_error(tangents.directions[:, :2], expected) <= 1e-6
    assert torch.count_nonzero(tangents.directions[:, 2]) == 0  # θ_t = 0 on a single data set
    assert ls.stats.builds == 1  # reused, not rebuilt at (θ2, c2)


# 3. reused + warm-started solves on slowly changing systems cost fewer products than cold ones


def test_reuse_and_warm_starts_cost_fewer_products_than_cold_solves(surface):
    objective, theta = surface
    systems = []
    for j in range(10):
        theta_j = nearby(theta, 1e-3 * j, seed=7) if j else theta
        controls_j = Controls(1.0 + 0.01 * j, 4.0)
        systems.append((theta_j, controls_j, tangent_rhs(objective, theta_j)))
    references = [reference(objective, *system) for system in systems]

    kept = LinearSolve(objective, LinearSolveConfig(preconditioner="dense", preconditioner_sample=0.1))
    before = objective.work.hvps
    for (theta_j, controls_j, rhs), ref in zip(systems, references):
        result = kept.solve(theta_j, controls_j, rhs, tol=1e-10, kind="tangent")
        assert result.converged and relative_error(result.solution, ref) <= 1e-8
    reused = objective.work.hvps - before

    before = objective.work.hvps
    for (theta_j, controls_j, rhs), ref in zip(systems, references):
        cold = LinearSolve(objective, LinearSolveConfig(preconditioner="none"))
        result = cold.solve(theta_j, controls_j, rhs, tol=1e-10, kind="tangent", warm=False)
        assert result.converged and relative_error(result.solution, ref) <= 1e-8
    fresh = objective.work.hvps - before

    # the same reuse without the warm starts: the warm starts alone also save products
    unwarmed = LinearSolve(objective, LinearSolveConfig(preconditioner="dense", preconditioner_sample=0.1))
    before = objective.work.hvps
    for theta_j, controls_j, rhs in systems:
        assert unwarmed.solve(theta_j, controls_j, rhs, tol=1e-10, kind="tangent", warm=False).converged
    reused_cold_start = objective.work.hvps - before

    print(f"operator products: reused+warm {reused:g}, reused without warm starts {reused_cold_start:g}, "
          f"cold {fresh:g} (builds {kept.stats.builds})")
    assert kept.stats.builds < 10
    assert reused < fresh, (reused, fresh)
    assert reused < reused_cold_start, (reused, reused_cold_start)


# 4. the engine holds its stated tolerances at every accepted step


@pytest.mark.parametrize("drift_tol", [1e-3, 1e-6])
def test_engine_holds_drift_and_gradient_tolerances(surface, drift_tol):
    objective, theta = surface
    grad_tol = 1e-8
    process = make_process("iso-classification", START, lam_end=1.1)
    engine = QuasiStaticEngine(objective, process, make_integrator("euler"), make_corrector("newton"),
                               EngineConfig(steps=4, drift_tol=drift_tol, grad_tol=grad_tol), LinearSolve(objective))
    state = engine.start(theta, START)
    c0 = objective.report(theta, START.t).C
    drifts, grads, reports = [], [], []

    def on_step(report):
        reports.append(report)
        drifts.append(abs(objective.report(report.state.theta, report.state.controls.t).C - c0) / c0)
        grads.append(float(torch.linalg.vector_norm(objective.gradient(report.state.theta, report.state.controls))))

    final = engine.run(state, on_step)
    assert final.controls.lam == pytest.approx(1.1)
    assert len(reports) >= 4 and all(r.correction.converged for r in reports)
    print(f"drift_tol {drift_tol:g}: drifts {max(drifts):.3e}, grad norms {max(grads):.3e}")
    assert max(drifts) <= drift_tol, drifts
    assert max(grads) <= grad_tol, grads


# 5. a step whose full-data check fails is never accepted


def _never_converging_newton():
    """A newton corrector whose every correction reports failure (the full-data check said no)."""
    corrector = make_corrector("newton")
    original = corrector.correct
    corrector.correct = lambda *args, **kwargs: replace(original(*args, **kwargs), converged=False)
    return corrector


@pytest.mark.parametrize("corrector, config", [
    (_never_converging_newton, EngineConfig(steps=4, min_step=0.2)),  # the correction reports failure
    (lambda: make_corrector("newton", max_iter=1), EngineConfig(steps=4, grad_tol=1e-30, min_step=0.2)),  # grad_tol out of reach
], ids=["correction-fails", "grad-tol-unreachable"])
def test_a_step_that_fails_its_check_is_not_accepted(surface, corrector, config):
    objective, theta = surface
    process = make_process("iso-classification", START, lam_end=1.1)
    engine = QuasiStaticEngine(objective, process, make_integrator("euler"), corrector(), config, LinearSolve(objective))
    calls = []
    with pytest.raises(StepSizeError):
        engine.run(engine.start(theta, START), calls.append)
    assert calls == []


# 6. unconverged solves are reported, and a tangent solve that does not converge fails the step


def test_unconverged_solve_is_reported(surface):
    objective, theta = surface
    ls = LinearSolve(objective, LinearSolveConfig(max_iter=1, preconditioner="none"))
    result = ls.solve(theta, START, tangent_rhs(objective, theta), tol=1e-12, kind="tangent")
    assert not result.converged
    assert float(result.relative_residual.max()) > 1e-12
    assert ls.stats.unconverged == 1 and ls.stats.solves == 1 and ls.stats.retries == 0


def test_engine_refuses_an_unconverged_tangent_solve(surface):
    objective, theta = surface
    process = make_process("iso-classification", START, lam_end=1.1)
    ls = LinearSolve(objective, LinearSolveConfig(max_iter=1, preconditioner="none"))
    engine = QuasiStaticEngine(objective, process, make_integrator("euler"), make_corrector("newton"),
                               EngineConfig(steps=4, tangent_tol=1e-12, min_step=0.2), ls)
    calls = []
    with pytest.raises(StepSizeError, match="tangent solve did not converge"):
        engine.run(engine.start(theta, START), calls.append)
    assert calls == []
    assert ls.stats.unconverged >= 1


# 7. bad linear-algebra input through the CLI

SMALL = register_small_dataset()

BASE = ["--dataset", SMALL, "--hidden", "", "--latent-dim", "1", "--samples", "2", "--sigma", "1e-2",
        "--lam", "1", "--gamma", "4", "--epochs", "30", "--batch-size", "4", "--no-progress",
        "--grad-tol", "1e-9", "--drift-tol", "1e-10", "--tangent-tol", "1e-12", "--lam-end", "1.1", "--steps", "2"]


@pytest.mark.parametrize("extra, messages", [
    (["--preconditioner", "nosuch"], ["preconditioner must be one of", *available_preconditioners(), "'nosuch'"]),
    (["--drift-tol", "0"], ["drift-tol must be a number > 0, got 0"]),
    (["--grad-tol", "-1"], ["grad-tol must be a number > 0, got -1"]),
    (["--preconditioner-sample", "0"], ["preconditioner-sample must be a number in (0, 1], got 0"]),
    (["--at-fold", "sideways"], ["at-fold must be one of {arclength, jump, stop}, got 'sideways'"]),
    (["--eigen-iterations", "-1"], ["eigen-iterations must be an integer >= 0, got -1"]),
    (["--whitening", "zca"], ["whitening must be one of", "auto", "kfac", "'zca'"]),
    (["--preconditioner", "dense", "--hidden", "64,64"], ["preconditioner 'dense' must be at most max_size = 6000",
                                                          "'cholesky' (up to 20,000 parameters)", "kfac"]),
    (["--preconditioner", "cholesky", "--hidden", "128,128"], ["preconditioner 'cholesky' must be at most max_size = "
                                                               "20000", "kfac", "got 35212"]),
    (["--whitening", "cholesky"], ["whitening must be one of", "kfac", "'cholesky'"]),
])
def test_bad_linear_algebra_input_exits_2_and_writes_nothing(tmp_path, capsys, extra, messages):
    out = tmp_path / "run"
    assert main(["iso-classification", *BASE, *extra, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("quasistatic: error:") and "\n" not in err, err
    for message in messages:
        assert message in err, (message, err)
    assert not out.exists()


def test_dense_preconditioner_refuses_a_model_above_its_size_limit(surface):
    objective, theta = surface
    assert theta.numel() > 5
    with pytest.raises(InputError, match="kfac") as caught:
        make_preconditioner("dense", objective, theta, START, max_size=5)
    assert str(theta.numel()) in str(caught.value)
    make_preconditioner("dense", objective, theta, START, max_size=theta.numel())  # at the limit: built


# 8. checkpoint / restore


def test_restored_linear_solve_continues_bit_identically(surface):
    objective, theta = surface
    config = LinearSolveConfig(preconditioner="dense", preconditioner_sample=0.5)
    points = [(nearby(theta, 1e-3 * j, seed=11), Controls(1.0 + 0.01 * j, 4.0)) for j in range(4)]
    original = LinearSolve(objective, config)
    for theta_j, controls_j in points[:2]:
        original.solve(theta_j, controls_j, tangent_rhs(objective, theta_j), tol=1e-8, kind="tangent")
    saved = original.checkpoint()

    restored = LinearSolve(objective, config)
    restored.restore(saved)
    assert restored.stats.builds == original.stats.builds + 1  # the rebuild is counted
    assert restored.stats.solves == original.stats.solves
    for theta_j, controls_j in points[2:]:
        rhs = tangent_rhs(objective, theta_j)
        a = original.solve(theta_j, controls_j, rhs, tol=1e-8, kind="tangent")
        b = restored.solve(theta_j, controls_j, rhs, tol=1e-8, kind="tangent")
        assert a.iterations == b.iterations
        assert torch.equal(a.solution, b.solution)
        assert torch.equal(a.relative_residual, b.relative_residual)
    assert restored.stats.iterations == original.stats.iterations


def test_the_polish_whitening_resolves_to_kfac_beside_dense_and_kfac_and_to_the_solves_own_otherwise():
    assert LinearSolveConfig().resolved(100).whitening == "kfac"
    assert LinearSolveConfig().resolved(100).preconditioner == "dense"
    assert LinearSolveConfig(preconditioner="kfac").resolved(100).whitening == "kfac"
    assert LinearSolveConfig(preconditioner="none").resolved(100).whitening == "none"
    assert LinearSolveConfig(whitening="dense").resolved(100).whitening == "dense"
    with pytest.raises(InputError, match="max_size"):
        LinearSolveConfig(preconditioner="kfac", whitening="dense").resolved(10_000)


def test_a_whitening_build_is_counted_and_leaves_the_solves_preconditioner_alone(surface):
    objective, theta = surface
    linear_solve = LinearSolve(objective, LinearSolveConfig(preconditioner="dense", whitening="kfac"))
    controls = START
    kept = linear_solve.current(theta, controls)
    before = objective.work.gradient_equivalents
    whitening = linear_solve.whitening(theta, controls)
    assert whitening is not kept and linear_solve.current(theta, controls) is kept
    assert linear_solve.stats.builds == 2 and objective.work.gradient_equivalents > before


def test_forgotten_warm_starts_make_the_next_solve_a_cold_one(surface):
    """After a jump the last solutions belong to the branch left behind: ``forget`` drops them, and
    the next solve is the one a cold start gives (same iterations, same solution)."""
    objective, theta = surface
    rhs = tangent_rhs(objective, theta)
    kept = LinearSolve(objective, LinearSolveConfig(preconditioner="kfac"))
    far = nearby(theta, 0.5, seed=3)
    assert kept.solve(far, START, tangent_rhs(objective, far), tol=1e-8, kind="tangent").converged
    assert kept.solve(far, START, rhs[:, :1].contiguous(), tol=1e-8, kind="newton").converged
    kept.forget("tangent", "newton", "never solved")
    assert kept.last("tangent") is None and kept.last("newton") is None
    forgotten = kept.solve(theta, START, rhs, tol=1e-2, kind="tangent")
    cold = kept.solve(theta, START, rhs, tol=1e-2, kind="tangent", warm=False)
    assert forgotten.iterations == cold.iterations > 0
    assert torch.equal(forgotten.solution, cold.solution)


def test_a_warm_start_that_does_not_converge_is_retried_from_zero(surface, monkeypatch):
    """An unconverged warm-started solve is retried once from 0 (counted in ``stats.retries``), and
    the retry's result is returned: the solution numpy.linalg.solve gives."""
    import quasistatic.linalg.linear_solve as module

    objective, theta = surface
    rhs = tangent_rhs(objective, theta)
    linear_solve = LinearSolve(objective, LinearSolveConfig(preconditioner="none"))
    assert linear_solve.solve(theta, START, rhs, tol=1e-10, kind="tangent").converged
    starts, real = [], module.solve

    def stalled_when_warm(operator, rhs, *, x0=None, max_iter, **kwargs):  # a warm start that stalls
        starts.append(x0)
        return real(operator, rhs, x0=x0, max_iter=1 if x0 is not None else max_iter, **kwargs)

    monkeypatch.setattr(module, "solve", stalled_when_warm)
    retries = linear_solve.stats.retries
    result = linear_solve.solve(theta, START, rhs, tol=1e-12, kind="tangent")
    assert [x0 is None for x0 in starts] == [False, True] and linear_solve.stats.retries == retries + 1
    assert result.converged and linear_solve.stats.unconverged == 0
    assert relative_error(result.solution, reference(objective, theta, START, rhs)) < 1e-8


# 9. the cholesky preconditioner: P = A + μI with the smallest shift of its sequence, and its place in "auto"


def _symmetric(eigenvalues, seed):
    """Q diag(eigenvalues) Qᵀ, Q a random orthogonal matrix (float64)."""
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=generator, dtype=torch.float64))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T


def test_cholesky_of_a_positive_definite_matrix_is_unshifted_and_inverts_it():
    matrix = _symmetric([1e-5, 1e-3, 0.5, 2.0, 30.0], seed=1)
    preconditioner = CholeskyPreconditioner(matrix.clone())
    assert preconditioner.shift == 0 and preconditioner.attempts == 1 and preconditioner.positive_definite
    block = torch.randn(5, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    expected = np.linalg.solve(matrix.numpy(), block.numpy())
    assert relative_error(preconditioner.apply(block), expected) <= 1e-8  # the soft 1e-5 kept, not floored
    assert relative_error(preconditioner.apply(block[:, :1]), expected[:, :1]) <= 1e-8


def test_cholesky_of_an_indefinite_matrix_takes_the_first_sufficient_shift_of_its_sequence():
    eigenvalues = [-3e-4, 1e-4, 0.5, 2.0, 4.0]
    matrix = _symmetric(eigenvalues, seed=3)
    scale = float(matrix.diagonal().abs().max())
    sequence = [0.0] + [1e-8 * scale * 10**k for k in range(12)]
    expected_shift = next(mu for mu in sequence if min(eigenvalues) + mu > 0)  # eigenvalues of A + μI, exactly
    preconditioner = CholeskyPreconditioner(matrix.clone())
    assert not preconditioner.positive_definite
    assert preconditioner.shift == pytest.approx(expected_shift, rel=1e-9)
    assert preconditioner.attempts == sequence.index(expected_shift) + 1
    block = torch.eye(5, dtype=torch.float64)
    assert relative_error(preconditioner.apply(block), np.linalg.inv(matrix.numpy() + expected_shift * np.eye(5))) <= 1e-8


def test_auto_resolves_dense_then_kfac_by_size_and_cholesky_is_built_on_the_whole_data():
    small, large = (LinearSolveConfig().resolved(n) for n in (6_000, 6_001))
    assert (small.preconditioner, small.preconditioner_sample) == ("dense", 0.25)
    assert (large.preconditioner, large.preconditioner_sample) == ("kfac", 0.25)
    middle = LinearSolveConfig(preconditioner="cholesky").resolved(18_337)
    assert (middle.preconditioner_sample, middle.whitening) == (1.0, "kfac")
    assert LinearSolveConfig(preconditioner="cholesky", preconditioner_sample=0.5).resolved(10).preconditioner_sample == 0.5
    with pytest.raises(InputError, match="cholesky' must be at most max_size = 20000"):
        LinearSolveConfig(preconditioner="cholesky").resolved(20_001)
    with pytest.raises(InputError, match="whitening must be one of") as caught:
        LinearSolveConfig(whitening="cholesky")
    assert "'cholesky'" in str(caught.value) and "kfac" in str(caught.value)


def _converged(iterations, residual=1e-10):
    """A converged one-column SolveResult of ``iterations`` reaching ``residual`` (10 decades)."""
    return SolveResult(torch.zeros(3, 1), iterations, iterations, torch.tensor([residual]), torch.tensor([False]), True)


def test_a_preconditioner_is_rebuilt_only_once_its_extra_products_have_paid_for_the_build(surface):
    """Rent or buy: after the reference solve (10 iterations for 10 decades), solves of 50 iterations
    (5× the effort, past stale_factor 4) mark P stale only once the GE they spent beyond the reference
    effort — 1 − 10/50 = 80 % of each — add up to the build's cost."""
    objective, theta = surface
    linear_solve = LinearSolve(objective, LinearSolveConfig(preconditioner="dense", preconditioner_sample=1.0))
    linear_solve.rebuild(theta, START)
    build = linear_solve._build_cost
    assert build == theta.numel() + 1  # n HVPs and the gradient-sized pass they share
    linear_solve._judge(_converged(10), spent=10.0)  # the reference effort: 1 iteration per decade
    spent = 0.3 * build  # each dearer solve leaves 0.24 × the build's cost of excess
    for solve in range(1, 6):
        linear_solve._judge(_converged(50), spent=spent)
        assert linear_solve._excess == pytest.approx(0.8 * spent * solve)
        assert linear_solve._stale == (0.8 * spent * solve >= build), solve  # stale at the 5th, not the 1st
    assert linear_solve._stale
    cheap = LinearSolve(objective, LinearSolveConfig(preconditioner="dense", preconditioner_sample=1.0))
    cheap.rebuild(theta, START)
    cheap._judge(_converged(10), spent=10.0)
    cheap._judge(_converged(30), spent=spent)  # 3× the effort: below stale_factor, whatever the excess
    cheap._judge(_converged(30), spent=10 * build)
    assert not cheap._stale


def test_cholesky_refuses_a_non_finite_hessian_and_deflation_refuses_it_as_base(surface):
    matrix = _symmetric([1.0, 2.0, 3.0], seed=4)
    matrix[0, 1] = float("nan")
    with pytest.raises(InputError, match="must be finite"):
        CholeskyPreconditioner(matrix)
    objective, theta = surface
    with pytest.raises(InputError, match="deflation base must be a preconditioner other than 'deflation' and "
                                         "'cholesky', got 'cholesky'"):
        make_preconditioner("deflation", objective, theta, START, base="cholesky", rank=2)


def test_the_preconditioner_sample_is_a_number_from_construction_on():
    assert LinearSolveConfig().preconditioner_sample == 0.25  # as in config.json of runs before 2026-12-02
    assert LinearSolveConfig(preconditioner="cholesky").to_dict()["preconditioner_sample"] == 1.0


# 10. truncated solves (the Newton corrector's): no MINRES fallback, no retries, a per-solve cap


def test_a_truncated_solve_stops_at_negative_curvature_where_a_full_one_falls_back_to_minres():
    """At the random initial θ the Hessian has two negative eigenvalues (numpy): a full solve meets
    negative curvature in CG and is redone with MINRES, which solves the indefinite system as numpy
    does; a truncated solve returns CG's stop as it is, counted as truncated, not as unconverged,
    with no retry and fewer products."""
    objective = small_objective()
    theta = objective.initial_theta()
    hessian = dense_hessian(objective, theta, START).detach().numpy()
    assert (np.linalg.eigvalsh(hessian) < 0).sum() == 2
    rhs = tangent_rhs(objective, theta)
    config = LinearSolveConfig(preconditioner="none")

    full = LinearSolve(objective, config)
    before = objective.work.gradient_equivalents
    result = full.solve(theta, START, rhs, tol=1e-10, kind="newton")
    full_cost = objective.work.gradient_equivalents - before
    assert result.converged and full.stats.retries >= 1 and full.stats.truncated == 0
    assert relative_error(result.solution, np.linalg.solve(hessian, rhs.numpy())) < 1e-8

    truncated = LinearSolve(objective, config)
    before = objective.work.gradient_equivalents
    result = truncated.solve(theta, START, rhs, tol=1e-10, kind="newton", truncate=True)
    truncated_cost = objective.work.gradient_equivalents - before
    assert bool(result.negative_curvature.any()) and not result.converged
    assert (truncated.stats.truncated, truncated.stats.unconverged, truncated.stats.retries) == (1, 0, 0)
    assert truncated_cost < full_cost


def test_a_truncated_solve_stopped_by_the_cap_is_returned_without_retries(surface):
    """A truncated solve that reaches the config's ``max_iter`` returns what it reached there,
    counted as truncated; the same solve untruncated is retried from 0 (warm-started) and counted
    as unconverged."""
    objective, theta = surface
    rhs = tangent_rhs(objective, theta)
    for truncate in (True, False):
        linear_solve = LinearSolve(objective, LinearSolveConfig(preconditioner="none", max_iter=3))
        linear_solve.remember("newton", torch.zeros_like(rhs))
        result = linear_solve.solve(theta, START, rhs, tol=1e-14, kind="newton", truncate=truncate)
        assert result.iterations == 3 and not result.converged
        stats = linear_solve.stats
        assert (stats.truncated, stats.unconverged, stats.retries) == ((1, 0, 0) if truncate else (0, 1, 1))


# 11. the λ_min tracking starts from the last tangent solve's columns as well as the tracked eigenvector


@pytest.mark.parametrize("preconditioner", ["none", "kfac"])
def test_eigen_tracking_sees_a_negative_eigenvalue_that_the_tracked_eigenvector_alone_misses(preconditioner):
    """At the random initial θ (eigenvalues −1.03, −0.084, 0.0034, …, by numpy), 8 LOBPCG
    iterations warm-started from a slightly perturbed eigenvector of a positive eigenvalue stay on
    it; with the last tangent solve's columns A⁻¹b in the start block they find a negative Ritz
    value (a certificate: Ritz values bound the smallest eigenvalue from above), and without a
    preconditioner the smallest eigenvalue itself. One pair is returned and kept."""
    objective = small_objective()
    theta = objective.initial_theta()
    hessian = dense_hessian(objective, theta, START).detach().numpy()
    eigenvalues, eigenvectors = np.linalg.eigh(hessian)
    tracked = eigenvectors[:, 4:5] + 1e-4 * np.random.default_rng(0).standard_normal((theta.numel(), 1))
    tangents = torch.from_numpy(np.linalg.solve(hessian, tangent_rhs(objective, theta).numpy()))
    values = []
    for with_tangents in (False, True):
        linear_solve = LinearSolve(objective, LinearSolveConfig(preconditioner=preconditioner))
        if with_tangents:
            linear_solve.remember("tangent", tangents)
        linear_solve.remember("eigenvector", torch.from_numpy(tracked.copy()))
        pairs = linear_solve.smallest_eigenpairs(theta, START, count=1, iterations=8)
        assert pairs.values.shape == (1,) and linear_solve.last("eigenvector").shape == (theta.numel(), 1)
        values.append(float(pairs.values[0]))
    assert values[0] == pytest.approx(eigenvalues[4], rel=1e-4) and values[1] < 0
    if preconditioner == "none":
        assert values[1] == pytest.approx(eigenvalues[0], rel=1e-4)


@pytest.mark.parametrize("preconditioner", ["none", "kfac"])
def test_eigen_tracking_starts_from_the_negative_curvature_a_solve_met(preconditioner):
    """At the random initial θ (eigenvalues −1.03, −0.084, 0.0034, … by numpy) 8 LOBPCG iterations
    from a perturbed eigenvector of the positive 5th eigenvalue stay on it; after a truncated solve
    that met negative curvature (no tangent kept) they start from the direction it met too and
    return a negative Ritz value, bounded below by numpy's λ_min. The direction is used once."""
    objective = small_objective()
    theta = objective.initial_theta()
    hessian = dense_hessian(objective, theta, START).detach().numpy()
    eigenvalues, eigenvectors = np.linalg.eigh(hessian)
    tracked = eigenvectors[:, 4:5] + 1e-4 * np.random.default_rng(0).standard_normal((theta.numel(), 1))
    values = []
    for after_a_solve in (False, True):
        linear_solve = LinearSolve(objective, LinearSolveConfig(preconditioner=preconditioner))
        linear_solve.remember("eigenvector", torch.from_numpy(tracked.copy()))
        if after_a_solve:
            rhs = tangent_rhs(objective, theta)
            met = linear_solve.solve(theta, START, rhs, tol=1e-10, kind="newton", truncate=True)
            assert bool(met.negative_curvature.any()) and linear_solve.last("tangent") is None
        values.append(float(linear_solve.smallest_eigenpairs(theta, START, count=1, iterations=8).values[0]))
        assert linear_solve.last(NEGATIVE) is None
    assert values[0] == pytest.approx(eigenvalues[4], rel=1e-4)
    assert eigenvalues[0] - 1e-10 <= values[1] < 0
