"""The ``quasistatic`` command line.

Bad input ends with one line ``quasistatic: error: …`` naming the bad value and the accepted ones,
exit code 2, and no earlier output touched; a diverging run ends with exit code 1 and keeps its
last good checkpoint.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Sequence

import torch

from . import __version__
from .baselines import FiniteDifferenceEquilibration
from .checkpoint import load_checkpoint, save_checkpoint
from .correctors import available_correctors, make_corrector
from .data import DataSplit, available_datasets, load_dataset
from .engine import EngineConfig, QuasiStaticEngine, StepSizeError, first_law_residual
from .equilibrate import DivergenceError, EquilibrationConfig, equilibrate
from .errors import InputError, bad_value, choice_error
from .models import ModelConfig, available_architectures, build_model
from .objective import Controls, Objective
from .integrators import available_integrators, make_integrator
from .plots import plot_columns
from .polish import polish, require_equilibrium
from .processes import available_processes, make_process
from .rundir import CsvLog, RunDirectory
from .trajectory import TrajectoryRecorder, plot_trajectory

__all__ = ["main"]

EQUILIBRATE_COLUMNS = ("epoch", "lam", "gamma", "R", "D", "C", "F", "val_C", "val_acc", "grad_norm", "wall_s", "S")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _data_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", default="digits", help=f"one of {', '.join(available_datasets())} (default digits)")
    group.add_argument("--data-dir", default=None, help="folder with the data set's files (mnist, cifar10)")
    group.add_argument("--download", action="store_true", help="download missing mnist/cifar10 files")
    group.add_argument("--classes", default=None, help="label subset: 0-4, 5-9, 1,3,7, or vehicles/animals for cifar10")
    group.add_argument("--relabel", action="store_true", help="map the chosen classes to 0..k-1")
    group.add_argument("--val-fraction", type=float, default=0.2, help="validation share of the split (default 0.2)")


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default="mlp", help=f"one of {', '.join(available_architectures())} (default mlp)")
    group.add_argument("--latent-dim", type=int, default=8, help="dimension of z (default 8)")
    group.add_argument("--hidden", default="64,64", help="mlp hidden widths, comma separated (default 64,64)")
    group.add_argument("--width", type=int, default=64, help="resnet18 base width (default 64)")
    group.add_argument("--prior", default="normal", help="normal (default) or mog")


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("run")
    group.add_argument("--lam", type=float, default=1.0, help="λ, weight of the distortion (default 1)")
    group.add_argument("--gamma", type=float, default=10.0, help="γ, weight of the classification loss (default 10)")
    group.add_argument("--samples", type=int, default=1, help="K, fixed noise samples per example (default 1)")
    group.add_argument("--sigma", type=float, default=1e-3,
                       help="σ of eq. 6's σS term, S = ½‖θ‖² (default 1e-3; > 0 keeps J's minima isolated)")
    group.add_argument("--seed", type=int, default=0, help="seed of the split, the initialization and the noise")
    group.add_argument("--device", default="cpu", help="cpu or cuda")
    group.add_argument("--dtype", default="float32", help="float32 (default) or float64")
    group.add_argument("--out", required=True, help="output directory")
    group.add_argument("--overwrite", action="store_true", help="empty an existing --out first")
    group.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    group.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quasistatic", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"quasistatic {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    eq = commands.add_parser("equilibrate", help="train a model to the equilibrium surface at (λ, γ)")
    _data_arguments(eq)
    _model_arguments(eq)
    _run_arguments(eq)
    eq.add_argument("--epochs", type=int, default=120, help="epochs (default 120, the paper's)")
    eq.add_argument("--batch-size", type=int, default=32, help="minibatch size (default 32)")
    eq.add_argument("--from-checkpoint", default=None,
                    help="start from this checkpoint with the equilibration schedule η(s) instead of from scratch")
    eq.set_defaults(run=_equilibrate)

    iso = commands.add_parser("iso-classification", help="run the iso-classification process (eqs. 20-22)")
    iso.add_argument("--lam-end", type=float, default=None, help="final λ (λ̇ = λ_end − λ over s ∈ [0, 1])")
    iso.add_argument("--alpha", type=float, default=None, help="Remark 7's form λ̇ = −αC_γ, γ̇ = αC_λ instead")
    iso.set_defaults(run=_iso_classification)
    generic = commands.add_parser("process", help="run any registered quasi-static process")
    generic.add_argument("--process", required=True, help=f"one of {', '.join(available_processes())}")
    for flag, help_text in (("--lam-end", "final λ"), ("--alpha", "Remark 7's time scale α"),
                            ("--beta", "β of C + β⁻¹R (iso-c-rate)"), ("--lam-rate", "λ̇ (free)"),
                            ("--gamma-rate", "γ̇ (free)"), ("--slope", "k = dD/dR (geodesic-transfer)"),
                            ("--k", "λ̇ (constant-lambda-rate)")):
        generic.add_argument(flag, type=float, default=None, help=help_text)
    generic.set_defaults(run=_generic_process)
    for sub in (iso, generic):
        _data_arguments(sub)
        _model_arguments(sub)
        _run_arguments(sub)
        _engine_arguments(sub)
        sub.set_defaults(dtype="float64")  # processes need derivatives to rounding: float64 unless asked
    return parser


def _engine_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("process")
    group.add_argument("--steps", type=int, default=10, help="steps over s ∈ [0, 1] (default 10)")
    group.add_argument("--integrator", default="rk4", help=f"one of {', '.join(available_integrators())}")
    group.add_argument("--corrector", default="newton", help=f"one of {', '.join(available_correctors())}")
    group.add_argument("--method", default="engine", help="engine (default) or fd-equilibration (the paper's)")
    group.add_argument("--solver", default="cg", help="linear solver of the tangent systems (default cg)")
    group.add_argument("--solver-tol", type=float, default=1e-8, help="relative residual of the solves")
    group.add_argument("--polish-tol", type=float, default=1e-6,
                       help="‖∇θJ‖ the start must reach, and the newton corrector's tolerance (default 1e-6)")
    group.add_argument("--rtol", type=float, default=None, help="adaptive integrators: relative tolerance")
    group.add_argument("--atol", type=float, default=None, help="adaptive integrators: absolute tolerance")
    group.add_argument("--from-checkpoint", default=None, help="start from this checkpoint instead of equilibrating")
    group.add_argument("--epochs", type=int, default=120, help="epochs of the initial equilibration (default 120)")
    group.add_argument("--batch-size", type=int, default=32, help="minibatch size of equilibrations (default 32)")
    group.add_argument("--fd-step", type=float, default=1e-2, help="fd-equilibration: finite-difference step")
    group.add_argument("--fd-epochs", type=int, default=10, help="fd-equilibration: epochs per equilibration")


def _device(name: str) -> torch.device:
    accepted = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    if name not in accepted:
        raise choice_error("device" + ("" if torch.cuda.is_available() else " (CUDA is not available here)"),
                           accepted, name)
    return torch.device(name)


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise choice_error("dtype", DTYPES, name)
    return DTYPES[name]


def _hidden(spec: str) -> tuple[int, ...]:
    if spec.strip() == "":
        return ()  # no hidden layer: linear encoder and decoder
    try:
        widths = tuple(int(w) for w in spec.split(","))
    except ValueError:
        widths = ()
    if not widths or min(widths) < 1:
        raise bad_value("--hidden", "comma-separated positive integers such as 64,64 (or '' for none)", spec)
    return widths


def _model_config(args: argparse.Namespace, split) -> ModelConfig:
    if args.model not in available_architectures():
        raise choice_error("model", available_architectures(), args.model)
    return ModelConfig(architecture=args.model, input_shape=split.train.input_shape,
                       num_classes=split.train.num_classes, latent_dim=args.latent_dim,
                       hidden=_hidden(args.hidden), width=args.width, prior=args.prior,
                       likelihood="gaussian" if split.name == "cifar10" else "bernoulli")


def _inputs(args: argparse.Namespace) -> tuple[RunDirectory, DataSplit, ModelConfig]:
    """Validate the shared flags, then the output directory, the data and the model's config
    (in that order: nothing is touched on disk before every flag has been checked)."""
    if args.samples < 1:
        raise bad_value("--samples", "an integer >= 1", args.samples)
    if args.dataset not in available_datasets():
        raise choice_error("dataset", available_datasets(), args.dataset)
    run = RunDirectory(args.out, overwrite=args.overwrite, resume=args.resume)
    split = load_dataset(args.dataset, data_dir=args.data_dir, classes=args.classes, relabel=args.relabel,
                         seed=args.seed, val_fraction=args.val_fraction, download=args.download)
    return run, split, _model_config(args, split)


def _objectives(args: argparse.Namespace, model, split) -> tuple[Objective, Objective]:
    """J on the training split and on the validation split (its own fixed noise)."""
    return (Objective(model, split.train, samples=args.samples, noise_seed=args.seed, sigma=args.sigma),
            Objective(model, split.val, samples=args.samples, noise_seed=args.seed + 1000, sigma=args.sigma))


def _write_config(run: RunDirectory, args: argparse.Namespace, model_config: ModelConfig, split, **extra) -> None:
    """config.json: every setting, the model, the versions, the data, and the command's own part."""
    run.write_json("config.json", {"settings": _settings(args), "model": model_config.to_dict(), **extra,
                                   "versions": _versions(),
                                   "data": {"name": split.name, "train": len(split.train), "val": len(split.val)}})


def _settings(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("run", "command")}


def _equilibrate(args: argparse.Namespace) -> int:
    controls = Controls(args.lam, args.gamma)
    device, dtype = _device(args.device), _dtype(args.dtype)
    config = EquilibrationConfig(epochs=args.epochs, batch_size=args.batch_size,
                                 schedule="equilibration" if args.from_checkpoint else "initial")
    run, split, model_config = _inputs(args)
    state = None
    if args.resume:
        run.check_resumable(_settings(args), ignore=("resume", "overwrite", "no_progress", "device", "out"))
    if args.resume and run.file("checkpoint.pt").exists():  # none yet: interrupted in the first epoch
        state = load_checkpoint(run.file("checkpoint.pt"), expect=model_config)
        model = state.model(device, dtype)
    elif args.from_checkpoint:
        model = load_checkpoint(args.from_checkpoint, expect=model_config).model(device, dtype)
    else:
        model = build_model(model_config, seed=args.seed).to(device=device, dtype=dtype)

    train, val = _objectives(args, model, split)
    run.prepare()
    if not args.resume:
        _write_config(run, args, model_config, split, equilibration=config.to_dict())
    log = CsvLog(run.file("metrics.csv"), EQUILIBRATE_COLUMNS)
    start_epoch = 0 if state is None else state["epoch"] + 1
    log.keep_first(start_epoch)
    wall_before = 0.0 if state is None else state["wall_s"]
    started = time.perf_counter()
    data_info = {"dataset": split.name, "classes": args.classes, "relabel": args.relabel}

    def on_epoch(epoch: int, row: dict[str, float], optimizer_state: dict) -> None:
        wall = wall_before + time.perf_counter() - started
        log.append({"epoch": epoch + 1, "lam": controls.lam, "gamma": controls.gamma, "wall_s": wall, **row})
        save_checkpoint(run.file("checkpoint.pt"), model, controls, data_info, epoch=epoch,
                        optimizer=optimizer_state, wall_s=wall)

    try:
        equilibrate(train, controls, config, val=val, seed=args.seed, start_epoch=start_epoch,
                    optimizer_state=None if state is None else state["optimizer"], on_epoch=on_epoch,
                    progress=not args.no_progress)
    except DivergenceError as error:
        kept = (f"the last good checkpoint is {run.file('checkpoint.pt')}" if run.file("checkpoint.pt").exists()
                else "no epoch finished, so no checkpoint was written")
        print(f"quasistatic: {error}; {kept}", file=sys.stderr)
        return 1
    rows = log.rows()
    plot_columns(rows, "epoch", [("R", "D"), ("C", "val_C"), ("val_acc",), ("grad_norm",)],
                 run.file("curves.png"), title=f"equilibration at λ={controls.lam:g}, γ={controls.gamma:g}")
    last = rows[-1]
    print(f"equilibrated: R={float(last['R']):.4f} D={float(last['D']):.4f} C={float(last['C']):.4f} "
          f"val_acc={float(last['val_acc']):.4f} (encoder mean) grad_norm={float(last['grad_norm']):.3e}")
    print(f"wrote {run.file('metrics.csv')}, {run.file('curves.png')}, {run.file('checkpoint.pt')}")
    return 0


METHODS = ("engine", "fd-equilibration")


def _iso_classification(args: argparse.Namespace) -> int:
    return _run_process(args, "iso-classification", {"lam_end": args.lam_end, "alpha": args.alpha})


def _generic_process(args: argparse.Namespace) -> int:
    params = {name: getattr(args, name) for name in ("lam_end", "alpha", "beta", "lam_rate", "gamma_rate", "slope", "k")}
    return _run_process(args, args.process, params)


def _run_process(args: argparse.Namespace, name: str, params: dict) -> int:
    """Start on the surface (equilibrate or a checkpoint, then polish) and run the process."""
    controls = Controls(args.lam, args.gamma)
    device, dtype = _device(args.device), _dtype(args.dtype)
    process = make_process(name, controls, **{k: v for k, v in params.items() if v is not None})
    if process.uses_mixture:
        raise InputError(f"process {name!r} must run on a source/target mixture, got the single data set "
                         f"{args.dataset!r} (use the transfer command)")
    if args.steps < 1:
        raise bad_value("--steps", "an integer >= 1", args.steps)
    if args.method not in METHODS:
        raise choice_error("method", METHODS, args.method)
    integrator = make_integrator(args.integrator, rtol=args.rtol, atol=args.atol)
    corrector = make_corrector(args.corrector, **({"grad_tol": args.polish_tol, "solver": args.solver}
                                                  if args.corrector == "newton" else {}))
    run, split, model_config = _inputs(args)
    if args.resume:
        run.check_resumable(_settings(args), ignore=("resume", "overwrite", "no_progress", "device", "out"))
    if args.resume and run.file("start.pt").exists():
        model = load_checkpoint(run.file("start.pt"), expect=model_config).model(device, dtype)
    elif args.from_checkpoint:
        checkpoint = load_checkpoint(args.from_checkpoint, expect=model_config)
        saved = checkpoint.controls
        if (saved.lam, saved.gamma) != (controls.lam, controls.gamma):
            raise InputError(f"--lam and --gamma must equal the checkpoint's controls ({saved.lam:g}, {saved.gamma:g}), "
                             f"got ({controls.lam:g}, {controls.gamma:g})")
        model = checkpoint.model(device, dtype)
    else:
        model = build_model(model_config, seed=args.seed)
        start = Objective(model, split.train, samples=args.samples, noise_seed=args.seed, sigma=args.sigma)
        equilibrate(start, controls, EquilibrationConfig(epochs=args.epochs, batch_size=args.batch_size),
                    seed=args.seed, progress=not args.no_progress)
        model = model.to(device=device, dtype=dtype)
    train, val = _objectives(args, model, split)
    run.prepare()
    if not args.resume:
        _write_config(run, args, model_config, split, process=process.describe())
        save_checkpoint(run.file("start.pt"), model, controls, {"dataset": split.name, "classes": args.classes})
    recorder = TrajectoryRecorder(run, train, val)
    state = recorder.restore() if args.resume else None
    engine = QuasiStaticEngine(train, process, integrator, corrector,
                               EngineConfig(steps=args.steps, solver=args.solver, solver_tol=args.solver_tol))
    if state is None:
        polished = polish(train, train.initial_theta(), controls, grad_tol=args.polish_tol)
        require_equilibrium(polished, args.polish_tol)
        state = engine.start(polished.theta, controls)
        recorder.record(state)
    method = engine if args.method == "engine" else FiniteDifferenceEquilibration(
        train, process, steps=args.steps, fd_step=args.fd_step, epochs=args.fd_epochs, batch_size=args.batch_size,
        seed=args.seed)
    try:
        method.run(state, recorder.on_step)
    except (StepSizeError, DivergenceError) as error:
        print(f"quasistatic: {error}; the trajectory so far is in {run.file('trajectory.csv')}", file=sys.stderr)
        return 1
    rows = recorder.log.rows()
    plots = plot_trajectory(rows, run.path, f"{name} ({args.method})")
    values = [{k: float(v) for k, v in row.items()} for row in rows]
    c0 = values[0]["C"]
    residual, delta_r = first_law_residual(values, args.sigma)
    print(f"{name} ({args.method}, {args.integrator}/{args.corrector}): {len(rows) - 1} steps, "
          f"max |C - C0|/C0 = {max(abs(v['C'] - c0) for v in values) / abs(c0):.3e}, "
          f"first law |dR + lam dD + gamma dC + sigma dS| = {residual:.3e} of |dR| = {delta_r:.3e}, "
          f"grad_norm {values[0]['grad_norm']:.2e} -> {values[-1]['grad_norm']:.2e}, "
          f"{values[-1]['grad_evals']:.0f} gradient-equivalents")
    print(f"wrote {run.file('trajectory.csv')}, " + ", ".join(str(p) for p in plots))
    return 0


def _versions() -> dict[str, str]:
    import numpy
    import scipy
    import sklearn
    return {"quasistatic": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "scipy": scipy.__version__, "scikit-learn": sklearn.__version__}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``quasistatic`` console script; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except InputError as error:
        print(f"quasistatic: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
