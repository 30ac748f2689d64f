"""One transfer run end to end, from a :class:`TransferConfig`: what ``quasistatic transfer`` and
the transfer figures of ``quasistatic reproduce`` (Figs. 5 and 6) run.

The source model is trained to equilibrium on the source classes at the start's (λ, γ) (or read
from ``start.checkpoint``); then ``method`` either runs a transfer process over t ∈ [0, 1] on the
data mixture of eq. 23 (:data:`~quasistatic.experiments.transfer.TRANSFER_PROCESSES`: ``iso-c``,
``geodesic``, ``constant-lambda-rate``), started on the surface like a process run and followed
by ``follow.method`` (the engine, or the paper's finite differences of re-equilibrated models), or
a baseline (``finetune``: the source model trained on the target; ``scratch``: a fresh model
trained on the target; both with ``start.equilibration``'s epochs). Runs of the same settings and
seed train bit-identical source models, so that a figure's methods, each a run of its own, start
from the same model. The run directory holds config.json (:meth:`TransferConfig.to_dict` and a
``record`` of the tasks and C of the starting model on the source), start.pt, state.pt,
trajectory.csv (C and accuracy on the target alone added) and the run's figures.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..continuation.equilibrate import DivergenceError
from ..data import DataSplit
from ..distributed import ShardGroup, is_main_process
from ..errors import bad_value, choice_error
from ..models import ModelConfig, build_model
from ..processes import Process
from .checkpoint import load_checkpoint, save_checkpoint
from .rundir import RunDirectory
from .runner import (
    CONFIG_FILE,
    RECORD,
    RecordedRun,
    RunSettings,
    StopError,
    check_resumable,
    follow,
    import_modules,
    model_for_data,
    rank_directory,
    starting_model,
    torch_device,
    torch_dtype,
    record_budget,
    run_record,
)
from .trajectory import TrajectoryRecorder, plot_trajectory
from .transfer import (
    BASELINES,
    LABEL_MODES,
    TRANSFER_PROCESSES,
    TransferData,
    TransferObjectives,
    make_transfer_process,
    plot_baseline,
    plot_transfer,
    train_baseline,
    transfer_data,
)

__all__ = ["TransferConfig", "TransferRun", "run_transfer", "transfer_methods"]


def transfer_methods() -> list[str]:
    """The transfer methods: the registered transfer processes, then the baselines."""
    return [*TRANSFER_PROCESSES.available(), *BASELINES]


@dataclass(frozen=True)
class TransferConfig(RunSettings):
    """Every setting of one transfer run: the shared ones (:class:`~quasistatic.RunSettings`:
    ``out`` is this method's run directory, ``start`` the source model's controls and training,
    whose epochs the baselines also train for) and the transfer's own. ``data.classes`` must be
    None: the tasks are ``source`` and ``target``."""

    method: str = "iso-c"  # a transfer process (TRANSFER_PROCESSES) or a baseline (finetune, scratch)
    source: str = "0-4"  # source classes: "0-4", "1,3,7", or "vehicles"/"animals" for cifar10
    target: str = "5-9"  # target classes, disjoint from the source's
    labels: str = "shared"  # "shared": one head over all classes; "separate": both relabelled to 0..k-1
    max_per_class: int | None = None  # the first N training and N validation examples of each class
    params: dict[str, Any] = field(default_factory=dict)  # the transfer process's: {"slope": 0.2}

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "params", dict(self.params))
        import_modules(self.imports)
        if self.method not in transfer_methods():
            raise choice_error("method", transfer_methods(), self.method)
        if self.labels not in LABEL_MODES:
            raise choice_error("labels", LABEL_MODES, self.labels)
        if self.data.classes is not None:
            raise bad_value("data classes", "None for a transfer (its tasks are source and target)", self.data.classes)
        if self.data.relabel:
            raise bad_value("data relabel", "False for a transfer (its labels are set by 'labels')", self.data.relabel)
        if self.method in BASELINES and self.params:
            raise bad_value("params", f"empty for the baseline {self.method!r} (it runs no process)", self.params)
        if self.method == "scratch" and self.start.checkpoint:
            raise bad_value(
                "start checkpoint", "None for scratch (it starts from a fresh model)", self.start.checkpoint
            )
        self.process()  # an unknown or bad parameter raises, naming the accepted ones

    def tasks(self, split: DataSplit) -> TransferData:
        """The source and target tasks of ``split`` (:func:`~quasistatic.experiments.transfer.transfer_data`):
        bad or overlapping classes raise :class:`~quasistatic.InputError`."""
        return transfer_data(split, self.source, self.target, self.labels, self.max_per_class)

    def process(self) -> Process | None:
        """The transfer process of ``method`` started at ``start``'s controls (None for a baseline)."""
        if self.method in BASELINES:
            return None
        process = make_transfer_process(self.method, self.start.controls, **self.params)
        self.follow.check(process)
        return process


@dataclass
class TransferRun(RecordedRun):
    """A transfer run: its config (as run), process (None for a baseline), directory and end."""

    config: TransferConfig
    process: Process | None
    directory: Path
    data: TransferData
    error: StopError | None = None  # what stopped it before t = 1 (None: it got there)
    figures: list[Path] = field(default_factory=list)  # the run's own and OUT/transfer.png (rank 0)

    def numbers(self) -> dict[str, Any]:
        """:func:`~quasistatic.experiments.runner.trajectory_numbers` of the trajectory; a baseline's
        rows are Adam's epochs 1, 2, …, no quasi-static process: no drift, no first law, its steps
        the epochs."""
        numbers = super().numbers()
        if self.process is None:
            numbers.update(max_drift=None, first_law=None, first_law_total=None, steps=numbers["steps"] + 1)
        return numbers

    @property
    def title(self) -> str:
        name = self.config.data.dataset
        return f"{name} {self.config.source} → {self.config.target} ({self.config.labels} labels)"


def run_transfer(
    config: TransferConfig, *, progress: bool = True, group: ShardGroup | None = None, compare: bool = True
) -> TransferRun:
    """Run ``config`` end to end in ``config.out`` (the module docstring). Every setting is checked
    before anything is written (a bad one raises :class:`~quasistatic.InputError`); a process that
    cannot be followed, or a baseline whose training diverges, ends the run with
    :attr:`TransferRun.error` set and its trajectory so far recorded. ``group``: data-parallel on
    its ranks, as :func:`~quasistatic.run_process` (only rank 0 writes ``config.out`` and the
    figures). ``compare``: also draw every method's run found beside this one (the parent folder's
    transfer.png; a figure of ``reproduce``, whose runs may be running, draws its own instead)."""
    import_modules(config.imports)  # a config sent to a worker process is not built again there
    if group is not None:
        group.agree("the transfer config", config.to_dict())
        progress = progress and group.is_main
    process = config.process()
    run = RunDirectory(config.out, overwrite=config.overwrite, resume=config.resume)
    split = config.data.load(config.seed)
    data = config.tasks(split)
    config = replace(config, model=model_for_data(config.model, data.source.train))
    if config.resume:
        check_resumable(run, config)
    if config.start.checkpoint and config.method != "scratch":
        _check_head(config.start.checkpoint, config.model, data)

    def objectives_of(model: torch.nn.Module) -> TransferObjectives:
        return TransferObjectives(
            model,  # type: ignore[arg-type]
            data,
            samples=config.samples,
            seed=config.seed,
            sigma=config.sigma,
            chunk_size=config.chunk_size,
            group=group,
        )

    device, dtype = torch_device(config.device), torch_dtype(config.dtype)
    if config.method == "scratch":
        model = build_model(config.model, seed=config.seed).to(device=device, dtype=dtype)
    else:
        model = starting_model(
            config.start,
            config.model,
            run,
            lambda m: objectives_of(m).source,
            linear_solve=config.follow.linear_solve,
            seed=config.seed,
            device=device,
            dtype=dtype,
            progress=progress,
        )
    objectives = objectives_of(model)
    run = rank_directory(run, group)
    run.prepare()
    if config.resume:
        record_budget(run, config)
    else:
        # start_C: C of the starting model on the source training set (a process polishes it first)
        start_c = None if config.method == "scratch" else objectives.source.report(objectives.source.initial_theta()).C
        record = {
            "transfer": data.describe(),
            "start_C": start_c,
            "process": None if process is None else process.describe(),
            **run_record(split, group),
        }
        run.write_json(CONFIG_FILE, {**config.to_dict(), RECORD: record})
        if config.method != "scratch":
            save_checkpoint(
                run.file("start.pt"),
                model,
                config.start.controls,
                {"dataset": split.name, "classes": config.source, "labels": config.labels},
            )
    result = TransferRun(config, process, run.path, data)
    if process is not None:
        recorder = TrajectoryRecorder(run, objectives.mixture, objectives.mixture_val, target_val=objectives.target_val)
        result.error = follow(
            process,
            objectives.mixture,
            recorder,
            config.follow,
            seed=config.seed,
            batch_size=config.start.equilibration.batch_size,
            progress=progress,
            max_work=config.max_work,
        )
    else:
        recorder = TrajectoryRecorder(run, objectives.target, objectives.mixture_val, target_val=objectives.target_val)
        controls = config.start.controls
        try:
            train_baseline(
                objectives.target,
                replace(controls, t=1.0),
                config.start.equilibration,
                recorder,
                seed=config.seed,
                resume=config.resume,
                progress=progress,
            )
        except DivergenceError as error:
            result.error = error
    if result.error is None:
        rows = recorder.log.rows()
        result.figures = (
            plot_trajectory(rows, run.path, f"{result.title}: {config.method}")
            if process is not None
            else [plot_baseline(rows, run.path, f"{result.title}: {config.method}")]
        )
        if compare and is_main_process(group):  # the methods' runs beside this one: rank 0's
            figure = plot_transfer(Path(config.out).parent, result.title)
            result.figures += [] if figure is None else [figure]
    return result


def _check_head(path: str, config: ModelConfig, data: TransferData) -> None:
    """The checkpoint's classifier head must have the size that ``labels`` asks for."""
    saved = load_checkpoint(path)["model_config"]["num_classes"]
    if saved != config.num_classes:
        how = (
            f"--labels separate: source and target each relabelled to 0..{config.num_classes - 1}"
            if data.labels == "separate"
            else f"--labels shared: one head over the data set's {config.num_classes} classes"
        )
        raise bad_value("--from-checkpoint classifier head", f"{config.num_classes} classes wide ({how})", saved)
