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
import json
import sys
import warnings
from dataclasses import replace
from pathlib import Path

from ..distributed import ShardGroup, is_main_process
from ..errors import bad_value, choice_error
from ..experiments.runner import METHODS, trajectory_summary
from ..experiments.trajectory import numeric
from ..experiments.transfer import BASELINES, TRANSFER_PROCESSES, transfer_parameter
from ..experiments.transfer_run import TransferConfig, TransferRun, run_transfer, transfer_methods
from .options import (
    data_arguments,
    data_config,
    engine_arguments,
    follow_config,
    model_arguments,
    model_config,
    parameter_argument,
    registry_options,
    run_settings,
    run_arguments,
    start_config,
)
from .ranks import shows_progress

__all__ = ["add_parser", "report_transfer", "run", "transfer_config"]

PARAMETER_FLAGS = {"lam_end": "--lam-end", "slope": "--slope", "k": "--k"}


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
        help=f"one of {', '.join(transfer_methods())} (default iso-c); the baselines train for --epochs",
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


def transfer_config(args: argparse.Namespace) -> TransferConfig:
    """The run's :class:`~quasistatic.experiments.transfer_run.TransferConfig` from the flags (every
    one checked here: exit 2 on a bad one); this method's run goes to OUT/METHOD."""
    if args.method not in transfer_methods():  # before the flags that depend on it
        raise choice_error("method", transfer_methods(), args.method)
    if args.follow not in METHODS:
        raise choice_error("follow", METHODS, args.follow)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise bad_value("--out", "a directory", args.out)
    own = transfer_parameter(args.method) if args.method in TRANSFER_PROCESSES else None
    params = (
        registry_options(
            TRANSFER_PROCESSES,
            args.method,
            args.param,
            "--param",
            {own: getattr(args, own)} if own in PARAMETER_FLAGS else {},
        )
        if args.method in TRANSFER_PROCESSES
        else {}
    )
    return TransferConfig(
        out=str(Path(args.out) / args.method),
        data=replace(data_config(args), classes=None, relabel=False),  # the tasks select the classes
        model=model_config(args),
        start=start_config(args) if args.method != "scratch" else replace(start_config(args), checkpoint=None),
        follow=follow_config(args, args.follow),
        **run_settings(args),
        method=args.method,
        source=args.source,
        target=args.target,
        labels=args.labels,
        max_per_class=args.max_per_class,
        params=params,
    )


def run(args: argparse.Namespace, group: ShardGroup | None) -> int:
    """Check every flag, then run ``--method`` from the source model (on the ranks of ``group``,
    when given) and print what it did."""
    config = transfer_config(args)
    _warn_unused(args)
    return report_transfer(run_transfer(config, progress=shows_progress(args, group), group=group), group)


def report_transfer(result: TransferRun, group: ShardGroup | None = None) -> int:
    """Print what the transfer run ``result`` did (rank 0) and the files written; the exit code: 0,
    or 1 when it stopped before t = 1 (its trajectory so far kept)."""
    config = result.config
    if result.error is not None:
        print(f"quasistatic: {result.failure}", file=sys.stderr)
        return 1
    if not is_main_process(group):
        return 0
    rows = result.trajectory
    if result.process is not None:
        accuracy = [float(row["target_val_acc"]) for row in rows]
        how = (
            f"{config.follow.integrator}/{config.follow.corrector}"
            if config.follow.method == "engine"
            else config.follow.method
        )
        print(
            f"{config.method} ({how}): {trajectory_summary(rows, config.sigma, result.process)}; "
            f"C0 = {float(rows[0]['C']):.6g} on the source (polished start), "
            f"target_val_acc {accuracy[0]:.4f} -> {accuracy[-1]:.4f}"
        )
    else:
        first, last = numeric(rows[0]), numeric(rows[-1])
        k = len(result.data.target_classes)
        c0 = json.loads((result.directory / "config.json").read_text())["record"]["start_C"]
        drift = (
            "" if c0 is None else f" (C0 = {c0:.6g} on the source, |C - C0|/C0 = {abs(last['C'] - c0) / abs(c0):.3e})"
        )
        print(
            f"{config.method}: first-epoch target_val_acc = {first['target_val_acc']:.4f} (chance 1/{k} = "
            f"{1 / k:.4f}), final target_val_acc = {last['target_val_acc']:.4f} after {last['step']:.0f} epochs; "
            f"C = {last['C']:.6g} on the target{drift}; {last['grad_evals']:.0f} gradient-equivalents, "
            f"{last['wall_s']:.0f} s"
        )
    print(f"wrote {result.directory / 'trajectory.csv'}, " + ", ".join(str(p) for p in result.figures))
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
    if args.method in BASELINES and args.max_work is not None:
        unused.append("--max-work (a baseline trains for --epochs)")
    if args.method == "scratch" and args.from_checkpoint:
        unused.append("--from-checkpoint (scratch starts from a fresh model)")
    for flag in unused:
        warnings.warn(f"{flag} is unused by transfer --method {args.method}", UserWarning, stacklevel=3)
