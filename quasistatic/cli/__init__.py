"""The ``quasistatic`` command line.

Bad input ends with one line ``quasistatic: error: …`` naming the bad value and the accepted ones,
exit code 2, and no earlier output touched; a diverging run ends with exit code 1 and keeps its
last good checkpoint. The library's log messages (a jump past a fold, a fold turned at) go to
stderr between the progress bars. One module per command: ``equilibrate_command``,
``process_command`` (iso-classification, any registered process, and ``rerun`` of a run's
config.json: parsers around :func:`quasistatic.experiments.runner.run_process`), ``transfer_command``,
``reproduce_command`` (the paper's figures, :mod:`quasistatic.experiments.reproduce`);
``options`` holds the flags, the configs they make and the set-up the commands share.

Every name a command takes (``--process``, ``--corrector``, ``--integrator``, ``--dataset``, ...)
is looked up in its registry when the command runs, so ``--import MODULE`` (a module that
registers its own processes, correctors, data sets, ...) makes them runnable by name, with their
parameters given as ``--param NAME=VALUE``.

Under ``torchrun --nproc_per_node N -m quasistatic ...`` the process commands run data-parallel
(:mod:`quasistatic.distributed`): each rank evaluates J on its shard of the data, rank 0 prints and
writes, and a rank that fails prints ``quasistatic: error: rank R: …`` and exits at once (2 for bad
input, 1 otherwise), which stops the others.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import shlex
import sys
import traceback
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .. import __version__
from ..distributed import ShardGroup, abort_on_failure, init_from_env
from ..errors import InputError, bad_value
from ..experiments.runner import import_modules
from . import equilibrate_command, process_command, reproduce_command, transfer_command

__all__ = ["main"]


class _TqdmHandler(logging.Handler):
    """Writes a log record's message to stderr with ``tqdm.write``, so that it does not break a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging's convention: a failing handler reports, never raises
            self.handleError(record)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quasistatic", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"quasistatic {__version__}")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on the 2-core machines measured, the README's main "
        "job took 30 s for its start with 1 thread and 91 s with torch's default; "
        "benchmarks/README.md)",
    )
    parser.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE first, e.g. one that registers a process (repeatable; MODULE must be "
        "on the Python path, e.g. PYTHONPATH=.)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    equilibrate_command.add_parser(commands)
    process_command.add_parsers(commands)
    transfer_command.add_parser(commands)
    reproduce_command.add_parser(commands)
    return parser


DATA_PARALLEL_COMMANDS = ("iso-classification", "process", "rerun")  # the commands that run under torchrun


def _report_failure(group: ShardGroup) -> Callable[[BaseException], int]:
    """What a failing rank of ``group`` prints, and its exit code: 2 for bad input, else 1."""

    def report(error: BaseException) -> int:
        if isinstance(error, InputError):
            print(f"quasistatic: error: rank {group.rank}: {error}", file=sys.stderr)
            return 2
        trace = "".join(traceback.format_exception(error)).rstrip()
        print(f"quasistatic: error: rank {group.rank}: {error!r}\n{trace}", file=sys.stderr)
        return 1

    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``quasistatic`` console script; returns the exit code."""
    args = _parser().parse_args(argv)
    args.command_line = shlex.join(["quasistatic", *(sys.argv[1:] if argv is None else argv)])  # as results record it
    try:
        args.group = init_from_env(getattr(args, "device", "cpu"))
    except InputError as error:
        print(f"quasistatic: error: {error}", file=sys.stderr)
        return 2
    if args.group is None:
        return _main(args)
    with abort_on_failure(args.group, _report_failure(args.group)):
        if args.command not in DATA_PARALLEL_COMMANDS:
            raise bad_value("the command under torchrun", f"one of {', '.join(DATA_PARALLEL_COMMANDS)}", args.command)
        # the other ranks print nothing: rank 0 says what the run did
        with contextlib.redirect_stdout(io.StringIO()) if not args.group.is_main else contextlib.nullcontext():
            code = _main(args)
    return code


def _main(args: argparse.Namespace) -> int:
    """Run the parsed command (the process group, if any, set up); its exit code."""
    # The command's settings, undone on return (main is also called in-process, by the tests):
    # torch's thread count and the package logger's level and handler.
    threads = torch.get_num_threads()
    logger = logging.getLogger("quasistatic")
    level, handler = logger.level, _TqdmHandler()
    if args.group is None or args.group.is_main:
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        if args.threads < 1:
            raise bad_value("--threads", "an integer >= 1", args.threads)
        torch.set_num_threads(args.threads)
        import_modules(args.imports)
        return args.run(args)
    except InputError as error:
        if args.group is not None:
            raise  # ends this rank at once (main), and with it the others
        print(f"quasistatic: error: {error}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)
        logger.removeHandler(handler)
        logger.setLevel(level)
