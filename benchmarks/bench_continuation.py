"""Affordable continuation on digits: preconditioners, the start, the engine at three tolerance
settings and the paper's fd-equilibration at three, on one path, in one run.

Run (about 12 minutes on one core of the 2-core VM)::

    python benchmarks/bench_continuation.py [--steps 10] [--lam-end 1.2] [--out benchmarks/results/continuation.json]

and for the two-hidden-layer model (its start, ~12 minutes, then each engine row for at most 30,000 GE, ~13
minutes each)::

    python benchmarks/bench_continuation.py --hidden 64,64 --engine-only --max-work 30000 \
        [--engine-settings default "default, plain corrector"] --out benchmarks/results/continuation_64x64.json

The model is the CLI's digits default (one hidden layer of 16, latent 8, σ = 3e-2, K = 1, float64);
the path is iso-classification from (λ, γ) = (1, 10) to ``--lam-end`` in ``--steps`` nominal steps
with the newton corrector and, per setting, a predictor (hermite, the CLI's default, or euler), the
corrector's options (its border, the forcing of its Krylov solves, the damping of cut steps) and a
preconditioner (the run's, or kfac for loose). Work is counted in gradient-equivalents (GE):
every gradient, Hessian-vector product and preconditioner build (a pass over a subsample at its
share of a full pass); an engine row's start (its preconditioner build and first λ_min, reused along
the path) is reported apart from its steps (``start_GE``). ``--preconditioner cholesky`` runs the rows
with the exact Hessian's Cholesky factor. The JSON holds every number below and the environment; the markdown tables
printed at the end are the ones in benchmarks/README.md. Nothing asserts on time.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
import json
import os
import platform
import time
from pathlib import Path

import torch

import quasistatic as qs
from quasistatic.experiments.baselines import FiniteDifferenceEquilibration
from quasistatic.continuation.engine import EngineConfig, QuasiStaticEngine, first_law_residual
from quasistatic.linalg import LinearSolve, LinearSolveConfig, make_preconditioner, solve

START = qs.Controls(1.0, 10.0)
SIGMA = 3e-2
# name: (drift-tol, grad-tol, predictor, the newton corrector's options (its border, forcing, damping of cut
# steps; {} for its defaults), preconditioner or None for the run's, eigen-iterations: the λ_min tracking of the fold
# detection, 0 = off)
ENGINE_SETTINGS = {"loose": (1e-3, 2e-2, "hermite", {}, "kfac", 0),
                   "default": (1e-4, 1e-6, "hermite", {}, None, 8),
                   "default, no fold detection": (1e-4, 1e-6, "hermite", {}, None, 0),
                   "default, euler": (1e-4, 1e-6, "euler", {}, None, 8),
                   "default, border solve": (1e-4, 1e-6, "hermite", {"border": "solve"}, None, 8),
                   # the newton corrector before 2026-12-02
                   "default, plain corrector":
                       (1e-4, 1e-6, "hermite", {"forcing": "quadratic", "damp_cut_steps": False}, None, 8),
                   "tight": (1e-6, 1e-8, "hermite", {}, None, 8)}
FD_EPOCHS = (10, 20, 40)
PRECONDITIONERS = {  # name: [(kind, options, share of the training set it is built on), ...] built in turn,
    # each later one on top of the earlier (``base``)
    "none": [("none", {}, 1.0)], "dense 10%": [("dense", {}, 0.1)], "dense 25%": [("dense", {}, 0.25)],
    "cholesky": [("cholesky", {}, 1.0)], "kfac": [("kfac", {}, 1.0)], "deflation k=64": [("deflation", {"rank": 64}, 1.0)],
    "dense 10% + deflation k=64": [("dense", {}, 0.1), ("deflation", {"rank": 64}, 1.0)]}


def objective_for(model: qs.RepresentationModel, split: qs.DataSplit) -> qs.Objective:
    return qs.Objective(model, split.train, samples=1, noise_seed=0, sigma=SIGMA)


def row(objective: qs.Objective, theta: torch.Tensor, controls: qs.Controls) -> dict:
    with objective.work.paused():
        f = objective.report(theta, controls.t)
        grad_norm = float(torch.linalg.vector_norm(objective.gradient(theta, controls)))
    return {"lam": controls.lam, "gamma": controls.gamma, "R": f.R, "D": f.D, "C": f.C, "S": f.S,
            "grad_norm": grad_norm}


class BudgetSpent(Exception):
    """A row stopped by --max-work."""


def follow(objective: qs.Objective, theta: torch.Tensor, runner_of, max_work: float) -> dict:
    """Run a path from θ, up to the accepted step that spends ``max_work`` GE, and summarize: GE and
    wall of the steps, and apart those of the engine's start (a preconditioner built there and
    reused along the path is the start's, as the issue counts it), drift, final ‖∇J‖, first law,
    how far along the path s it got."""
    objective.work.restore({"forwards": 0.0, "gradients": 0.0, "hvps": 0.0})
    rows = [row(objective, theta, START)]
    started = time.perf_counter()
    state, runner = runner_of()  # the engine's start: its preconditioner build and λ_min, counted in the start
    start_ge, start_wall = objective.work.gradient_equivalents, time.perf_counter() - started
    objective.work.restore({"forwards": 0.0, "gradients": 0.0, "hvps": 0.0})
    started = time.perf_counter()
    error, reached = None, [0.0]

    def on_step(report) -> None:
        rows.append(row(objective, report.state.theta, report.state.controls))
        reached.append(report.state.s)
        what = "jump to" if report.jump is not None else "accepted"
        print(f"  {what} s = {report.state.s:.5g} (lambda {report.state.controls.lam:.5g}): "
              f"{objective.work.gradient_equivalents:.0f} GE, {time.perf_counter() - started:.0f} s", flush=True)
        if objective.work.gradient_equivalents >= max_work:
            raise BudgetSpent(f"--max-work {max_work:g} spent at s = {report.state.s:.4g}")

    try:
        runner.run(state, on_step)
    except (qs.continuation.engine.StepSizeError, BudgetSpent) as failure:
        error = str(failure)[:200]
    wall = time.perf_counter() - started
    residual, delta_r = first_law_residual(rows, SIGMA)
    accepted = len(rows) - 1
    ge = objective.work.gradient_equivalents
    return {"GE": ge, "GE_per_step": ge / max(accepted, 1), "accepted_steps": accepted, "wall_s": wall,
            "start_GE": start_ge, "start_wall_s": start_wall,
            "drift": max(abs(r["C"] - rows[0]["C"]) for r in rows) / rows[0]["C"], "final_grad_norm": rows[-1]["grad_norm"],
            "first_law": residual, "delta_R": delta_r, "lam_end": rows[-1]["lam"], "s_end": reached[-1], "error": error}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lam-end", type=float, default=1.2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "continuation.json"))
    parser.add_argument("--hidden", default="16", help="mlp hidden widths, e.g. 64,64 (default 16)")
    parser.add_argument("--preconditioner", default="auto", help="the runs' preconditioner (default auto)")
    parser.add_argument("--engine-settings", nargs="+", choices=list(ENGINE_SETTINGS), metavar="NAME",
                        help="the engine rows to run, by name (default all; 'default' with --engine-only)")
    parser.add_argument("--max-work", type=float, default=float("inf"),
                        help="stop each path after the accepted step that spends this many GE, the engine's "
                             "start not counted (default: none)")
    parser.add_argument("--engine-only", action="store_true",
                        help="only the start and the engine rows (no preconditioner table, no fd)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    split = qs.load_dataset("digits", seed=0)
    config = qs.ModelConfig(input_shape=split.train.input_shape, num_classes=split.train.num_classes,
                            latent_dim=8, hidden=tuple(int(w) for w in args.hidden.split(",")))
    settings = LinearSolveConfig(preconditioner=args.preconditioner)
    results: dict = {"path": {"lam": [START.lam, args.lam_end], "gamma": START.gamma, "steps": args.steps},
                     "model": {"hidden": args.hidden, "preconditioner": args.preconditioner},
                     "environment": {"torch": torch.__version__, "threads": 1, "cpu": platform.processor(),
                                     "cpus": os.cpu_count(), "load_avg": os.getloadavg()}}

    # the start: Adam (the paper's schedule), then the polish with and without the preconditioner
    model = qs.build_model(config, seed=0)
    adam = objective_for(model, split)
    started = time.perf_counter()
    qs.equilibrate(adam, START, qs.EquilibrationConfig(epochs=120), seed=0, progress=False)
    results["adam"] = {"GE": adam.work.gradient_equivalents, "wall_s": time.perf_counter() - started}
    model = model.double()
    theta_adam = objective_for(model, split).initial_theta()
    resolved = settings.resolved(objective_for(model, split).layout.numel)
    polishes = {"polish, L-BFGS only": LinearSolveConfig(preconditioner="none"),
                "polish, whitened by dense 25%": replace(settings, whitening="dense"),
                f"polish, whitened by {resolved.whitening} (default)": settings}  # last: the start of the runs below
    for name, config in polishes.items():
        if args.engine_only and config is not settings:
            continue
        if config.whitening == "dense" and (resolved.preconditioner != "dense" or resolved.whitening == "dense"):
            continue  # dense above its size limit, or the default already
        objective = objective_for(model, split)
        linear_solve = LinearSolve(objective, config)
        started = time.perf_counter()
        polished = qs.polish(linear_solve, theta_adam, START, grad_tol=1e-6)
        results[name] = {"GE": objective.work.gradient_equivalents, "wall_s": time.perf_counter() - started,
                         "grad_norm": polished.grad_norm, "C": float(objective.functionals(polished.theta)[2])}
        print(name, results[name], flush=True)
    theta = polished.theta
    objective = objective_for(model, split)

    # preconditioners at the start: iterations of the tangent right-hand sides [∇D, ∇C]
    rhs = -torch.func.jacrev(objective.functionals)(theta)[1:3].T.contiguous()
    table = {}
    for name, layers in ({} if args.engine_only else PRECONDITIONERS).items():
        started, build_ge, preconditioner = time.perf_counter(), 0.0, None
        for kind, options, sample in layers:
            build_on = objective.subsample(sample)
            before = build_on.work.gradient_equivalents
            base = {} if preconditioner is None else {"base": preconditioner}
            preconditioner = make_preconditioner(kind, build_on, theta, START, **options, **base)
            build_ge += (build_on.work.gradient_equivalents - before) * build_on.examples / objective.examples
        setup = time.perf_counter() - started
        op = qs.CurvatureOperator(objective, theta, START)
        iterations = [solve(op, rhs, tol=tol, preconditioner=preconditioner.apply).iterations for tol in (1e-2, 1e-6)]
        table[name] = {"iterations_1e-2": iterations[0], "iterations_1e-6": iterations[1], "setup_GE": build_ge,
                       "setup_s": setup, "memory_MB": preconditioner.memory_bytes / 2**20}
        print(name, table[name], flush=True)
    results["preconditioners"] = table

    process = qs.make_process("iso-classification", START, lam_end=args.lam_end)
    results["engine"] = {}
    for name, (drift_tol, grad_tol, predictor, newton, preconditioner, eigen) in ENGINE_SETTINGS.items():
        if name not in (args.engine_settings or (["default"] if args.engine_only else ENGINE_SETTINGS)):
            continue
        run_settings = settings if preconditioner is None else replace(settings, preconditioner=preconditioner)
        def engine_run():
            engine = QuasiStaticEngine(objective, process, qs.make_integrator(predictor),
                                       qs.make_corrector("newton", **newton),
                                       EngineConfig(steps=args.steps, drift_tol=drift_tol, grad_tol=grad_tol,
                                                    eigen_iterations=eigen),
                                       LinearSolve(objective, run_settings))
            return engine.start(theta, START), engine
        results["engine"][name] = {"drift_tol": drift_tol, "grad_tol": grad_tol, "predictor": predictor,
                                   "newton": newton, "preconditioner": run_settings.preconditioner,
                                   "eigen_iterations": eigen,
                                   **follow(objective, theta, engine_run, args.max_work)}
        print("engine", name, results["engine"][name], flush=True)
    results["fd-equilibration"] = {}
    for epochs in () if args.engine_only else FD_EPOCHS:
        def fd_run():
            engine = QuasiStaticEngine(objective, process, qs.make_integrator("euler"), qs.make_corrector("none"),
                                       EngineConfig(eigen_iterations=0))  # only its start state: nothing tracked
            return engine.start(theta, START), FiniteDifferenceEquilibration(objective, process, steps=args.steps,
                                                                             epochs=epochs)
        results["fd-equilibration"][f"{epochs} epochs"] = follow(objective, theta, fd_run, args.max_work)
        print("fd", epochs, results["fd-equilibration"][f"{epochs} epochs"], flush=True)

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.out}\n")
    print("| preconditioner | iterations to 1e-2 (∇D, ∇C) | to 1e-6 | set-up GE | set-up s | memory MB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, t in table.items():
        print(f"| {name} | {t['iterations_1e-2']} | {t['iterations_1e-6']} | {t['setup_GE']:.0f} | {t['setup_s']:.1f} | "
              f"{t['memory_MB']:.1f} |")
    print("\n| method | setting (drift-tol, grad-tol, predictor, newton options, preconditioner, eigen-iterations) "
          "| engine start GE / s | accepted steps | GE | GE/step | wall s | max drift | final ‖∇J‖ | first law / |ΔR| |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for method in ("engine", "fd-equilibration"):
        for name, r in results[method].items():
            newton = ", ".join(f"{k}={v}" for k, v in r.get("newton", {}).items()) or "defaults"
            what = (f"{name} ({r['drift_tol']:g}, {r['grad_tol']:g}, {r['predictor']}, {newton}, "
                    f"{r['preconditioner']}, {r['eigen_iterations']})" if method == "engine" else name)
            print(f"| {method} | {what} | {r['start_GE']:.0f} / {r['start_wall_s']:.0f} | {r['accepted_steps']} | {r['GE']:.0f} | {r['GE_per_step']:.0f} | {r['wall_s']:.0f} | "
                  f"{r['drift']:.1e} | {r['final_grad_norm']:.1e} | {r['first_law'] / max(r['delta_R'], 1e-300):.1e} |"
                  + (f" stopped: {r['error'][:60]}" if r["error"] else ""))
    print(f"\nstart: Adam {results['adam']['GE']:.0f} GE / {results['adam']['wall_s']:.0f} s; " + "; ".join(
        f"{k} {results[k]['GE']:.0f} GE / {results[k]['wall_s']:.0f} s" for k in results if k.startswith("polish")))


if __name__ == "__main__":
    main()
