"""``quasistatic reproduce FIGURE``: the paper's figure as runs (:mod:`quasistatic.experiments.reproduce`),
with the process commands' data, model, run and engine flags applied to every run; under torchrun
the runs go one after the other, each over all ranks (``--jobs 1``), and rank 0 writes."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from ..continuation.equilibrate import EquilibrationConfig
from ..distributed import ShardGroup
from ..errors import bad_value
from ..experiments.reproduce import FIGURES, reproduce
from ..experiments.runner import ProcessConfig, StartConfig
from .options import parameter_argument, registry_options
from .process_command import process_run_arguments, run_config
from .ranks import agree_on_settings

__all__ = ["add_parser"]


def add_parser(commands: argparse._SubParsersAction) -> None:
    sub = commands.add_parser(
        "reproduce",
        help="run one of the paper's figures (its runs in parallel with --jobs) and draw it",
        description="Run the paper's runs of FIGURE, each in OUT/<run>/ (resumable), draw them on "
        "OUT/<figure>.png and write OUT/results.json and OUT/results.md.",
    )
    sub.add_argument("figure", metavar="FIGURE", help=f"one of {', '.join(FIGURES.available())}")
    sub.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs at a time, each in its own process (default 1; 1 under torchrun: each run over all ranks)",
    )
    sub.add_argument("--lam-end", type=float, default=None, help="final λ of every run (default: the figure's)")
    parameter_argument(sub, FIGURES, FIGURES.available())
    process_run_arguments(sub)
    sub.set_defaults(run=_reproduce, lam=None, gamma=None)


def _reproduce(args: argparse.Namespace, group: ShardGroup | None) -> int:
    if args.gamma is not None:
        raise bad_value(
            "--gamma",
            "not given: the figure sets its runs' γ (--param gammas=4,6,... or --param gamma=...)",
            args.gamma,
        )
    if args.from_checkpoint is not None:
        raise bad_value("--from-checkpoint", "not given: every run equilibrates at its own start", args.from_checkpoint)
    FIGURES.get(args.figure)  # an unknown figure raises, naming the registered ones
    options = registry_options(FIGURES, args.figure, args.param, "--param", {"lam": args.lam, "lam_end": args.lam_end})
    equilibration = EquilibrationConfig(epochs=args.epochs, batch_size=args.batch_size)
    template = run_config(args, ProcessConfig("iso-classification"), StartConfig(equilibration=equilibration))
    spec = FIGURES.make(args.figure, template, **options)
    if args.resume:  # resume the runs that started; start the others
        spec = replace(
            spec,
            runs={n: replace(c, resume=(Path(c.out) / "config.json").exists()) for n, c in spec.runs.items()},
        )
    agree_on_settings(args, group)
    results = reproduce(spec, args.out, jobs=args.jobs, threads=args.threads, command=args.command_line, group=group)
    stopped = [run for run in results["runs"] if run["error"]]
    for run in stopped:
        print(f"quasistatic: {run['name']}: {run['error']}", file=sys.stderr)
    print(f"wrote {results['png']}, {Path(args.out) / 'results.json'}, {Path(args.out) / 'results.md'}")
    return 1 if stopped else 0
