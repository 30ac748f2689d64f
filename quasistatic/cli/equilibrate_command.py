"""``quasistatic equilibrate``: train a model to the equilibrium surface at (λ, γ): the paper's Adam
schedule (Sec. 5.1), then the full-batch polish of the processes' start (:func:`quasistatic.polish`,
in float64) to ‖∇θJ‖ ≤ ``--grad-tol``, so that the checkpoint lies on the surface (eq. 15)."""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

from ..experiments.checkpoint import load_checkpoint, save_checkpoint
from ..continuation.equilibrate import DivergenceError, EquilibrationConfig, equilibrate
from ..distributed import ShardGroup
from ..errors import bad_value
from ..linalg import LinearSolve, LinearSolveConfig
from ..models import RepresentationModel, build_model
from ..thermo.objective import Controls
from ..experiments.plots import plot_columns
from ..continuation.polish import PolishResult, polish
from ..experiments.rundir import CsvLog, RunDirectory
from ..experiments.runner import rank_directory, split_objectives, torch_device, torch_dtype
from .options import (
    RESUME_IGNORES,
    data_arguments,
    inputs,
    linalg_arguments,
    linear_solve_config,
    model_arguments,
    run_arguments,
    settings,
    write_config,
)
from .ranks import agree_on_settings, shows_progress

__all__ = ["EQUILIBRATE_COLUMNS", "add_parser", "run"]

EQUILIBRATE_COLUMNS = ("epoch", "lam", "gamma", "R", "D", "C", "F", "val_C", "val_acc", "grad_norm", "wall_s", "S")


def add_parser(commands: argparse._SubParsersAction) -> None:
    eq = commands.add_parser("equilibrate", help="train a model to the equilibrium surface at (λ, γ)")
    data_arguments(eq)
    model_arguments(eq)
    run_arguments(eq)
    eq.add_argument("--epochs", type=int, default=120, help="epochs (default 120, the paper's)")
    eq.add_argument("--batch-size", type=int, default=32, help="minibatch size (default 32)")
    eq.add_argument(
        "--from-checkpoint",
        default=None,
        help="start from this checkpoint with the equilibration schedule η(s) instead of from scratch",
    )
    eq.add_argument(
        "--grad-tol",
        type=float,
        default=1e-4,
        help="after Adam, polish (full batch, float64) until ‖∇θJ‖ ≤ this (default 1e-4)",
    )
    eq.add_argument("--no-polish", action="store_true", help="stop after Adam (the paper's procedure alone)")
    linalg_arguments(eq)
    eq.set_defaults(run=run)


def run(args: argparse.Namespace, group: ShardGroup | None) -> int:
    """Train a model to the surface at (λ, γ) with the paper's schedules; resumable per epoch.
    Under torchrun (``group``) every rank trains and polishes on its shard, rank 0 writes
    (:mod:`.ranks`)."""
    controls = Controls(args.lam, args.gamma)
    device, dtype = torch_device(args.device), torch_dtype(args.dtype)
    config = EquilibrationConfig(
        epochs=args.epochs, batch_size=args.batch_size, schedule="equilibration" if args.from_checkpoint else "initial"
    )
    if not args.grad_tol > 0:
        raise bad_value("--grad-tol", "a number > 0", args.grad_tol)
    solve_config = linear_solve_config(args)
    run, split, model_config = inputs(args)
    state = None
    if args.resume:
        run.check_resumable(settings(args), ignore=RESUME_IGNORES)
    if args.resume and run.file("checkpoint.pt").exists():  # none yet: interrupted in the first epoch
        state = load_checkpoint(run.file("checkpoint.pt"), expect=model_config)
        model = state.model(device, dtype)
    elif args.from_checkpoint:
        model = load_checkpoint(args.from_checkpoint, expect=model_config).model(device, dtype)
    else:
        model = build_model(model_config, seed=args.seed).to(device=device, dtype=dtype)

    if not args.no_polish:
        solve_config.resolved(sum(p.numel() for p in model.parameters()))  # refused before the training
    agree_on_settings(args, group)
    progress = shows_progress(args, group)
    train, val = split_objectives(
        model, split, samples=args.samples, sigma=args.sigma, seed=args.seed, chunk_size=args.chunk_size, group=group
    )
    run = rank_directory(run, group)
    run.prepare()
    if not args.resume:
        write_config(run, args, model_config, split, equilibration=config.to_dict())
    log = CsvLog(run.file("metrics.csv"), EQUILIBRATE_COLUMNS)
    start_epoch = 0 if state is None else state["epoch"] + 1
    log.keep_first(start_epoch)
    wall_before = 0.0 if state is None else state["wall_s"]
    started = time.perf_counter()
    data_info = {"dataset": split.name, "classes": args.classes, "relabel": args.relabel}

    def on_epoch(epoch: int, row: dict[str, float], optimizer_state: dict) -> None:
        wall = wall_before + time.perf_counter() - started
        log.append({"epoch": epoch + 1, "lam": controls.lam, "gamma": controls.gamma, "wall_s": wall, **row})
        save_checkpoint(
            run.file("checkpoint.pt"), model, controls, data_info, epoch=epoch, optimizer=optimizer_state, wall_s=wall
        )

    try:
        equilibrate(
            train,
            controls,
            config,
            val=val,
            seed=args.seed,
            start_epoch=start_epoch,
            optimizer_state=None if state is None else state["optimizer"],
            on_epoch=on_epoch,
            progress=progress,
        )
    except DivergenceError as error:
        kept = (
            f"the last good checkpoint is {run.file('checkpoint.pt')}"
            if run.file("checkpoint.pt").exists()
            else "no epoch finished, so no checkpoint was written"
        )
        print(f"quasistatic: {error}; {kept}", file=sys.stderr)
        return 1
    rows = log.rows()
    plot_columns(
        rows,
        "epoch",
        [("R", "D"), ("C", "val_C"), ("val_acc",), ("grad_norm",)],
        run.file("curves.png"),
        title=f"equilibration at λ={controls.lam:g}, γ={controls.gamma:g}",
    )
    last = rows[-1]
    print(
        f"equilibrated (Adam): R={float(last['R']):.4f} D={float(last['D']):.4f} C={float(last['C']):.4f} "
        f"val_acc={float(last['val_acc']):.4f} (encoder mean) grad_norm={float(last['grad_norm']):.3e}"
    )
    code = 0
    if not args.no_polish:
        code = _polish(
            args,
            solve_config,
            run,
            model,
            split,
            controls,
            data_info,
            len(rows) - 1,
            wall_before + time.perf_counter() - started,
            group,
            progress,
        )
    print(
        f"wrote {run.file('metrics.csv')}, {run.file('curves.png')}, {run.file('checkpoint.pt')}"
        + ("" if args.no_polish else f", {run.file('polish.json')}")
    )
    return code


def _polish(
    args: argparse.Namespace,
    solve_config: LinearSolveConfig,
    run: RunDirectory,
    model: RepresentationModel,
    split,
    controls: Controls,
    data_info: dict,
    epoch: int,
    wall: float,
    group: ShardGroup | None,
    progress: bool,
) -> int:
    """Polish the trained model in float64 to ‖∇θJ‖ ≤ --grad-tol (on the ranks of ``group``, when
    given), save it as the checkpoint, write polish.json (both gradient norms, the work, the
    validation metrics) and print it; 1 when the tolerance was not reached (the better model is
    still saved)."""
    exact = copy.deepcopy(model).to(dtype=torch.float64)
    train, val = split_objectives(
        exact, split, samples=args.samples, sigma=args.sigma, seed=args.seed, chunk_size=args.chunk_size, group=group
    )
    started = time.perf_counter()
    result: PolishResult = polish(
        LinearSolve(train, solve_config),
        train.initial_theta(),
        controls,
        grad_tol=args.grad_tol,
        progress=progress,
    )
    train.layout.write(exact, result.theta)
    wall += time.perf_counter() - started
    values = train.report(result.theta)
    summary = {
        "grad_tol": args.grad_tol,
        "grad_norm_adam": result.grad_norm_before,
        "grad_norm": result.grad_norm,
        "converged": result.converged,
        "iterations": result.iterations,
        "saddles_escaped": result.escapes,
        "gradient_equivalents": train.work.gradient_equivalents,
        "wall_s": wall,
        "R": values.R,
        "D": values.D,
        "C": values.C,
        "val_C": val.report(result.theta).C,
        "val_acc": val.accuracy(result.theta),
    }
    run.write_json("polish.json", summary)
    save_checkpoint(run.file("checkpoint.pt"), exact, controls, data_info, epoch=epoch, optimizer=None, wall_s=wall)
    print(
        f"polished (float64, full batch): grad_norm {result.grad_norm_before:.3e} -> {result.grad_norm:.3e} "
        f"(--grad-tol {args.grad_tol:g}) C={values.C:.4f} val_acc={summary['val_acc']:.4f}, "
        f"{summary['gradient_equivalents']:.0f} gradient-equivalents"
    )
    if not result.converged:
        print(
            f"quasistatic: the polish did not reach --grad-tol {args.grad_tol:g}; the checkpoint holds the "
            "polished model; equilibrate longer or raise --grad-tol",
            file=sys.stderr,
        )
        return 1
    return 0
