"""``quasistatic iso-classification``, ``quasistatic process`` and ``quasistatic rerun``: thin
parsers that make a :class:`~quasistatic.experiments.runner.RunConfig` (or read one from a run's config.json),
run it with :func:`~quasistatic.experiments.runner.run_process` and print what the run did."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from ..distributed import ShardGroup
from ..errors import InputError, bad_value
from ..processes import PROCESSES, available_processes
from ..experiments.runner import CONFIG_FILE, ProcessConfig, Run, RunConfig, StartConfig, run_process
from ..experiments.transfer_run import TransferConfig, run_transfer
from .transfer_command import report_transfer
from .options import (
    data_arguments,
    data_config,
    engine_arguments,
    follow_config,
    model_arguments,
    model_config,
    parameter_argument,
    registry_options,
    run_arguments,
    run_settings,
    start_config,
)

__all__ = ["PROCESS_FLAGS", "add_parsers", "process_config", "process_run_arguments", "run_config", "report"]

# the parameters of the built-in processes with a flag of their own (--lam-end, ...); any parameter: --param
PROCESS_FLAGS = {
    "lam_end": "final λ",
    "alpha": "Remark 7's time scale α",
    "beta": "β of C + β⁻¹R (iso-c-rate)",
    "lam_rate": "λ̇ (free)",
    "gamma_rate": "γ̇ (free)",
    "slope": "k = dD/dR (geodesic-transfer)",
    "k": "λ̇ (constant-lambda-rate)",
}


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
        process_run_arguments(sub)
        sub.add_argument(
            "--return",
            dest="return_sweep",
            action="store_true",
            help="after reaching --lam-end, drive lambda back to --lam with the same process from the "
            "end state (in OUT/return/), draw both sweeps in OUT/hysteresis.png and print the "
            "loop's dissipation",
        )
    rerun = commands.add_parser(
        "rerun",
        help="run a process or transfer run's config.json again (iso-classification, process, transfer)",
        description="Run the process or transfer of the run directory DIR again from its config.json "
        "alone, into --out (default: DIR itself, with --overwrite).",
    )
    rerun.add_argument(
        "dir", metavar="DIR", help="a run directory of iso-classification, process, transfer (OUT/METHOD) or rerun"
    )
    rerun.add_argument("--out", default=None, help="output directory (default: DIR, which needs --overwrite)")
    rerun.add_argument("--overwrite", action="store_true", help="empty an existing --out first")
    rerun.add_argument("--no-progress", action="store_true", help="hide progress bars")
    rerun.set_defaults(run=_rerun)


def process_run_arguments(sub: argparse.ArgumentParser) -> None:
    """The flags of a process run (data, model, start and run, engine, ``--method``), float64 by default."""
    data_arguments(sub)
    model_arguments(sub)
    run_arguments(sub)
    engine_arguments(sub)
    sub.add_argument("--method", default="engine", help="engine (default) or fd-equilibration (the paper's)")
    sub.set_defaults(dtype="float64")  # processes need derivatives to rounding: float64 unless asked


def _iso_classification(args: argparse.Namespace, group: ShardGroup | None) -> int:
    return report(
        run_process(
            run_config(
                args, process_config(args, "iso-classification", {"lam_end": args.lam_end, "alpha": args.alpha})
            ),
            progress=not args.no_progress,
            group=group,
        )
    )


def _generic_process(args: argparse.Namespace, group: ShardGroup | None) -> int:
    flags = {name: getattr(args, name) for name in PROCESS_FLAGS}
    return report(
        run_process(
            run_config(args, process_config(args, args.process, flags)), progress=not args.no_progress, group=group
        )
    )


def process_config(args: argparse.Namespace, process: str, flags: dict) -> ProcessConfig:
    """``process`` with the parameters of its flags (``flags``, None: not given) and of ``--param``,
    and ``--return``."""
    params = registry_options(PROCESSES, process, args.param, "--param", flags)
    return ProcessConfig(process, params, return_sweep=args.return_sweep)


def _rerun(args: argparse.Namespace, group: ShardGroup | None) -> int:
    """A process or transfer run again from its config.json (a transfer's holds its ``method``)."""
    path = Path(args.dir) / CONFIG_FILE
    if not path.is_file():
        raise bad_value("DIR", f"a run directory with a {CONFIG_FILE}", args.dir)
    out = args.dir if args.out is None else args.out
    try:
        saved = json.loads(path.read_text())
        kind = TransferConfig if isinstance(saved, dict) and "method" in saved else RunConfig
        config = kind.from_dict(saved)
    except (InputError, json.JSONDecodeError) as error:
        raise InputError(
            f"{path} must be the config of a process run (iso-classification, process) or of a transfer run, "
            f"got one that is not: {error}"
        ) from None
    config = replace(config, out=out, overwrite=args.overwrite, resume=False)
    if isinstance(config, TransferConfig):
        return report_transfer(run_transfer(config, progress=not args.no_progress, group=group), group)
    return report(run_process(config, progress=not args.no_progress, group=group))


def run_config(args: argparse.Namespace, process: ProcessConfig, start: StartConfig | None = None) -> RunConfig:
    """The RunConfig of the process command's flags, running ``process`` (:func:`process_config`)
    from ``start`` (default: the flags')."""
    return RunConfig(
        out=args.out,
        data=data_config(args),
        model=model_config(args),
        start=start_config(args) if start is None else start,
        process=process,
        follow=follow_config(args, args.method),
        **run_settings(args),
    )


def report(run: Run) -> int:
    """Print what ``run`` did (its summary, the files written, the return sweep's loop); the exit
    code: 0, or 1 when a process could not be followed (its trajectory so far kept)."""
    if run.failure is not None:
        print(f"quasistatic: {run.failure}", file=sys.stderr)
        return 1
    print(run.summary())
    print(f"wrote {run.directory / 'trajectory.csv'}, " + ", ".join(str(p) for p in run.figures))
    back = run.returned
    if back is None:
        return 0
    if back.failure is not None:
        print(f"quasistatic: {back.failure}", file=sys.stderr)
        return 1
    print(back.summary())
    print(f"{run.loop_summary()}; wrote {back.directory / 'trajectory.csv'}, {run.hysteresis}")
    return 0
