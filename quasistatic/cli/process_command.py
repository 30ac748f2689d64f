"""``quasistatic iso-classification`` and ``quasistatic process``: run a quasi-static process from
an equilibrium, with the engine or with the paper's fd-equilibration, and record its trajectory.

The pieces (:func:`starting_model`, :func:`follow`, :func:`summary`) are shared with the transfer
command.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..continuation.arclength import require_residual_form
from ..experiments.baselines import FiniteDifferenceEquilibration
from ..experiments.checkpoint import load_checkpoint, save_checkpoint
from ..continuation.correctors import CORRECTORS, Corrector, make_corrector
from ..continuation.engine import EngineState, FoldError, QuasiStaticEngine, StepSizeError, first_law_residual
from ..continuation.equilibrate import DivergenceError, EquilibrationConfig, equilibrate
from ..errors import InputError, bad_value, choice_error
from ..integrators import Integrator, make_integrator
from ..linalg import LinearSolve
from ..models import ModelConfig, RepresentationModel, build_model
from ..thermo.objective import Controls, Objective
from ..experiments.plots import plot_hysteresis
from ..continuation.polish import polish, require_equilibrium
from ..processes import PROCESSES, Process, available_processes, make_process
from ..experiments.rundir import RunDirectory
from ..experiments.trajectory import STATE_FILE, TrajectoryRecorder, numeric, plot_trajectory
from ..work import WorkCounter
from .options import (data_arguments, device_option, dtype_option, engine_arguments, engine_config, inputs,
                      linear_solve_config, model_arguments, objectives, parameter_argument, registry_options,
                      run_arguments, settings, write_config)

__all__ = ["METHODS", "PROCESS_FLAGS", "add_parsers", "check_engine_flags", "integrator", "corrector_options",
           "corrector", "starting_model", "follow", "summary"]

METHODS = ("engine", "fd-equilibration")
RESUME_IGNORES = ("resume", "overwrite", "no_progress", "device", "out")
# the parameters of the built-in processes with a flag of their own (--lam-end, ...); any parameter: --param
PROCESS_FLAGS = {"lam_end": "final λ", "alpha": "Remark 7's time scale α", "beta": "β of C + β⁻¹R (iso-c-rate)",
                 "lam_rate": "λ̇ (free)", "gamma_rate": "γ̇ (free)", "slope": "k = dD/dR (geodesic-transfer)",
                 "k": "λ̇ (constant-lambda-rate)"}


def add_parsers(commands: argparse._SubParsersAction) -> None:
    iso = commands.add_parser("iso-classification", help="run the iso-classification process (eqs. 20-22)")
    iso.add_argument("--lam-end", type=float, default=None, help="final λ (λ̇ = λ_end − λ over s ∈ [0, 1])")
    iso.add_argument("--alpha", type=float, default=None, help="Remark 7's form λ̇ = −αC_γ, γ̇ = αC_λ instead")
    parameter_argument(iso, PROCESSES, ["iso-classification"])
    iso.set_defaults(run=_iso_classification)
    generic = commands.add_parser("process", help="run any registered quasi-static process")
    generic.add_argument("--process", required=True, help=f"one of {', '.join(available_processes())}")
    for name, help_text in PROCESS_FLAGS.items():
        generic.add_argument(f"--{name.replace('_', '-')}", type=float, default=None, help=help_text)
    parameter_argument(generic, PROCESSES, available_processes())
    generic.set_defaults(run=_generic_process)
    for sub in (iso, generic):
        data_arguments(sub)
        model_arguments(sub)
        run_arguments(sub)
        engine_arguments(sub)
        sub.add_argument("--method", default="engine", help="engine (default) or fd-equilibration (the paper's)")
        sub.add_argument("--return", dest="return_sweep", action="store_true",
                         help="after reaching --lam-end, drive lambda back to --lam with the same process from the "
                              "end state (in OUT/return/), draw both sweeps in OUT/hysteresis.png and print the "
                              "loop's dissipation")
        sub.set_defaults(dtype="float64")  # processes need derivatives to rounding: float64 unless asked


def _iso_classification(args: argparse.Namespace) -> int:
    return _run_process(args, "iso-classification", {"lam_end": args.lam_end, "alpha": args.alpha})


def _generic_process(args: argparse.Namespace) -> int:
    return _run_process(args, args.process, {name: getattr(args, name) for name in PROCESS_FLAGS})


def integrator(args: argparse.Namespace) -> Integrator:
    """``--integrator`` with the options given (``--rtol``, ``--atol``; one it does not take: exit 2)."""
    return make_integrator(args.integrator, **{name: value for name, value in (("rtol", args.rtol), ("atol", args.atol))
                                               if value is not None})


def corrector_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--corrector-option NAME=VALUE`` options of ``--corrector`` (an unknown one: exit 2)."""
    return registry_options(CORRECTORS, args.corrector, args.corrector_option, "--corrector-option")


def corrector(args: argparse.Namespace) -> Corrector:
    """``--corrector`` with its options."""
    return make_corrector(args.corrector, **corrector_options(args))


def check_engine_flags(args: argparse.Namespace, process: Process | None = None) -> None:
    """The engine flags that need no data: steps, tolerances, integrator, corrector (and its options)
    and linear-algebra names, and that ``--at-fold arclength`` has a process with a residual form."""
    if args.steps < 1:
        raise bad_value("--steps", "an integer >= 1", args.steps)
    if engine_config(args).at_fold == "arclength" and process is not None:
        require_residual_form(process)
    linear_solve_config(args)
    integrator(args)
    options = corrector_options(args)
    make_corrector(args.corrector, **options)
    for name in sorted({"grad_tol", "drift_tol"} & set(options)):  # the engine's replace the corrector's in every call
        warnings.warn(f"--corrector-option {name} is unused: --{name.replace('_', '-')} sets it", UserWarning,
                      stacklevel=2)


def starting_model(args: argparse.Namespace, run: RunDirectory, model_config: ModelConfig,
                   start: Callable[[RepresentationModel], Objective], controls: Controls) -> RepresentationModel:
    """The model a process starts from, in the requested device and dtype: the run's own start.pt
    when resuming, ``--from-checkpoint`` (its controls must equal the flags'), or a fresh model
    equilibrated on ``start``'s data at ``controls`` (``start`` builds the objective for a model)."""
    device, dtype = device_option(args.device), dtype_option(args.dtype)
    if args.resume and run.file("start.pt").exists():
        return load_checkpoint(run.file("start.pt"), expect=model_config).model(device, dtype)
    if args.from_checkpoint:
        checkpoint = load_checkpoint(args.from_checkpoint, expect=model_config)
        saved = checkpoint.controls
        if (saved.lam, saved.gamma) != (controls.lam, controls.gamma):
            raise InputError(f"--lam and --gamma must equal the checkpoint's controls "
                             f"({saved.lam:g}, {saved.gamma:g}), got ({controls.lam:g}, {controls.gamma:g})")
        return checkpoint.model(device, dtype)
    model = build_model(model_config, seed=args.seed).to(device)  # Adam in float32, on the device
    linear_solve_config(args).resolved(sum(p.numel() for p in model.parameters()))  # refused before the training
    equilibrate(start(model), controls, EquilibrationConfig(epochs=args.epochs, batch_size=args.batch_size),
                seed=args.seed, progress=not args.no_progress)
    return model.to(dtype=dtype)


def follow(args: argparse.Namespace, process: Process, train: Objective, recorder: TrajectoryRecorder,
           method: str = "engine", start: Tensor | None = None) -> int:
    """Polish the start (``start``, or the model's parameters) onto the surface (fresh runs), then
    run ``method`` (one of :data:`METHODS`) to s = 1, recording every step; exit code 0, or 1 when
    the process cannot be followed."""
    controls = process.start
    linear_solve = LinearSolve(train, linear_solve_config(args))
    engine = QuasiStaticEngine(train, process, integrator(args), corrector(args), engine_config(args), linear_solve)
    recorder.linear_solve = linear_solve
    state = recorder.restore() if args.resume else None
    if state is None:
        theta = train.initial_theta() if start is None else start
        polished = polish(linear_solve, theta, controls, grad_tol=args.grad_tol, progress=not args.no_progress)
        require_equilibrium(polished, args.grad_tol)
        state = engine.start(polished.theta, controls)
        recorder.record(state)
    runner = engine if method == "engine" else FiniteDifferenceEquilibration(
        train, process, steps=args.steps, fd_step=args.fd_step, epochs=args.fd_epochs, batch_size=args.batch_size,
        seed=args.seed)
    try:
        runner.run(state, recorder.on_step)
    except (StepSizeError, DivergenceError) as error:
        written = str(recorder.run.file("trajectory.csv"))
        if isinstance(error, FoldError):
            recorder.run.write_json("fold.json", error.fold.to_dict())
            written = f"{written}, the fold in {recorder.run.file('fold.json')}"
        print(f"quasistatic: {error}; the trajectory so far is in {written}", file=sys.stderr)
        return 1
    return 0


def summary(rows: list[dict[str, str]], sigma: float, process: Process) -> str:
    """Drift of the process's constraint (C when it has none), first-law residual (on each
    continuous stretch when the run jumped past folds, with the dissipated free energy), ‖∇θJ‖ at
    both ends and the cost of a recorded trajectory."""
    jumps = [i for i, row in enumerate(rows) if row.get("event") == "jump"]
    values = [numeric(row) for row in rows]
    weights = process.constraint or (0.0, 0.0, 1.0)
    held = [sum(w * v[name] for w, name in zip(weights, "RDC")) for v in values]
    name = " + ".join(f"{w:g}*{x}" if w != 1 else x for w, x in zip(weights, "RDC") if w) or "C"
    drift = max(abs(g - held[0]) for g in held) / abs(held[0])
    if jumps:
        edges = [0, *jumps, len(values)]
        laws = [first_law_residual(values[a:b], sigma) for a, b in zip(edges[:-1], edges[1:]) if b - a > 1]
        worst = max((residual / delta_r for residual, delta_r in laws if delta_r > 0), default=0.0)
        law = (f"first law on each of {len(laws)} continuous stretches <= {worst:.3e} of its |dR|, "
               f"{len(jumps)} jump(s) past folds dissipating {sum(values[i]['dissipation'] for i in jumps):.6g} "
               "(J before - J after)")
    else:
        residual, delta_r = first_law_residual(values, sigma)
        law = f"first law |dR + lam dD + gamma dC + sigma dS| = {residual:.3e} of |dR| = {delta_r:.3e}"
    return (f"{len(rows) - 1} steps, max |g - g0|/g0 = {drift:.3e} for g = {name}, {law}, "
            f"grad_norm {values[0]['grad_norm']:.2e} -> {values[-1]['grad_norm']:.2e}, "
            f"{values[-1]['grad_evals']:.0f} gradient-equivalents, {values[-1]['wall_s']:.0f} s")


def _run_process(args: argparse.Namespace, name: str, flags: dict) -> int:
    """Start on the surface (equilibrate or a checkpoint, then polish) and run the process with the
    parameters of its flags (None: not given) and of ``--param``."""
    controls = Controls(args.lam, args.gamma)
    params = registry_options(PROCESSES, name, args.param, "--param", flags)
    process = make_process(name, controls, **params)
    if process.uses_mixture:
        raise InputError(f"process {name!r} must run on a source/target mixture, got the single data set "
                         f"{args.dataset!r} (use the transfer command)")
    check_engine_flags(args, process)
    if args.method not in METHODS:
        raise choice_error("method", METHODS, args.method)
    if args.return_sweep and params.get("lam_end") is None:
        raise bad_value("--return", "given with --lam-end (the return sweep drives lambda back to --lam)", params)
    run, split, model_config = inputs(args)
    if args.resume:
        run.check_resumable(settings(args), ignore=RESUME_IGNORES)
    model = starting_model(args, run, model_config, lambda m: objectives(args, m, split)[0], controls)
    train, val = objectives(args, model, split)
    run.prepare()
    if not args.resume:
        write_config(run, args, model_config, split, process=process.describe())
        save_checkpoint(run.file("start.pt"), model, controls, {"dataset": split.name, "classes": args.classes})
    recorder = TrajectoryRecorder(run, train, val)
    code = follow(args, process, train, recorder, args.method)
    if code:
        return code
    rows = recorder.log.rows()
    plots = plot_trajectory(rows, run.path, f"{name} ({args.method})")
    how = f"engine, {args.integrator}/{args.corrector}" if args.method == "engine" else args.method
    print(f"{name} ({how}): {summary(rows, args.sigma, process)}")
    print(f"wrote {run.file('trajectory.csv')}, " + ", ".join(str(p) for p in plots))
    return _return_sweep(args, name, params, train, val, run, rows) if args.return_sweep else 0


def _return_sweep(args: argparse.Namespace, name: str, params: dict, train: Objective, val: Objective,
                  run: RunDirectory, forward: list[dict[str, str]]) -> int:
    """``--return``: the same process from the forward sweep's end state back to λ = --lam, in
    OUT/return/ (resumable); OUT/hysteresis.png draws both sweeps, and the loop's dissipation (the
    free energy dissipated by the jumps of both sweeps) is printed."""
    end: EngineState = torch.load(run.file(STATE_FILE), weights_only=False)["state"]
    back = make_process(name, end.controls, **{**params, "lam_end": args.lam})
    path = run.path / "return"
    resume = args.resume and (path / "config.json").exists()
    sweep = RunDirectory(path, overwrite=not resume, resume=resume)
    sweep.prepare()
    if not resume:
        sweep.write_json("config.json", {"return_of": str(run.path), "process": back.describe()})
        train.work = WorkCounter()  # the return sweep's rows count its own work (a resumed one restores it)
    recorder = TrajectoryRecorder(sweep, train, val)
    code = follow(argparse.Namespace(**{**vars(args), "resume": resume}), back, train, recorder, args.method,
                  start=end.theta)
    if code:
        return code
    rows = recorder.log.rows()
    loop_name = f"lambda {args.lam:g} -> {params['lam_end']:g} -> {args.lam:g}"
    figure = plot_hysteresis([("forward", forward), ("return", rows)], run.file("hysteresis.png"),
                             f"{name}: {loop_name}")
    loop = sum(numeric(row)["dissipation"] for sweep_rows in (forward, rows) for row in sweep_rows
               if row.get("event") == "jump")
    print(f"{name} return: {summary(rows, args.sigma, back)}")
    print(f"loop {loop_name}: dissipated free energy {loop:.6g} in "
          f"{sum(r.get('event') == 'jump' for r in forward + rows)} jump(s); wrote {sweep.file('trajectory.csv')}, "
          f"{figure}")
    return 0
