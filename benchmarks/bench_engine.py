"""The engine (rk4 predictor + newton corrector) against the paper's fd-equilibration on one path.

Run::

    python -m pytest benchmarks/bench_engine.py --benchmark-enable -q -s

The path is iso-classification from (λ, γ) = (1, 4) to λ = 1.1 on a small well-posed problem
(6 pixels, linear encoder and decoder, latent 1, σ = 1e-2, K = 2; the one of tests/test_engine.py),
whose start is polished to ‖∇θJ‖ ≤ 1e-10. The baseline runs a sweep of its two settings (epochs of
each equilibration, finite-difference step); each run reports its C drift max|C − C0|/C0 and its
cost in gradient-equivalents (``grad_evals``), and the summary gives the engine's cost against the
cheapest baseline setting whose drift is no larger than the engine's (or, when none is, the
smallest baseline drift). Nothing asserts on time.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from quasistatic import Controls, ModelConfig, Objective, build_model
from quasistatic.experiments.baselines import FiniteDifferenceEquilibration
from quasistatic.continuation.correctors import make_corrector
from quasistatic.continuation.engine import EngineConfig, EngineState, QuasiStaticEngine
from quasistatic.linalg import LinearSolve
from quasistatic.integrators import make_integrator
from quasistatic.continuation.polish import polish
from quasistatic.processes import make_process

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from small_problem import small_labeled  # noqa: E402  (the problem of tests/test_engine.py)

START = Controls(1.0, 4.0)
LAM_END = 1.1
SWEEP = [(epochs, fd_step) for epochs in (5, 20, 80) for fd_step in (1e-2, 1e-3)]
RESULTS: dict[str, dict] = {}


@pytest.fixture(scope="module")
def start():
    torch.set_num_threads(1)
    model = build_model(ModelConfig(input_shape=(1, 2, 3), num_classes=3, latent_dim=1, hidden=()), seed=0).double()
    objective = Objective(model, small_labeled(12, 1), samples=2, sigma=1e-2)
    theta = polish(LinearSolve(objective), objective.initial_theta(), START, grad_tol=1e-10).theta
    return objective, theta


def _drive(objective: Objective, theta: torch.Tensor, method) -> dict:
    objective.work.restore({"forwards": 0.0, "gradients": 0.0, "hvps": 0.0})
    c0 = float(objective.functionals(theta)[2])
    drift = [0.0]

    def on_step(report) -> None:
        c = float(objective.functionals(report.state.theta, report.state.controls.t)[2])
        drift[0] = max(drift[0], abs(c - c0) / c0)

    began = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        final = method.run(EngineState(theta, START, h=0.25, target=c0), on_step)
    return {"drift": drift[0], "grad_evals": objective.work.gradient_equivalents, "seconds": time.perf_counter() - began,
            "lam_end": final.controls.lam}


ENGINES = {  # name: (integrator, steps, tolerance of the solves and of the corrector)
    "engine rk4 tight": ("rk4", 4, 1e-12),
    "engine rk4 loose": ("rk4", 4, 1e-6),
    "engine euler loose": ("euler", 2, 1e-6),
}


@pytest.mark.parametrize("name", ENGINES)
def test_engine(benchmark, start, name):
    objective, theta = start
    integrator, steps, tol = ENGINES[name]
    engine = QuasiStaticEngine(objective, make_process("iso-classification", START, lam_end=LAM_END),
                               make_integrator(integrator), make_corrector("newton"),
                               EngineConfig(steps=steps, grad_tol=max(tol, 1e-10), drift_tol=max(tol, 1e-12), tangent_tol=min(tol, 1e-2)), LinearSolve(objective))
    RESULTS[name] = benchmark.pedantic(lambda: _drive(objective, theta, engine), rounds=1, iterations=1)
    benchmark.extra_info.update(RESULTS[name])


@pytest.mark.parametrize("epochs, fd_step", SWEEP)
def test_fd_equilibration(benchmark, start, epochs, fd_step):
    objective, theta = start
    baseline = FiniteDifferenceEquilibration(objective, make_process("iso-classification", START, lam_end=LAM_END),
                                             steps=4, fd_step=fd_step, epochs=epochs, batch_size=4)
    result = benchmark.pedantic(lambda: _drive(objective, theta, baseline), rounds=1, iterations=1)
    RESULTS[f"fd T={epochs} h={fd_step:g}"] = result
    benchmark.extra_info.update(result)


def test_summary():
    """Print the comparison (runs last in the file)."""
    engines = {k: v for k, v in RESULTS.items() if k.startswith("engine")}
    baselines = {k: v for k, v in RESULTS.items() if k.startswith("fd")}
    if not engines or not baselines:
        pytest.skip("needs the benchmarks above in the same run")
    print("\nmethod                 max|C-C0|/C0   grad_evals   seconds")
    for key, value in RESULTS.items():
        print(f"{key:22s} {value['drift']:12.3e} {value['grad_evals']:12.1f} {value['seconds']:9.2f}")
    comparisons = {}
    for name, engine in engines.items():
        matching = {k: v for k, v in baselines.items() if v["drift"] <= engine["drift"]}
        if not matching:
            print(f"{name}: no baseline setting reached its drift {engine['drift']:.1e}")
            continue
        cheapest = min(matching, key=lambda k: matching[k]["grad_evals"])
        comparisons[name] = {"baseline": cheapest, "ratio": matching[cheapest]["grad_evals"] / engine["grad_evals"]}
        print(f"{name}: cheapest baseline at equal or smaller drift is {cheapest}, "
              f"cost ratio baseline/engine = {comparisons[name]['ratio']:.1f}")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "engine.json").write_text(json.dumps({"results": RESULTS, "comparisons": comparisons}, indent=2))
