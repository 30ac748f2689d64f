"""The quasi-static engine on a small model whose equilibrium is reached to rounding.

The model (6 pixels, a linear encoder and decoder, a one-dimensional latent, σ = 1e-2) is small
enough that every tangent solve converges to 1e-12, so the drift of a pure ODE integration is the
integrator's truncation error and its convergence order can be fitted.
"""

import math
import warnings

import numpy as np
import pytest
import torch

from quasistatic import Controls, DataMixture, ModelConfig, Objective, build_model
from quasistatic.continuation.correctors import available_correctors, make_corrector
from quasistatic.continuation.engine import EngineConfig, QuasiStaticEngine, StepSizeError, first_law_residual
from quasistatic.errors import InputError
from quasistatic.integrators import available_integrators, make_integrator
from quasistatic.linalg import LinearSolve
from quasistatic.continuation.polish import NotOnSurfaceError, polish, require_equilibrium
from quasistatic.processes import ConstraintProcess, SingularConstraintError, make_process
from small_problem import small_labeled

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

SIGMA = 1e-2
START = Controls(1.0, 4.0)
LAM_END = 1.1
TIGHT = {"tangent_tol": 1e-12, "drift_tol": 1e-12}


def small_objective(mixture: bool = False) -> Objective:
    model = build_model(ModelConfig(input_shape=(1, 2, 3), num_classes=3, latent_dim=1, hidden=()), seed=0).double()
    data = DataMixture(small_labeled(12, 1, 0.0), small_labeled(12, 1, 0.3)) if mixture else small_labeled(12, 1, 0.0)
    return Objective(model, data, samples=2, sigma=SIGMA)


@pytest.fixture(scope="module")
def surface():
    objective = small_objective()
    result = polish(LinearSolve(objective), objective.initial_theta(), START, grad_tol=1e-10)
    require_equilibrium(result, 1e-10)
    return objective, result.theta


def run(objective, theta, process, integrator="rk4", corrector="none", steps=4, grad_tol=1e-10, **corrector_options):
    engine = QuasiStaticEngine(objective, process, make_integrator(integrator), make_corrector(corrector, **corrector_options),
                               EngineConfig(steps=steps, grad_tol=grad_tol, **TIGHT))
    state = engine.start(theta, process.start)
    rows = [row_of(objective, theta, process.start)]
    reports = []

    def on_step(report):
        reports.append(report)
        rows.append(row_of(objective, report.state.theta, report.state.controls))

    engine.run(state, on_step)
    return state.target, rows, reports


def row_of(objective, theta, controls):
    values = objective.report(theta, controls.t)
    return {"lam": controls.lam, "gamma": controls.gamma, "t": controls.t, "R": values.R, "D": values.D,
            "C": values.C, "S": values.S,
            "grad_norm": float(torch.linalg.vector_norm(objective.gradient(theta, controls)))}


def drift(rows, target):
    return max(abs(row["C"] - target) / abs(target) for row in rows)


def test_polish_reaches_the_surface(surface):
    objective, theta = surface
    assert float(torch.linalg.vector_norm(objective.gradient(theta, START))) <= 1e-10


def test_polish_refuses_when_it_cannot_reach_the_surface():
    objective = small_objective()
    result = polish(LinearSolve(objective), objective.initial_theta(), START, grad_tol=1e-10, max_iter=1,
                    newton_iterations=1)
    with pytest.raises(NotOnSurfaceError, match=r"starting model must reach equilibrium \|grad J\| <= 1e-10"):
        require_equilibrium(result, 1e-10)


def test_iso_classification_with_newton_corrector_holds_c_and_the_first_law(surface):
    objective, theta = surface
    process = make_process("iso-classification", START, lam_end=LAM_END)
    target, rows, reports = run(objective, theta, process, corrector="newton")
    assert rows[-1]["lam"] == pytest.approx(LAM_END)
    assert drift(rows, target) <= 1e-10
    assert rows[-1]["grad_norm"] <= max(rows[0]["grad_norm"], 1e-10)
    residual, delta_r = first_law_residual(rows, SIGMA)
    assert residual <= 1e-3 * delta_r, (residual, delta_r)
    assert abs(rows[-1]["gamma"] - START.gamma) > 1e-3  # γ had to move to hold C
    assert all(r.correction.converged for r in reports)


@pytest.mark.parametrize("integrator, steps", [("euler", (4, 8, 16)), ("heun", (4, 8, 16)), ("rk4", (2, 4, 8))])
def test_drift_without_corrector_falls_at_the_integrators_order(surface, integrator, steps):
    objective, theta = surface
    drifts = []
    for n in steps:
        process = make_process("iso-classification", START, lam_end=LAM_END)
        target, rows, _ = run(objective, theta, process, integrator=integrator, steps=n)
        drifts.append(drift(rows, target))
    slope = -np.polyfit(np.log(steps), np.log(drifts), 1)[0]
    order = make_integrator(integrator).order
    assert abs(slope - order) < 0.35, (integrator, drifts, slope)


@pytest.mark.parametrize("corrector", available_correctors())
@pytest.mark.parametrize("integrator", available_integrators())
def test_every_integrator_and_corrector_runs_the_process(surface, integrator, corrector):
    objective, theta = surface
    process = make_process("iso-classification", START, lam_end=LAM_END)
    options = {"epochs": 2, "batch_size": 4} if corrector == "equilibrate" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        target, rows, reports = run(objective, theta, process, integrator=integrator, corrector=corrector,
                                    steps=2, **options)
    assert rows[-1]["lam"] == pytest.approx(LAM_END)
    assert len(reports) >= 2 and all(math.isfinite(r["C"]) for r in rows)
    if corrector == "newton":
        assert drift(rows, target) <= 1e-10
    elif corrector == "none":
        assert drift(rows, target) <= 1e-3


def test_transfer_process_moves_the_data_at_constant_c():
    objective = small_objective(mixture=True)
    theta = polish(LinearSolve(objective), objective.initial_theta(), START, grad_tol=1e-10).theta
    process = make_process("iso-classification-transfer", START)
    target, rows, _ = run(objective, theta, process, corrector="newton", steps=4)
    assert rows[-1]["t"] == pytest.approx(1.0)
    assert drift(rows, target) <= 1e-10


def test_a_process_defined_by_subclassing_runs():
    class IsoDistortion(ConstraintProcess):
        """Keep D constant while λ grows (γ adjusts)."""

        weights = (0.0, 1.0, 0.0)

        def driven_rates(self, s, controls):
            return 0.1, 0.0

    objective = small_objective()
    theta = polish(LinearSolve(objective), objective.initial_theta(), START, grad_tol=1e-10).theta
    target, rows, _ = run(objective, theta, IsoDistortion(START), corrector="newton", steps=2)
    assert max(abs(row["D"] - target) for row in rows) <= 1e-10 * abs(target)
    assert rows[-1]["lam"] == pytest.approx(START.lam + 0.1)


def test_singular_constraint_stops_with_a_clear_error(surface, monkeypatch):
    objective, theta = surface
    process = make_process("iso-classification", START, lam_end=LAM_END)
    monkeypatch.setattr(type(process), "singular_tolerance", 1e12)  # every C_γ now counts as ≈ 0
    with pytest.raises(SingularConstraintError, match="constraint derivative along gamma must be non-zero"):
        run(objective, theta, process)


def test_step_size_underflow_is_a_clear_error(surface):
    objective, theta = surface
    process = make_process("iso-classification", START, lam_end=3.0)
    engine = QuasiStaticEngine(objective, process, make_integrator("euler"),
                               make_corrector("newton", max_iter=1), EngineConfig(steps=1, min_step=0.2, grad_tol=1e-30))
    with pytest.raises(StepSizeError, match="step size fell below 0.2"):
        engine.run(engine.start(theta, START))


def test_transfer_process_needs_a_mixture(surface):
    objective, _ = surface
    with pytest.raises(InputError, match="must run on a source/target mixture"):
        QuasiStaticEngine(objective, make_process("iso-classification-transfer", START), make_integrator("rk4"),
                          make_corrector("none"))


def test_steep_controls_get_small_steps_up_front(surface):
    """γ̇ = 6 from γ = 4 (free process) over two nominal steps of h = 0.5: the step control caps
    each step's change of γ at max_control_change (0.2) × γ before it is tried."""
    objective, theta = surface
    process = make_process("free", START, gamma_rate=6.0)
    _, rows, reports = run(objective, theta, process, integrator="euler", corrector="newton", steps=2,
                           grad_tol=1e-8)
    gammas = [row["gamma"] for row in rows]
    assert gammas[-1] == pytest.approx(10.0)
    assert max((b - a) / a for a, b in zip(gammas[:-1], gammas[1:])) <= 0.2 + 1e-12
    assert reports[0].state.s <= 0.2 * 4 / 6 + 1e-12


def test_a_step_that_leaves_gamma_positive_is_retried(surface):
    """γ̇ = −8 from γ = 4 over s ∈ [0, 1] would reach γ < 0: every accepted γ stays ≥ 0, and the
    engine stops with a step-size error once the step cannot shrink further."""
    objective, theta = surface
    process = make_process("free", START, gamma_rate=-8.0)
    engine = QuasiStaticEngine(objective, process, make_integrator("euler"),
                               make_corrector("newton"), EngineConfig(steps=1, min_step=1e-2, grad_tol=1e-8, **TIGHT))
    gammas = []
    with pytest.raises(StepSizeError, match="step size fell below 0.01 at s=0.4"):
        engine.run(engine.start(theta, START), lambda report: gammas.append(report.state.controls.gamma))
    assert gammas and min(gammas) >= 0


def test_the_tangent_border_reaches_the_exact_bordered_newton_point(surface, monkeypatch):
    """border="tangent" (q = −θ_γ of the step's tangent solve, a chord on the border) and
    border="solve" (q solved in every iteration) end each step on the same point of the branch,
    within the tolerances; the chord's Newton solves have one column, the exact ones two."""
    objective, theta = surface
    process = make_process("iso-classification", START, lam_end=LAM_END)
    ends, columns = {}, {}
    solve = LinearSolve.solve

    def counting(self, theta, controls, rhs, *, kind, **options):
        columns[border].add((kind, rhs.shape[1]))
        return solve(self, theta, controls, rhs, kind=kind, **options)

    monkeypatch.setattr(LinearSolve, "solve", counting)
    for border in ("tangent", "solve"):
        columns[border] = set()
        target, rows, reports = run(objective, theta, process, integrator="hermite", corrector="newton", border=border)
        ends[border] = reports[-1].state
        assert drift(rows, target) <= 1e-10 and all(r.correction.converged for r in reports)
    assert ends["tangent"].controls.lam == ends["solve"].controls.lam == pytest.approx(LAM_END)
    assert ends["tangent"].controls.gamma == pytest.approx(ends["solve"].controls.gamma, rel=1e-8)
    assert torch.allclose(ends["tangent"].theta, ends["solve"].theta, rtol=0, atol=1e-6)
    assert {k for k in columns["tangent"] if k[0] == "newton"} == {("newton", 1)}
    assert {k for k in columns["solve"] if k[0] == "newton"} == {("newton", 2)}


def test_unknown_border_lists_the_accepted_ones():
    with pytest.raises(InputError, match=r"corrector border must be one of \{solve, tangent\}, got 'exact'"):
        make_corrector("newton", border="exact")


def test_the_last_step_is_corrected_to_the_starts_gradient_norm(surface):
    """A run ends at least as close to the surface as it started: the step that ends the path is
    corrected to min(grad_tol, the start's ‖∇θJ‖), the others to grad_tol; from a start polished more
    than 10× tighter than grad_tol, every step only to grad_tol."""
    objective, theta = surface
    start = polish(LinearSolve(objective), theta + 1e-4, START, grad_tol=5e-7).theta
    start_norm = float(torch.linalg.vector_norm(objective.gradient(start, START)))
    assert 1e-7 <= start_norm <= 5e-7  # within [0.1 grad_tol, grad_tol]: the last step holds it
    calls = []
    newton = make_corrector("newton")

    class Recording:
        adapts_step = True

        def correct(self, *args, grad_tol, **kwargs):
            calls.append(grad_tol)
            return newton.correct(*args, grad_tol=grad_tol, **kwargs)

    process = make_process("iso-classification", START, lam_end=LAM_END)
    engine = QuasiStaticEngine(objective, process, make_integrator("hermite"), Recording(),
                               EngineConfig(steps=4, grad_tol=1e-6))
    state = engine.start(start, START)
    assert state.start_grad_norm == pytest.approx(start_norm)
    end = engine.run(state)
    assert calls[-1] == pytest.approx(start_norm) and set(calls[:-1]) == {1e-6}
    assert float(torch.linalg.vector_norm(objective.gradient(end.theta, end.controls))) <= start_norm
    calls.clear()
    engine = QuasiStaticEngine(objective, process, make_integrator("hermite"), Recording(),
                               EngineConfig(steps=4, grad_tol=1e-5))
    engine.run(engine.start(start, START))
    assert set(calls) == {1e-5}


def test_unknown_forcing_lists_the_accepted_ones():
    with pytest.raises(InputError, match=r"corrector forcing must be one of \{adaptive, quadratic\}, got 'tight'"):
        make_corrector("newton", forcing="tight")


def test_the_forcing_of_the_newton_solves():
    """η of the Krylov solves: ‖∇θJ‖ (quadratic) or Eisenstat–Walker's 0.9 (‖∇θJ‖/‖∇θJ‖_previous)²
    (adaptive, 0.1 at the first iteration), within [½ grad_tol / ‖∇θJ‖, 0.1]."""
    quadratic, adaptive = make_corrector("newton", forcing="quadratic"), make_corrector("newton")
    assert quadratic._forcing(1e-3, None, 1e-6) == pytest.approx(1e-3)
    assert quadratic._forcing(1e-3, 1e-2, 1e-6) == pytest.approx(1e-3)
    assert quadratic._forcing(1.0, None, 1e-6) == pytest.approx(0.1)
    assert quadratic._forcing(1e-5, 1e-4, 1e-6) == pytest.approx(0.05)  # the floor ½ grad_tol / ‖∇θJ‖
    assert adaptive._forcing(1e-3, None, 1e-6) == pytest.approx(0.1)
    assert adaptive._forcing(1e-3, 1e-2, 1e-6) == pytest.approx(0.9e-2)
    assert adaptive._forcing(1e-3, 2e-3, 1e-6) == pytest.approx(0.1)  # 0.225, capped
    assert adaptive._forcing(2e-5, 1e-3, 1e-6) == pytest.approx(0.025)  # 3.6e-4, below the floor


@pytest.mark.parametrize("options", [{"forcing": "adaptive", "damp_cut_steps": False},
                                     {"forcing": "quadratic", "damp_cut_steps": True}, {"early_rejection": False}, {}])
def test_the_newton_options_reach_the_same_branch_point(surface, options):
    """The forcing and the damping of cut steps change the work, not the point: every step ends on
    the point of the branch the plain corrector (quadratic forcing, cut steps not damped) reaches,
    within the tolerances."""
    objective, theta = surface
    process = make_process("iso-classification", START, lam_end=LAM_END)
    ends, krylov = {}, {}
    for name, corrector_options in (("plain", {"forcing": "quadratic", "damp_cut_steps": False}), ("option", options)):
        target, rows, reports = run(objective, theta, process, integrator="hermite", corrector="newton",
                                    **corrector_options)
        assert drift(rows, target) <= 1e-10 and all(r.correction.converged for r in reports)
        assert max(row["grad_norm"] for row in rows) <= 1e-10
        ends[name] = reports[-1].state
        krylov[name] = sum(r.correction.cg_iterations for r in reports)
    if options.get("forcing", "adaptive") == "adaptive":  # the option reached the solves
        assert krylov["option"] != krylov["plain"]
    assert ends["option"].controls.lam == pytest.approx(LAM_END)
    assert ends["option"].controls.gamma == pytest.approx(ends["plain"].controls.gamma, rel=1e-8)
    assert torch.allclose(ends["option"].theta, ends["plain"].theta, rtol=0, atol=1e-6)


def test_the_early_rejection_predicts_from_the_last_contraction():
    """On gradient norms logged by a (64, 64) digits run (grad_tol 1e-6, 6 iterations): a correction
    that went 1.13e-3 -> 6.0e-4 (θ 0.53) with 4 iterations left cannot end below 10 grad_tol
    (6.0e-4 · 0.53⁴ = 4.7e-5) and failed; one that went 7.55e-5 -> 3.5e-5 (θ 0.46, 1.6e-6 predicted)
    converged at its 6th iteration. Nothing is predicted without a previous norm or from a rise."""
    from quasistatic.continuation.correctors import predicted_to_fail
    assert predicted_to_fail(6.04e-4, 1.13e-3, 4, 1e-6)
    assert not predicted_to_fail(3.50e-5, 7.55e-5, 4, 1e-6)
    assert not predicted_to_fail(1e-3, None, 5, 1e-6) and not predicted_to_fail(2e-3, 1e-3, 5, 1e-6)


def test_a_correction_predicted_to_fail_stops_early_only_with_early_rejection(surface):
    """From a point 0.05 off the surface, asked for ‖∇θJ‖ ≤ 1e-14 in at most 4 iterations, the
    corrector with early rejection stops as soon as its contraction predicts failure, which it judges
    from the second iteration on (two contractions); without it, it runs its iterations out. Neither
    converges."""
    objective, theta = surface
    process = make_process("iso-classification", START, lam_end=LAM_END)
    state = QuasiStaticEngine(objective, process, make_integrator("euler"), make_corrector("newton"),
                              EngineConfig(steps=1, grad_tol=1e-10, **TIGHT)).start(theta, START)
    y = QuasiStaticEngine.pack(state.theta, state.controls)
    predicted = QuasiStaticEngine.unpack(y + 0.05 * torch.nn.functional.normalize(torch.ones_like(y), dim=0))
    iterations = {}
    for early in (True, False):
        correction = make_corrector("newton", early_rejection=early).correct(
            LinearSolve(objective), *predicted, process, state.target, grad_tol=1e-14, drift_tol=1e-10, max_iter=4)
        assert not correction.converged
        iterations[early] = correction.iterations
    assert iterations[True] == 2 and iterations[False] == 4


@pytest.mark.parametrize("damp_cut_steps", [False, True])
def test_a_cut_step_raises_the_damping_only_when_asked(surface, monkeypatch, damp_cut_steps):
    """After a step the line search had to cut, the next Newton solve is damped more (μ → max(10 μ,
    initial_damping)) with damp_cut_steps, and with the same μ without."""
    from quasistatic.continuation.correctors import NewtonCorrector
    objective, theta = surface
    events = []  # ("solve", μ) and ("search", accepted)
    line_search, newton_step = NewtonCorrector._line_search, NewtonCorrector._newton_step

    def cut_once(self, *args):
        accepted = line_search(self, *args)
        first = accepted is not None and ("search", True) not in events
        events.append(("search", accepted is not None))
        return accepted[:-1] + (False,) if first else accepted

    def recording(self, linear_solve, theta, controls, gradients, violation, constrained, damping, tol):
        events.append(("solve", damping))
        return newton_step(self, linear_solve, theta, controls, gradients, violation, constrained, damping, tol)

    monkeypatch.setattr(NewtonCorrector, "_line_search", cut_once)
    monkeypatch.setattr(NewtonCorrector, "_newton_step", recording)
    corrector = make_corrector("newton", damp_cut_steps=damp_cut_steps, initial_damping=1e-3)
    process = make_process("iso-classification", START, lam_end=LAM_END)
    state = QuasiStaticEngine(objective, process, make_integrator("euler"), corrector,
                              EngineConfig(steps=1, grad_tol=1e-10, **TIGHT)).start(theta, START)
    y = QuasiStaticEngine.pack(state.theta, state.controls)
    predicted = QuasiStaticEngine.unpack(y + 0.01 * torch.nn.functional.normalize(torch.ones_like(y), dim=0))
    corrector.correct(LinearSolve(objective), *predicted, process, state.target, grad_tol=1e-10, drift_tol=1e-10)
    cut = events.index(("search", True))
    assert cut + 1 < len(events), f"no Newton solve after the cut step: {events}"
    before, after = events[cut - 1], events[cut + 1]
    assert before[0] == after[0] == "solve"
    assert after[1] == (max(10 * before[1], 1e-3) if damp_cut_steps else before[1])


def test_damping_cut_steps_stops_at_max_damping(surface, monkeypatch):
    """Cut steps raise μ at most to max_damping, so the corrector goes on from there (here two cut
    steps take μ from 0 to 1e-3, then to the cap 5e-3, not to 1e-2, past which no step would be tried and
    the corrector would give up) and converges."""
    from quasistatic.continuation.correctors import NewtonCorrector
    objective, theta = surface
    line_search, cuts = NewtonCorrector._line_search, []

    def cut_twice(self, *args):
        accepted = line_search(self, *args)
        if accepted is None or len(cuts) == 2:
            return accepted
        cuts.append(True)
        return accepted[:-1] + (False,)

    monkeypatch.setattr(NewtonCorrector, "_line_search", cut_twice)
    process = make_process("iso-classification", START, lam_end=LAM_END)
    corrector = make_corrector("newton", initial_damping=1e-3, max_damping=5e-3, max_iter=40)
    state = QuasiStaticEngine(objective, process, make_integrator("euler"), corrector,
                              EngineConfig(steps=1, grad_tol=1e-10, **TIGHT)).start(theta, START)
    y = QuasiStaticEngine.pack(state.theta, state.controls)
    predicted = QuasiStaticEngine.unpack(y + 1e-3 * torch.nn.functional.normalize(torch.ones_like(y), dim=0))
    correction = corrector.correct(LinearSolve(objective), *predicted, process, state.target, grad_tol=1e-8,
                                   drift_tol=1e-8)
    assert len(cuts) == 2 and correction.converged, correction
