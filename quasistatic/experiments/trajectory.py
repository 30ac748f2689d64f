"""Recording a process: one row per accepted step in trajectory.csv, a resumable state after
every step, and the paper's figures (Fig. 2: R–D curve, (λ, γ) path, C and accuracy; Fig. 4: F)."""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from ..continuation.engine import EngineState, StepReport, rejection_summary
from ..continuation.folds import Fold, Jump
from ..thermo.evaluation import measure
from ..linalg import LinearSolve
from ..thermo.objective import Objective
from .plots import plot_columns
from .rundir import CsvLog, RunDirectory, atomic_save

__all__ = [
    "TRAJECTORY_COLUMNS",
    "MIXTURE_COLUMNS",
    "TARGET_COLUMNS",
    "TrajectoryRecorder",
    "numeric",
    "plot_trajectory",
    "read_trajectory",
]

TRAJECTORY_COLUMNS = (
    "step",
    "s",
    "lam",
    "gamma",
    "t",
    "R",
    "D",
    "C",
    "F",
    "val_C",
    "val_acc",
    "grad_norm",
    "cg_iters",
    "grad_evals",
    "wall_s",
    "S",
    "corrector_iters",
    "rejected_steps",
    "rejected_because",
    "h",
    "precond_builds",
    "unconverged_solves",
    "lambda_min",
    "negative_eigenvalues",
    "event",
    "jump_distance",
    "dissipation",
    "parametrization",
)
TEXT_COLUMNS = ("event", "rejected_because", "parametrization")  # the columns that are not numbers
TARGET_COLUMNS = ("target_val_C", "target_val_acc")  # with ``target_val``: C and accuracy on the target alone
# on a mixture (a transfer process): ∂_tJ at fixed θ, the rate of the work of moving the data
MIXTURE_COLUMNS = ("J_t",)
STATE_FILE = "state.pt"

logger = logging.getLogger(__name__)


class TrajectoryRecorder:
    """Appends a row and saves the engine state after every step; ``restore`` continues a run.

    ``target_val`` (a transfer, Sec. 4): a further validation objective on the target data alone,
    recorded in the columns ``TARGET_COLUMNS`` whatever the mixture time t of the row. On a mixture
    ``train`` the rows also hold ∂_tJ (``MIXTURE_COLUMNS``), which a transfer's first law needs.
    """

    def __init__(
        self, run: RunDirectory, train: Objective, val: Objective | None, target_val: Objective | None = None
    ) -> None:
        self.run, self.train, self.val, self.target_val = run, train, val, target_val
        columns = (
            TRAJECTORY_COLUMNS
            + (TARGET_COLUMNS if target_val is not None else ())
            + (MIXTURE_COLUMNS if train.is_mixture else ())
        )
        self.log = CsvLog(run.file("trajectory.csv"), columns)
        self.wall_before = 0.0
        self.started = time.perf_counter()
        self.extra: dict | None = None  # after ``restore``: what the last ``record`` saved with the state
        self.linear_solve: LinearSolve | None = None  # the run's: its statistics go into every row

    def row(
        self,
        state: EngineState,
        cg_iters: int = 0,
        corrector_iters: int = 0,
        rejections: tuple[str, ...] = (),
        jump: Jump | None = None,
        fold: Fold | None = None,
    ) -> dict:
        """Measurements at ``state`` (bookkeeping: not counted as the method's work)."""
        with self.train.work.paused():
            measured = measure(self.train, state.theta, state.controls, self.val)
        if self.target_val is not None:
            measured["target_val_C"] = self.target_val.report(state.theta.detach(), state.controls.t).C
            measured["target_val_acc"] = self.target_val.accuracy(state.theta.detach(), state.controls.t)
        if self.train.is_mixture:
            with self.train.work.paused():
                measured["J_t"] = self.train.data_rate(state.theta.detach(), state.controls)
        c = state.controls
        point = state.stability[-1] if state.stability and state.stability[-1].s == state.s else None
        lambda_min = point.lambda_min if point is not None else math.nan
        negative = point.negative if point is not None and point.negative is not None else ""
        unstable = (point is not None and (point.negative or 0) > 0) or lambda_min < 0
        return {
            "step": state.step,
            "s": state.s,
            "lam": c.lam,
            "gamma": c.gamma,
            "t": c.t,
            **measured,
            "cg_iters": cg_iters,
            "corrector_iters": corrector_iters,
            "rejected_steps": len(rejections),
            "rejected_because": rejection_summary(rejections),
            "h": state.h,
            "grad_evals": self.train.work.gradient_equivalents,
            "precond_builds": self.linear_solve.stats.builds if self.linear_solve else 0,
            "unconverged_solves": self.linear_solve.stats.unconverged if self.linear_solve else 0,
            "lambda_min": lambda_min,
            "negative_eigenvalues": negative,
            "event": "jump" if jump is not None else "fold" if fold is not None else "unstable" if unstable else "",
            "jump_distance": jump.distance if jump is not None else "",
            "dissipation": jump.dissipation if jump is not None else "",
            # what the step was taken in: s (the engine's natural steps) or the arclength's coordinates
            "parametrization": "s" if state.arclength is None else state.arclength.coordinates,
            "wall_s": self.wall_before + time.perf_counter() - self.started,
        }

    def record(self, state: EngineState, extra: dict | None = None, **counts: Any) -> dict:
        """Append the row of ``state`` and save the state (with ``extra``, e.g. an optimizer's state,
        in the same atomic file, so that the two never disagree after an interruption)."""
        row = self.row(state, **counts)
        self.log.append(row)
        solves = self.linear_solve.checkpoint() if self.linear_solve else None
        atomic_save(
            {
                "state": state,
                "work": self.train.work.snapshot(),
                "wall_s": row["wall_s"],
                "extra": extra,
                "solves": solves,
            },
            self.run.file(STATE_FILE),
        )
        return row

    def on_step(self, report: StepReport) -> None:
        """Record an accepted step; a jump past a fold is also added to jumps.json, a fold reached by
        arclength continuation to folds.json, and both are logged (INFO, logger
        ``quasistatic.experiments.trajectory``)."""
        if report.jump is not None:
            path = self.run.file("jumps.json")
            jumps = json.loads(path.read_text()) if path.exists() else []
            self.run.write_json(
                "jumps.json", [*jumps[: sum(j["s"] < report.jump.s for j in jumps)], report.jump.to_dict()]
            )
            logger.info(
                "%s; jumped to s=%.6g: |dtheta| = %.3g, dissipated J %.6g",
                report.jump.fold.describe(),
                report.jump.s,
                report.jump.distance,
                report.jump.dissipation,
            )
        if report.fold is not None:
            path = self.run.file("folds.json")
            folds = json.loads(path.read_text()) if path.exists() else []
            self.run.write_json(
                "folds.json",
                [
                    *(f for f in folds if f["step"] < report.state.step),
                    {"step": report.state.step, **report.fold.to_dict()},
                ],
            )
            fold = report.fold
            logger.info(
                "arclength continuation turned at a fold: lambda=%.8g, gamma=%.8g, t=%.6g, s=%.8g +- %.1e",
                fold.lam,
                fold.gamma,
                fold.t,
                fold.s,
                fold.uncertainty,
            )
        self.record(
            report.state,
            cg_iters=report.tangent_cg_iterations + report.correction.cg_iterations,
            corrector_iters=report.correction.iterations,
            rejections=report.rejections,
            jump=report.jump,
            fold=report.fold,
        )

    def restore(self) -> EngineState | None:
        """The state after the last recorded step (rows after it dropped), or None."""
        path = self.run.file(STATE_FILE)
        if not path.exists():
            return None
        saved = torch.load(path, weights_only=False)
        state: EngineState = saved["state"]
        self.log.keep_first(state.step + 1)
        self.train.work.restore(saved["work"])
        self.wall_before = saved["wall_s"]
        self.extra = saved.get("extra")
        if self.linear_solve is not None and saved.get("solves"):
            self.linear_solve.restore(saved["solves"])
        return state


def read_trajectory(directory: Path) -> list[dict[str, str]]:
    """The rows of ``directory``/trajectory.csv as written, one per step (:func:`numeric` gives a row's numbers)."""
    with (directory / "trajectory.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def numeric(row: dict[str, str]) -> dict[str, float]:
    """A trajectory row's numbers (text columns and empty cells, as a jump's columns in other rows, left out)."""
    return {k: float(v) for k, v in row.items() if v != "" and k not in TEXT_COLUMNS}


def plot_trajectory(rows: list[dict[str, str]], directory: Path, title: str) -> list[Path]:
    """Fig. 2 (R–D curve, (λ, γ) path, C and val_C, val_acc) and Fig. 4b (F per step) as PNGs."""
    paths = [
        plot_columns(rows, "D", [("R",)], directory / "rate_distortion.png", title=f"{title}: R–D curve"),
        plot_columns(rows, "lam", [("gamma",)], directory / "controls.png", title=f"{title}: (λ, γ) path"),
        plot_columns(
            rows,
            "step",
            [("C", "val_C"), ("val_acc",), ("grad_norm",)],
            directory / "classification.png",
            title=f"{title}: classification loss and accuracy",
        ),
        plot_columns(rows, "step", [("F",)], directory / "free_energy.png", title=f"{title}: free energy"),
    ]
    return paths
