"""Experiments built on the continuation: run directories (config.json, CSV logs, atomic
checkpoints), model checkpoints, trajectory recording with the paper's figures (Figs. 2, 4), the
``fd-equilibration`` baseline (Sec. 5.1), transfer with its baselines (Sec. 4, Figs. 5, 6), and the
PNG plots. The command line (``cli``) sits on top of this layer."""

from .baselines import FiniteDifferenceEquilibration
from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .plots import plot_columns, plot_hysteresis
from .rundir import CsvLog, RunDirectory
from .trajectory import TrajectoryRecorder, plot_trajectory
from .transfer import (
    TRANSFER_PROCESSES,
    TransferData,
    TransferObjectives,
    make_transfer_process,
    plot_transfer,
    train_baseline,
    transfer_data,
)

__all__ = [
    "RunDirectory",
    "CsvLog",
    "Checkpoint",
    "load_checkpoint",
    "save_checkpoint",
    "TrajectoryRecorder",
    "plot_trajectory",
    "FiniteDifferenceEquilibration",
    "TransferData",
    "TransferObjectives",
    "TRANSFER_PROCESSES",
    "make_transfer_process",
    "transfer_data",
    "train_baseline",
    "plot_transfer",
    "plot_columns",
    "plot_hysteresis",
]
