"""``quasistatic transfer``: carry a model from a source task to a target task (Sec. 4, Figs. 5–6).

The source model is trained to equilibrium on the source classes (or read with
``--from-checkpoint``); then ``--method`` either runs a transfer process over t ∈ [0, 1] on the
data mixture of eq. 23 (``iso-c``: eqs. 26–28, ``geodesic``: eq. 30, ``constant-lambda-rate``:
eq. 32), started on the surface like the process commands and followed by the engine or (``--follow
fd-equilibration``) by the paper's finite differences of re-equilibrated models, or a baseline (``finetune``: the source
model trained on the target at the starting (λ, γ); ``scratch``: a fresh model trained on the
target). Each method writes into ``--out``/METHOD/; ``--out``/transfer.png draws every method
found there together. Under torchrun every method runs data-parallel, the baselines' Adam epochs
included (:mod:`.ranks`).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import replace
from pathlib import Path

from ..experiments.checkpoint import load_checkpoint, save_checkpoint
from ..continuation.equilibrate import DivergenceError, EquilibrationConfig
from ..distributed import ShardGroup, is_main_process
from ..errors import bad_value, choice_error
from ..models import ModelConfig, RepresentationModel, build_model
from ..thermo.objective import Controls
from ..processes import Process
from ..experiments.rundir import RunDirectory
from ..experiments.runner import (
    METHODS,
    FollowConfig,
    follow,
    model_for_data,
    rank_directory,
    starting_model,
    stop_message,
    torch_device,
    torch_dtype,
    trajectory_summary,
)
from ..experiments.trajectory import TrajectoryRecorder, numeric, plot_trajectory
from ..experiments.transfer import (
    BASELINES,
    TRANSFER_PROCESSES,
    TransferData,
    TransferObjectives,
    make_transfer_process,
    plot_baseline,
    plot_transfer,
    train_baseline,
    transfer_data,
    transfer_parameter,
)
from .options import (
    RESUME_IGNORES,
    data_arguments,
    data_config,
    engine_arguments,
    follow_config,
    inputs,
    linear_solve_config,
    model_arguments,
    model_config,
    parameter_argument,
    registry_options,
    run_arguments,
    settings,
    start_config,
    write_config,
)
from .ranks import agree_on_settings, shows_progress

__all__ = ["methods", "add_parser", "run"]

PARAMETER_FLAGS = {"lam_end": "--lam-end", "slope": "--slope", "k": "--k"}


def methods() -> list[str]:
    """The transfer methods: the registered transfer processes, then the baselines."""
    return [*TRANSFER_PROCESSES, *BASELINES]


def add_parser(commands: argparse._SubParsersAction) -> None:
    # "resolve": this command's --out (a folder of method runs) replaces the shared one (a single run).
    sub = commands.add_parser(
        "transfer",
        help="transfer a model from source to target classes (Sec. 4)",
        description=__doc__.split("\n\n")[1].replace("\n", " ").replace("``", ""),
        conflict_handler="resolve",
    )
    data_arguments(sub)
    model_arguments(sub)
    run_arguments(sub)
    engine_arguments(sub)
    group = sub.add_argument_group("transfer")
    group.add_argument(
        "--method",
        default="iso-c",
        help=f"one of {', '.join(methods())} (default iso-c); the baselines train for --epochs",
    )
    group.add_argument("--source", required=True, help="source classes: 0-4, 1,3,7, or vehicles/animals for cifar10")
    group.add_argument("--target", required=True, help="target classes, disjoint from the source classes")
    group.add_argument(
        "--labels",
        default="shared",
        help="shared (default): keep the labels, one head over all classes of the data set (the "
        "paper's MNIST); separate: relabel source and target each to 0..k-1, one k-way head "
        "(the paper's CIFAR-10; both need k classes)",
    )
    group.add_argument(
        "--max-per-class",
        type=int,
        default=None,
        help="keep the first N training and N validation examples of each class (default all)",
    )
    group.add_argument(
        "--lam-end", type=float, default=None, help="iso-c: final λ, λ̇ = λ_end − λ (default: λ kept, γ alone holds C)"
    )
    group.add_argument("--slope", type=float, default=None, help="geodesic (required): k = dD/dR of the R–D line")
    group.add_argument(
        "--k",
        type=float,
        default=None,
        help="constant-lambda-rate: λ̇ = k (default -1.5, the paper's with λ = 4); needs λ + k >= 0",
    )
    group.add_argument(
        "--follow",
        default="engine",
        help="how a transfer process is followed: engine (default: exact tangents, C held by Newton) or "
        "fd-equilibration (the paper's: finite differences of models re-equilibrated with Adam, "
        "--steps Euler steps, C held only approximately)",
    )
    parameter_argument(group, TRANSFER_PROCESSES, TRANSFER_PROCESSES.available())
    group.add_argument(
        "--out",
        required=True,
        help="output folder: this method's run goes to OUT/METHOD/, the comparison to OUT/transfer.png",
    )
    sub.set_defaults(run=run, dtype="float64")  # processes need derivatives to rounding: float64 unless asked


def run(args: argparse.Namespace, group: ShardGroup | None) -> int:
    """Check every flag, build the tasks, start from the source model and run ``--method`` (on the
    ranks of ``group``, when given)."""
    if args.method not in methods():
        raise choice_error("method", methods(), args.method)
    if args.follow not in METHODS:
        raise choice_error("follow", METHODS, args.follow)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise bad_value("--out", "a directory", args.out)
    _warn_unused(args)
    start = start_config(args)
    controls = start.controls
    process, follows = None, None
    if args.method in TRANSFER_PROCESSES:
        own = transfer_parameter(args.method)
        params = registry_options(
            TRANSFER_PROCESSES,
            args.method,
            args.param,
            "--param",
            {own: getattr(args, own)} if own in PARAMETER_FLAGS else {},
        )
        process = make_transfer_process(args.method, controls, **params)
        follows = follow_config(args, args.follow)
        follows.check(process)
    # This method's run goes to its own folder, OUT/METHOD; the whole data set is loaded (the tasks select).
    run_dir, split, _ = inputs(
        args, out=Path(args.out) / args.method, data=replace(data_config(args), classes=None, relabel=False)
    )
    data = transfer_data(split, args.source, args.target, args.labels, args.max_per_class)
    config = model_for_data(model_config(args), data.source.train)
    if args.resume:
        run_dir.check_resumable(settings(args), ignore=RESUME_IGNORES)
    if args.from_checkpoint and args.method != "scratch":
        _check_head(args.from_checkpoint, config, data)
    agree_on_settings(args, group)
    progress = shows_progress(args, group)

    def objectives_of(model: RepresentationModel) -> TransferObjectives:
        return TransferObjectives(
            model, data, samples=args.samples, seed=args.seed, sigma=args.sigma, chunk_size=args.chunk_size, group=group
        )

    device, dtype = torch_device(args.device), torch_dtype(args.dtype)
    if args.method == "scratch":
        model = build_model(config, seed=args.seed).to(device=device, dtype=dtype)
    else:
        model = starting_model(
            start,
            config,
            run_dir,
            lambda m: objectives_of(m).source,
            linear_solve=linear_solve_config(args),
            seed=args.seed,
            device=device,
            dtype=dtype,
            progress=progress,
        )
    objectives = objectives_of(model)
    run_dir = rank_directory(run_dir, group)
    run_dir.prepare()
    if not args.resume:
        # start_C: C of the starting model on the source training set (a process polishes it first)
        start_c = None if args.method == "scratch" else objectives.source.report(objectives.source.initial_theta()).C
        write_config(
            run_dir,
            args,
            config,
            split,
            transfer={
                "method": args.method,
                **data.describe(),
                "start_C": start_c,
                "process": None if process is None else process.describe(),
            },
        )
        if args.method != "scratch":
            save_checkpoint(
                run_dir.file("start.pt"),
                model,
                controls,
                {"dataset": split.name, "classes": args.source, "labels": args.labels},
            )
    title = f"{split.name} {args.source} → {args.target} ({args.labels} labels)"
    if process is not None and follows is not None:
        code, files = _run_process(args, follows, process, objectives, run_dir, title, progress)
    else:
        code, files = _run_baseline(args, objectives, run_dir, controls, title, progress)
    if code or not is_main_process(group):  # transfer.png draws the methods' runs in --out: rank 0's
        return code
    figure = plot_transfer(Path(args.out), title)
    assert figure is not None  # this run has rows
    files.append(figure)
    print(f"wrote {run_dir.file('trajectory.csv')}, " + ", ".join(str(p) for p in files))
    return 0


def _warn_unused(args: argparse.Namespace) -> None:
    """Warn about flags given but not used by this method (habit 5: never drop them silently)."""
    unused = []
    if args.classes is not None or args.relabel:
        unused.append("--classes/--relabel (the tasks are --source, --target and --labels)")
    own = transfer_parameter(args.method) if args.method in TRANSFER_PROCESSES else None
    unused += [flag for name, flag in PARAMETER_FLAGS.items() if getattr(args, name) is not None and name != own]
    if args.param and args.method in BASELINES:
        unused.append("--param (a baseline runs no process)")
    if args.method in BASELINES and args.follow != "engine":
        unused.append("--follow (a baseline runs no process)")
    if args.method == "scratch" and args.from_checkpoint:
        unused.append("--from-checkpoint (scratch starts from a fresh model)")
    for flag in unused:
        warnings.warn(f"{flag} is unused by transfer --method {args.method}", UserWarning, stacklevel=3)


def _check_head(path: str, config: ModelConfig, data: TransferData) -> None:
    """The checkpoint's classifier head must have the size that ``--labels`` asks for."""
    saved = load_checkpoint(path)["model_config"]["num_classes"]
    if saved != config.num_classes:
        how = (
            f"--labels separate: source and target each relabelled to 0..{config.num_classes - 1}"
            if data.labels == "separate"
            else f"--labels shared: one head over the data set's {config.num_classes} classes"
        )
        raise bad_value("--from-checkpoint classifier head", f"{config.num_classes} classes wide ({how})", saved)


def _run_process(
    args: argparse.Namespace,
    follows: FollowConfig,
    process: Process,
    objectives: TransferObjectives,
    run_dir: RunDirectory,
    title: str,
    progress: bool,
) -> tuple[int, list[Path]]:
    """Polish the start onto the surface at t = 0 and run the process to t = 1 on the mixture
    (:func:`quasistatic.experiments.runner.follow`)."""
    recorder = TrajectoryRecorder(run_dir, objectives.mixture, objectives.mixture_val, target_val=objectives.target_val)
    error = follow(
        process,
        objectives.mixture,
        recorder,
        follows,
        seed=args.seed,
        batch_size=args.batch_size,
        progress=progress,
    )
    if error is not None:
        print(f"quasistatic: {stop_message(error, run_dir.path)}", file=sys.stderr)
        return 1, []
    rows = recorder.log.rows()
    accuracy = [float(row["target_val_acc"]) for row in rows]
    how = f"{follows.integrator}/{follows.corrector}" if follows.method == "engine" else follows.method
    print(
        f"{args.method} ({how}): "
        f"{trajectory_summary(rows, args.sigma, process)}; "
        f"C0 = {float(rows[0]['C']):.6g} on the source (polished start), "
        f"target_val_acc {accuracy[0]:.4f} -> {accuracy[-1]:.4f}"
    )
    return 0, plot_trajectory(rows, run_dir.path, f"{title}: {args.method}")


def _run_baseline(
    args: argparse.Namespace,
    objectives: TransferObjectives,
    run_dir: RunDirectory,
    controls: Controls,
    title: str,
    progress: bool,
) -> tuple[int, list[Path]]:
    """Train on the target alone (t = 1) for --epochs with the initial schedule (Sec. 5.1: Adam, lr
    1e-3 divided by 10 every 50 epochs, as the source model), one row per epoch."""
    recorder = TrajectoryRecorder(run_dir, objectives.target, objectives.mixture_val, target_val=objectives.target_val)
    try:
        train_baseline(
            objectives.target,
            Controls(controls.lam, controls.gamma, 1.0),
            EquilibrationConfig(epochs=args.epochs, batch_size=args.batch_size),
            recorder,
            seed=args.seed,
            resume=args.resume,
            progress=progress,
        )
    except DivergenceError as error:
        print(f"quasistatic: {error}; the trajectory so far is in {recorder.log.path}", file=sys.stderr)
        return 1, []
    rows = [numeric(row) for row in recorder.log.rows()]
    first, last = rows[0], rows[-1]
    k = len(objectives.data.target_classes)
    c0 = run_dir.read_json("config.json")["transfer"]["start_C"]
    drift = "" if c0 is None else f" (C0 = {c0:.6g} on the source, |C - C0|/C0 = {abs(last['C'] - c0) / abs(c0):.3e})"
    print(
        f"{args.method}: first-epoch target_val_acc = {first['target_val_acc']:.4f} (chance 1/{k} = {1 / k:.4f}), "
        f"final target_val_acc = {last['target_val_acc']:.4f} after {last['step']:.0f} epochs; "
        f"C = {last['C']:.6g} on the target{drift}; {last['grad_evals']:.0f} gradient-equivalents, "
        f"{last['wall_s']:.0f} s"
    )
    return 0, [plot_baseline(recorder.log.rows(), run_dir.path, f"{title}: {args.method}")]
