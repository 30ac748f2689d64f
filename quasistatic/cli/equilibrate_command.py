"""``quasistatic equilibrate``: train a model towards the equilibrium surface at (λ, γ) (Sec. 5.1)."""

from __future__ import annotations

import argparse
import sys
import time

from ..checkpoint import load_checkpoint, save_checkpoint
from ..equilibrate import DivergenceError, EquilibrationConfig, equilibrate
from ..models import build_model
from ..objective import Controls
from ..plots import plot_columns
from ..rundir import CsvLog
from .options import (data_arguments, device_option, dtype_option, inputs, model_arguments, objectives,
                      run_arguments, settings, write_config)

__all__ = ["EQUILIBRATE_COLUMNS", "add_parser", "run"]

EQUILIBRATE_COLUMNS = ("epoch", "lam", "gamma", "R", "D", "C", "F", "val_C", "val_acc", "grad_norm", "wall_s", "S")


def add_parser(commands: argparse._SubParsersAction) -> None:
    eq = commands.add_parser("equilibrate", help="train a model to the equilibrium surface at (λ, γ)")
    data_arguments(eq)
    model_arguments(eq)
    run_arguments(eq)
    eq.add_argument("--epochs", type=int, default=120, help="epochs (default 120, the paper's)")
    eq.add_argument("--batch-size", type=int, default=32, help="minibatch size (default 32)")
    eq.add_argument("--from-checkpoint", default=None,
                    help="start from this checkpoint with the equilibration schedule η(s) instead of from scratch")
    eq.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Train a model to the surface at (λ, γ) with the paper's schedules; resumable per epoch."""
    controls = Controls(args.lam, args.gamma)
    device, dtype = device_option(args.device), dtype_option(args.dtype)
    config = EquilibrationConfig(epochs=args.epochs, batch_size=args.batch_size,
                                 schedule="equilibration" if args.from_checkpoint else "initial")
    run, split, model_config = inputs(args)
    state = None
    if args.resume:
        run.check_resumable(settings(args), ignore=("resume", "overwrite", "no_progress", "device", "out"))
    if args.resume and run.file("checkpoint.pt").exists():  # none yet: interrupted in the first epoch
        state = load_checkpoint(run.file("checkpoint.pt"), expect=model_config)
        model = state.model(device, dtype)
    elif args.from_checkpoint:
        model = load_checkpoint(args.from_checkpoint, expect=model_config).model(device, dtype)
    else:
        model = build_model(model_config, seed=args.seed).to(device=device, dtype=dtype)

    train, val = objectives(args, model, split)
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
