"""What a command does on the ranks of a torchrun launch (:mod:`quasistatic.distributed`).

Every rank runs the command's own code, as a process alone does, on its shard of the data; the
sums reduced over the ranks keep θ and every decision the same on all of them. Once its flags and
its output directory are checked, a command checks that every rank was given the same settings
(:func:`agree_on_settings`, before its first collective: after it rank 0 may write). Only rank 0
shows progress (:func:`shows_progress`) and writes the output: each rank writes a run directory
through :func:`~quasistatic.experiments.runner.rank_directory` (rank 0 the directory itself, the
others a scratch copy removed at exit), and what is drawn from rank 0's runs alone (transfer.png,
a figure of ``reproduce``) only rank 0 draws (:func:`~quasistatic.distributed.is_main_process`).
"""

from __future__ import annotations

import argparse

from ..distributed import ShardGroup, is_main_process
from .options import settings

__all__ = ["agree_on_settings", "shows_progress"]


def agree_on_settings(args: argparse.Namespace, group: ShardGroup | None) -> None:
    """Under torchrun (``group``): every rank must have been given the command's settings
    (:func:`~quasistatic.cli.options.settings`), an :class:`~quasistatic.InputError` naming the
    ranks' values otherwise. Also the point after which every rank has checked its flags and its
    output directory: rank 0 may create it. Alone: nothing to check."""
    if group is not None:
        group.agree("the command's settings", settings(args))


def shows_progress(args: argparse.Namespace, group: ShardGroup | None) -> bool:
    """Whether this process shows progress bars: not ``--no-progress``, and alone or rank 0."""
    return not args.no_progress and is_main_process(group)
