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

Every command runs unchanged under ``torchrun --nproc_per_node N -m quasistatic ...``, data-parallel
(:mod:`quasistatic.distributed`, :mod:`.ranks`): each rank evaluates J on its shard of the data, the
ranks check that they were given the same settings, rank 0 prints and writes (the other ranks print
nothing), and a rank that fails prints ``quasistatic: error: rank R: …`` and exits at once (2 for
bad input, 1 otherwise), which stops the others. ``reproduce`` then runs the figure's runs one
after the other, each over all ranks (``--jobs 1``).
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
from ..distributed import ShardGroup, abort_on_failure, init_from_env, is_main_process
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
        group = init_from_env(getattr(args, "device", "cpu"))
    except InputError as error:
        print(f"quasistatic: error: {error}", file=sys.stderr)
        return 2
    if group is None:
        return _main(args, None)
    with abort_on_failure(group, _report_failure(group)), contextlib.ExitStack() as quiet:
        if not group.is_main:  # the other ranks print nothing: rank 0 says what the run did
            quiet.enter_context(contextlib.redirect_stdout(io.StringIO()))
            quiet.enter_context(contextlib.redirect_stderr(io.StringIO()))
        return _main(args, group)


def _main(args: argparse.Namespace, group: ShardGroup | None) -> int:
    """Run the parsed command, alone or as a rank of ``group`` (a torchrun launch); its exit code."""
    # The command's settings, undone on return (main is also called in-process, by the tests):
    # torch's thread count and the package logger's level and handler.
    threads = torch.get_num_threads()
    logger = logging.getLogger("quasistatic")
    level, handler = logger.level, _TqdmHandler()
    if is_main_process(group):
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        if args.threads < 1:
            raise bad_value("--threads", "an integer >= 1", args.threads)
        torch.set_num_threads(args.threads)
        import_modules(args.imports)
        return args.run(args, group)
    except InputError as error:
        if group is not None:
            raise  # ends this rank at once (main), and with it the others
        print(f"quasistatic: error: {error}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)
        logger.removeHandler(handler)
        logger.setLevel(level)
