"""Transfer from a source task to a target task (Sec. 4): the data, the baselines, Figs. 5 and 6.

A transfer runs one of the registered mixture processes over t ∈ [0, 1] on the data mixture
p(x, t) = (1 − t)p_s + t p_t of eq. 23 (:data:`TRANSFER_PROCESSES`). Two baselines start from the
same places and are counted with the same work counter: ``finetune`` trains the source model on
the target data with J at the starting (λ, γ), ``scratch`` trains a fresh model on the target
(:func:`train_baseline`). Every run records the same columns, with C and accuracy on the target
alone added (``trajectory.TARGET_COLUMNS``); :func:`plot_transfer` draws the runs of one output
folder together like the paper's Figs. 5 and 6.

Labels (``LABEL_MODES``): ``shared`` keeps the data set's labels and one head over all of its
classes (the paper's MNIST 0–4 → 5–9); ``separate`` relabels both subsets to 0..k−1 and uses one
k-way head (the paper's CIFAR-10 vehicles → animals, k = 4).
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from ..data import DataMixture, DataSplit, LabeledData, parse_classes
from ..data.subsets import select_classes
from ..continuation.engine import EngineState
from ..continuation.equilibrate import EquilibrationConfig, equilibrate
from ..distributed import ShardGroup
from ..errors import InputError, bad_value, choice_error
from ..models import RepresentationModel
from ..thermo.objective import Controls, Objective
from .plots import new_figure, plot_columns, save_figure
from ..processes import ConstantLambdaRate, GeodesicTransfer, IsoClassificationTransfer, Process
from ..registry import Registry
from .trajectory import TrajectoryRecorder, numeric

__all__ = [
    "BASELINES",
    "LABEL_MODES",
    "TRANSFER_PROCESSES",
    "TransferData",
    "TransferObjectives",
    "draw_transfer",
    "first_per_class",
    "make_transfer_process",
    "plot_baseline",
    "plot_transfer",
    "train_baseline",
    "transfer_data",
    "transfer_parameter",
]

LABEL_MODES = ("shared", "separate")
BASELINES = ("finetune", "scratch")
PLOT_FILE = "transfer.png"


def _classes(role: str, spec: str | Sequence[int], dataset: str, num_classes: int) -> tuple[int, ...]:
    """``parse_classes`` with the error naming the role ("source classes must be …")."""
    try:
        return parse_classes(spec, dataset, num_classes)
    except InputError as error:  # parse_classes' messages all start with "classes must be"
        raise InputError(f"{role} {error}") from None


def first_per_class(data: LabeledData, count: int) -> LabeledData:
    """The first ``count`` examples of each label of ``data``, in their original order."""
    keep = torch.zeros(len(data), dtype=torch.bool)
    for label in data.y.unique():
        keep[torch.nonzero(data.y == label).flatten()[:count]] = True
    return data.subset(torch.nonzero(keep).flatten())


@dataclass(frozen=True)
class TransferData:
    """The source and target tasks of one data set, in one label space (eq. 23 needs it)."""

    source: DataSplit  # training and validation examples of the source classes
    target: DataSplit  # the same for the target classes
    source_classes: tuple[int, ...]  # labels in the data set's numbering
    target_classes: tuple[int, ...]
    labels: str  # "shared" or "separate" (LABEL_MODES)

    @property
    def num_classes(self) -> int:
        """Size of the classifier head: the data set's classes (shared) or k (separate)."""
        return self.source.train.num_classes

    def mixture(self, part: str) -> DataMixture:
        """p(x, t) of eq. 23 on the ``"train"`` or ``"val"`` examples."""
        return DataMixture(getattr(self.source, part), getattr(self.target, part))

    def describe(self) -> dict:
        """What config.json records of the tasks."""
        return {
            "source_classes": list(self.source_classes),
            "target_classes": list(self.target_classes),
            "labels": self.labels,
            "num_classes": self.num_classes,
            "sizes": {
                role: {"train": len(split.train), "val": len(split.val)}
                for role, split in (("source", self.source), ("target", self.target))
            },
        }


def transfer_data(
    split: DataSplit,
    source: str | Sequence[int],
    target: str | Sequence[int],
    labels: str = "shared",
    max_per_class: int | None = None,
) -> TransferData:
    """The source and target tasks of ``split`` (one seeded partition of one data set).

    ``source`` and ``target`` are class specs (see :func:`quasistatic.data.parse_classes`, e.g.
    ``"0-4"``, ``"vehicles"``) that must be disjoint; each of their classes must have training and
    validation examples. ``labels="shared"`` keeps the labels and ``split``'s head size;
    ``"separate"`` maps each subset to 0..k−1 in the order given (both must have k classes).
    ``max_per_class`` keeps the first examples of each class in each part (small runs).
    """
    if labels not in LABEL_MODES:
        raise choice_error("labels", LABEL_MODES, labels)
    if max_per_class is not None and (isinstance(max_per_class, bool) or not max_per_class >= 1):
        raise bad_value("max_per_class", "an integer >= 1 (or None for all examples)", max_per_class)
    n = split.train.num_classes
    source_classes = _classes("source", source, split.name, n)
    target_classes = _classes("target", target, split.name, n)
    shared = sorted(set(source_classes) & set(target_classes))
    if shared:
        raise bad_value(
            "target classes", f"disjoint from the source classes {list(source_classes)} (both hold {shared})", target
        )
    if labels == "separate" and len(target_classes) != len(source_classes):
        raise bad_value(
            "target classes",
            f"as many as the source's {len(source_classes)} with labels 'separate' "
            f"(one {len(source_classes)}-way head for both)",
            target,
        )
    tasks = []
    for role, classes, spec in (("source", source_classes, source), ("target", target_classes, target)):
        parts = []
        for part, data in (("training", split.train), ("validation", split.val)):
            subset = select_classes(data, classes, relabel=labels == "separate")
            if max_per_class is not None:
                subset = first_per_class(subset, max_per_class)
            present = set(select_classes(data, classes, relabel=False).y.tolist())
            missing = [c for c in classes if c not in present]
            if missing:
                raise bad_value(
                    f"{role} classes", f"classes with {part} examples in {split.name} (none for {missing})", spec
                )
            parts.append(subset)
        tasks.append(DataSplit(parts[0], parts[1], split.name))
    return TransferData(tasks[0], tasks[1], source_classes, target_classes, labels)


class TransferObjectives:
    """The objectives of a transfer, built when first used, all of ``model`` at fixed noise.

    The noise is shared so that the ends of the mixture are the tasks exactly: the mixture's
    source part has the source objective's noise (seed), its target part the target objective's
    (seed + 1); validation uses seed + 1000 and seed + 1001. Hence J under p(x, 0) is J on the
    source and J under p(x, 1) is J on the target, to the last bit.

    ``chunk_size``: examples evaluated at once; ``group``: every objective is sharded over its ranks
    (:class:`~quasistatic.Objective`, :mod:`quasistatic.distributed`).
    """

    def __init__(
        self,
        model: RepresentationModel,
        data: TransferData,
        samples: int = 1,
        seed: int = 0,
        sigma: float = 0.0,
        chunk_size: int | None = None,
        group: ShardGroup | None = None,
    ) -> None:
        self.model, self.data, self.samples, self.seed, self.sigma = model, data, samples, seed, sigma
        self.chunk_size, self.group = chunk_size, group

    def _objective(self, data: LabeledData | DataMixture, noise_seed: int) -> Objective:
        return Objective(
            self.model,
            data,
            samples=self.samples,
            noise_seed=noise_seed,
            chunk_size=self.chunk_size,
            sigma=self.sigma,
            group=self.group,
        )

    @cached_property
    def source(self) -> Objective:
        """J on the source training set: the source model's equilibrium and C0."""
        return self._objective(self.data.source.train, self.seed)

    @cached_property
    def mixture(self) -> Objective:
        """J under p(x, t) on the training sets (eq. 23): what a transfer process follows."""
        return self._objective(self.data.mixture("train"), self.seed)

    @cached_property
    def mixture_val(self) -> Objective:
        """Validation under p(x, t): ``val_C`` and ``val_acc``."""
        return self._objective(self.data.mixture("val"), self.seed + 1000)

    @cached_property
    def target(self) -> Objective:
        """J on the target training set: what the baselines train."""
        return self._objective(self.data.target.train, self.seed + 1)

    @cached_property
    def target_val(self) -> Objective:
        """Validation on the target alone: ``target_val_C`` and ``target_val_acc``."""
        return self._objective(self.data.target.val, self.seed + 1001)


def _constant_lambda_rate(start: Controls, k: float = -1.5) -> ConstantLambdaRate:
    """Eq. 32's process, which must keep λ = λ₀ + ks ≥ 0 up to s = 1 (k ≥ −λ₀)."""
    if start.lam + k < 0:
        raise bad_value("k", f"a rate that keeps lambda >= 0 up to s = 1 (k >= -lambda = {-start.lam:g})", k)
    return ConstantLambdaRate(start, k)


_constant_lambda_rate.parameters = ConstantLambdaRate.parameters  # type: ignore[attr-defined]

# The transfer methods that run a quasi-static process: factory(start, **params) -> Process (a
# mixture process), whose first declared parameter is the method's own (the transfer command's flag).
TRANSFER_PROCESSES: Registry[Process] = Registry("transfer process method")
# eqs. 26–28: C constant, λ̇ = λ_end − λ₀ (0 by default)
TRANSFER_PROCESSES.register("iso-c", IsoClassificationTransfer)
# eq. 30: straight R–D line of slope k = dD/dR at constant C
TRANSFER_PROCESSES.register("geodesic", GeodesicTransfer)
# eq. 32: λ̇ = k, γ̇ holds C
TRANSFER_PROCESSES.register("constant-lambda-rate", _constant_lambda_rate)


def transfer_parameter(method: str) -> str | None:
    """The name of transfer ``method``'s own parameter (its first declared one; None when it has none)."""
    parameters = TRANSFER_PROCESSES.parameters(method)
    return parameters[0].name if parameters else None


def make_transfer_process(method: str, start: Controls, value: float | None = None, **params: Any) -> Process:
    """The process of transfer ``method`` (a name in :data:`TRANSFER_PROCESSES`) started at
    ``start``, with its own parameter (:func:`transfer_parameter`) set to ``value`` (None: the
    process's default) and any other of its parameters in ``params``."""
    own = transfer_parameter(method)
    if value is not None and own is None:
        raise bad_value(f"value of transfer method {method!r}", "None (the method has no parameter)", value)
    return TRANSFER_PROCESSES.make(method, start, **({} if value is None or own is None else {own: value}), **params)


def train_baseline(
    objective: Objective,
    controls: Controls,
    config: EquilibrationConfig,
    recorder: TrajectoryRecorder,
    *,
    seed: int = 0,
    resume: bool = False,
    progress: bool = True,
) -> EngineState:
    """A transfer baseline: Adam on J(θ; λ, γ) on the target data (``objective``) from
    ``objective.model`` as it is — the source model (finetune) or a fresh one (scratch).

    After every epoch ``recorder`` appends a row (t = 1, s = epoch / epochs, step = epoch) and saves
    the parameters with the optimizer's state; ``resume`` continues from the last saved epoch to
    the uninterrupted result. The work is the objective's counter, as for the engine: the epochs'
    minibatches (one gradient-equivalent per epoch), not the per-epoch measurements."""
    state = recorder.restore() if resume else None
    start_epoch, optimizer_state = 0, None
    if state is not None:
        objective.layout.write(objective.model, state.theta)
        assert recorder.extra is not None  # a baseline saves its optimizer state with every epoch
        start_epoch, optimizer_state = state.step, recorder.extra["optimizer"]
    last = [state]

    def on_epoch(epoch: int, row: dict[str, float], optimizer: dict) -> None:
        new = EngineState(
            objective.initial_theta(), controls, s=(epoch + 1) / config.epochs, step=epoch + 1, h=1 / config.epochs
        )
        last[0] = new
        recorder.record(new, extra={"optimizer": optimizer})

    equilibrate(
        objective,
        controls,
        config,
        seed=seed,
        start_epoch=start_epoch,
        optimizer_state=optimizer_state,
        on_epoch=on_epoch,
        progress=progress,
    )
    final = last[0]
    assert final is not None  # an epoch ran, or the resumed state is the last one's
    return final


def plot_transfer(directory: Path, title: str = "") -> Path | None:
    """Figs. 5 and 6 from the runs in ``directory``'s method folders (``iso-c/``, ``finetune/``, …)
    as ``directory``/transfer.png (:func:`draw_transfer`); None when no run has rows yet."""
    runs: dict[str, list[dict[str, str]]] = {}
    for method in (*TRANSFER_PROCESSES, *BASELINES):
        path = directory / method / "trajectory.csv"
        if path.exists():
            with path.open(newline="") as f:
                runs[method] = list(csv.DictReader(f))
    runs = {method: rows for method, rows in runs.items() if rows}
    return draw_transfer(runs, directory / PLOT_FILE, title) if runs else None


def draw_transfer(runs: Mapping[str, list[dict[str, str]]], path: Path, title: str = "") -> Path:
    """Figs. 5 and 6 from transfer runs (method name → trajectory rows): (a) the R–D path of each
    transfer process; (b) validation C on the target over the transfer; (c) validation accuracy on
    the target over the transfer, with finetune's curve and scratch's final accuracy as a point.
    The x axis is the progress s ∈ [0, 1]: s = t for a transfer, epoch / epochs for a baseline."""
    fig = new_figure((13, 3.6))
    rd, loss, acc = fig.subplots(1, 3)
    for method, text_rows in runs.items():
        rows = [numeric(row) for row in text_rows]
        s = [row["s"] for row in rows]
        if method == "scratch":
            loss.plot(s[-1:], [rows[-1]["target_val_C"]], "*", markersize=12, label=method)
            acc.plot(s[-1:], [rows[-1]["target_val_acc"]], "*", markersize=12, label=method)
            continue
        if method in TRANSFER_PROCESSES:
            rd.plot([row["D"] for row in rows], [row["R"] for row in rows], marker=".", label=method)
        loss.plot(s, [row["target_val_C"] for row in rows], marker=".", label=method)
        acc.plot(s, [row["target_val_acc"] for row in rows], marker=".", label=method)
    labels = (
        ("D", "R", "(a) rate–distortion during the transfer"),
        ("progress s", "target val C", "(b) validation loss (target)"),
        ("progress s", "target val accuracy", "(c) validation accuracy (target)"),
    )
    for ax, (x, y, name) in zip((rd, loss, acc), labels):
        ax.set(xlabel=x, ylabel=y, title=name)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    return save_figure(fig, path, title)


def plot_baseline(rows: list[dict[str, str]], directory: Path, title: str) -> Path:
    """One baseline run per epoch: R and D, C on the training and validation sets, accuracies."""
    return plot_columns(
        rows,
        "step",
        [("R", "D"), ("C", "val_C", "target_val_C"), ("val_acc", "target_val_acc")],
        directory / "curves.png",
        title=title,
    )
