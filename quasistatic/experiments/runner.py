"""Running a quasi-static process end to end from one config: :class:`RunConfig` → :func:`run_process`
→ :class:`Run` (the ``iso-classification``, ``process`` and ``rerun`` commands are thin parsers
around it).

A run starts on the equilibrium surface ∇θJ = 0 (eq. 15) at the controls (λ, γ): a fresh model
trained there with Adam (Sec. 5.1) or a checkpoint, then polished (:func:`quasistatic.polish`) to
‖∇θJ‖ ≤ grad_tol. It follows the process over s ∈ [0, 1] with the engine (the predictor integrates
θ̇ = θ_λλ̇ + θ_γγ̇ + θ_tṫ, eqs. 17–18 and 24, the corrector returns to the surface) or with the
paper's fd-equilibration, and records every step in its run directory:

- ``config.json``: :meth:`RunConfig.to_dict`, plus a ``record`` of what the run found (the process
  as built, the data set's name and sizes, the package versions, torch's thread count);
  :meth:`RunConfig.from_dict` reads the config back, so a run re-runs from its config.json alone;
- ``start.pt`` (the starting model), ``state.pt`` (the state after the last step: ``resume``
  continues from it), ``trajectory.csv`` (one row per step) and the figures of Figs. 2 and 4b;
- with ``return_sweep``: ``return/`` (the same process from the end state back to the starting λ)
  and ``hysteresis.png``.

Data parallel (``group``, :mod:`quasistatic.distributed`): every rank runs the same code on its
shard of the data, and the reduced products keep θ and every decision identical on all of them.
Rank 0 writes the run directory and shows progress; the other ranks write their identical copy
into a temporary directory of their own (removed at exit), so that the code they run, reading its
own files back included, is the same.

The pieces (:func:`model_for_data`, :func:`split_objectives`, :func:`starting_model`,
:func:`follow`, :func:`trajectory_summary`, :func:`stop_message`) also serve the transfer command.
"""

from __future__ import annotations

import atexit
import importlib
import json
import math
import platform
import shutil
import tempfile
import typing
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from .. import __version__
from ..continuation.arclength import require_residual_form
from .baselines import FiniteDifferenceEquilibration
from .checkpoint import load_checkpoint, save_checkpoint
from ..continuation.correctors import Corrector, make_corrector
from ..data import DATASETS, DataSplit, LabeledData, load_dataset
from ..continuation.engine import (
    EngineConfig,
    EngineState,
    FoldError,
    QuasiStaticEngine,
    StepReport,
    StepSizeError,
    first_law_residual,
)
from ..continuation.equilibrate import DivergenceError, EquilibrationConfig, equilibrate
from ..distributed import ShardGroup
from ..errors import InputError, bad_value, choice_error
from ..integrators import Integrator, make_integrator
from ..linalg import LinearSolve, LinearSolveConfig
from ..models import ModelConfig, RepresentationModel, build_model
from ..thermo.functionals import check_chunk_size
from ..thermo.objective import Controls, Objective
from .plots import plot_hysteresis
from ..continuation.polish import POLISH_ITERATIONS, polish, require_equilibrium
from ..processes import PROCESSES, Process, make_process
from .rundir import RunDirectory
from .trajectory import STATE_FILE, TrajectoryRecorder, numeric, plot_trajectory, read_trajectory
from ..work import WorkCounter

__all__ = [
    "CONFIG_FILE",
    "DTYPES",
    "METHODS",
    "RESUME_IGNORES",
    "DataConfig",
    "FollowConfig",
    "ProcessConfig",
    "RecordedRun",
    "Run",
    "RunConfig",
    "RunSettings",
    "StartConfig",
    "WorkBudgetSpent",
    "check_resumable",
    "follow",
    "import_modules",
    "model_for_data",
    "module_names",
    "record_budget",
    "run_record",
    "rank_directory",
    "run_process",
    "split_objectives",
    "starting_model",
    "stop_message",
    "torch_device",
    "torch_dtype",
    "trajectory_numbers",
    "trajectory_summary",
    "versions",
]

CONFIG_FILE = "config.json"
RECORD = "record"  # config.json's key for what the run found, beside the RunConfig's keys
DTYPES = {"float32": torch.float32, "float64": torch.float64}
METHODS = ("engine", "fd-equilibration")
RESUME_IGNORES = ("out", "resume", "overwrite", "device", "max_work")  # the keys a resumed run may change


class WorkBudgetSpent(RuntimeError):
    """The run spent its ``max_work`` gradient-equivalents before s = 1 (its trajectory so far is
    recorded; ``resume`` with a larger budget goes on)."""


StopError = StepSizeError | DivergenceError | WorkBudgetSpent  # what ends a process before s = 1 (not bad input)
_Config = TypeVar("_Config")
_Settings = TypeVar("_Settings", bound="RunSettings")


@dataclass(frozen=True)
class DataConfig:
    """The data set J is evaluated on (eq. 8): a registered name, its split, a class subset."""

    dataset: str = "digits"  # a name from available_datasets()
    data_dir: str | None = None  # folder with the data set's files (mnist, cifar10)
    download: bool = False  # download missing mnist/cifar10 files
    classes: str | None = None  # label subset: "0-4", "5-9", "1,3,7", "vehicles"/"animals" (cifar10); None: all
    relabel: bool = False  # map the chosen classes to 0..k-1
    val_fraction: float = 0.2  # validation share of the split
    examples: int | None = None  # at most this many examples of each split, its first (quick runs); None: all

    def __post_init__(self) -> None:
        DATASETS.get(self.dataset)  # an unknown name raises, listing the registered ones
        if self.examples is not None and (
            isinstance(self.examples, bool) or not isinstance(self.examples, int) or self.examples < 1
        ):
            raise bad_value("examples", "an integer >= 1 (or none: every example)", self.examples)
        if self.data_dir is not None:
            object.__setattr__(self, "data_dir", str(self.data_dir))

    def load(self, seed: int = 0) -> DataSplit:
        """The seeded, stratified train/val split (:func:`quasistatic.load_dataset`), each split cut to
        its first :attr:`examples`."""
        split = load_dataset(
            self.dataset,
            data_dir=self.data_dir,
            classes=self.classes,
            relabel=self.relabel,
            seed=seed,
            val_fraction=self.val_fraction,
            download=self.download,
        )
        if self.examples is None:
            return split
        train, val = (part.subset(torch.arange(min(self.examples, len(part)))) for part in (split.train, split.val))
        return DataSplit(train, val, split.name)


@dataclass(frozen=True)
class StartConfig:
    """Where the process starts: the controls (λ, γ) and the equilibrium there, a checkpoint at them
    or a fresh model trained there with Adam (Sec. 5.1); it is polished onto ∇θJ = 0 (eq. 15)."""

    lam: float = 1.0  # λ, weight of the distortion D
    gamma: float = 10.0  # γ, weight of the classification loss C
    checkpoint: str | None = None  # a checkpoint at (lam, gamma) to start from instead of equilibrating
    # Adam from a fresh model, in float32 (its batch_size is also fd-equilibration's)
    equilibration: EquilibrationConfig = field(default_factory=EquilibrationConfig)

    def __post_init__(self) -> None:
        if self.checkpoint is not None:
            object.__setattr__(self, "checkpoint", str(self.checkpoint))
        Controls(self.lam, self.gamma)  # checks λ, γ >= 0

    @property
    def controls(self) -> Controls:
        return Controls(self.lam, self.gamma)


@dataclass(frozen=True)
class ProcessConfig:
    """The quasi-static process: a registered name, its parameters, and whether to come back."""

    name: str = "iso-classification"  # a name from available_processes()
    params: dict[str, Any] = field(default_factory=dict)  # by the names its factory declares: {"lam_end": 1.2}
    return_sweep: bool = False  # then the same process from the end state back to the start's λ (needs lam_end)

    def __post_init__(self) -> None:
        PROCESSES.get(self.name)  # an unknown name raises, listing the registered ones
        object.__setattr__(self, "params", dict(self.params))
        if self.return_sweep and self.params.get("lam_end") is None:
            raise bad_value(
                "--return", "given with --lam-end (the return sweep drives lambda back to --lam)", self.params
            )

    def make(self, start: Controls, **overrides: Any) -> Process:
        """The process started at ``start``; ``overrides`` replace parameters (the return sweep's lam_end)."""
        return make_process(self.name, start, **{**self.params, **overrides})


@dataclass(frozen=True)
class FollowConfig:
    """How the process is followed: ``method`` "engine" (a predictor, a corrector, what every
    accepted step must hold, how every linear solve is done) or "fd-equilibration" (the paper's:
    finite differences of equilibrated models, :class:`quasistatic.FiniteDifferenceEquilibration`)."""

    method: str = "engine"  # one of METHODS
    integrator: str = "hermite"  # the predictor, a name from available_integrators()
    integrator_options: dict[str, Any] = field(default_factory=dict)  # e.g. {"rtol": 1e-6} for the adaptive ones
    corrector: str = "newton"  # a name from available_correctors()
    corrector_options: dict[str, Any] = field(default_factory=dict)  # e.g. {"max_iter": 10}; the engine sets
    # its grad_tol and drift_tol
    engine: EngineConfig = field(default_factory=EngineConfig)  # steps and what every accepted step holds
    linear_solve: LinearSolveConfig = field(default_factory=LinearSolveConfig)  # tangents, corrector, polish
    fd_step: float = 1e-2  # fd-equilibration: finite-difference step in each control
    fd_epochs: int = 10  # fd-equilibration: epochs of every equilibration

    def __post_init__(self) -> None:
        object.__setattr__(self, "integrator_options", dict(self.integrator_options))
        object.__setattr__(self, "corrector_options", dict(self.corrector_options))
        self.make_integrator()  # an unknown name or option raises, naming the accepted ones
        self.make_corrector()
        for name in sorted({"grad_tol", "drift_tol"} & set(self.corrector_options)):  # the engine's replace them
            warnings.warn(
                f"--corrector-option {name} is unused: --{name.replace('_', '-')} sets it", UserWarning, stacklevel=3
            )
        if self.method not in METHODS:
            raise choice_error("method", METHODS, self.method)

    def make_integrator(self) -> Integrator:
        return make_integrator(self.integrator, **self.integrator_options)

    def make_corrector(self) -> Corrector:
        return make_corrector(self.corrector, **self.corrector_options)

    def check(self, process: Process) -> None:
        """That ``process`` can be followed so: ``at_fold="arclength"`` needs a residual form (solving
        for γ with ``arclength="s-log-gamma"``)."""
        if self.engine.at_fold == "arclength":
            require_residual_form(process, self.engine.arclength)


def _default_model() -> ModelConfig:
    return ModelConfig(hidden=(16,))  # the command line's: small enough for exact curvature solves on a CPU


@dataclass(frozen=True)
class RunSettings:
    """The settings every run shares, in sections: where it writes, the data, the model, the start,
    how it is followed, and J's own settings; config.json holds :meth:`to_dict`. A process run
    (:class:`RunConfig`) adds its process, a transfer run
    (:class:`~quasistatic.experiments.transfer_run.TransferConfig`) its tasks and method.

    ``model``'s ``input_shape`` and ``num_classes`` are the data's: the run sets them from the
    loaded data (config.json holds the config as run). Its ``likelihood`` is as given (the command
    line picks "gaussian" for cifar10).
    """

    out: str  # the run directory
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=_default_model)
    start: StartConfig = field(default_factory=StartConfig)
    follow: FollowConfig = field(default_factory=FollowConfig)
    samples: int = 1  # K, fixed noise draws per example (eq. 1's expectations over e(z|x))
    chunk_size: int | None = None  # examples evaluated at once (memory; None: all of a rank's); see Objective
    sigma: float = 3e-2  # σ of eq. 6's σS term, S = ½‖θ‖² (> 0 keeps J's minima isolated)
    seed: int = 0  # of the split, the initialization, the noise, Adam's and fd-equilibration's minibatches
    # (the linear solves' subsamples have follow.linear_solve.seed; the command line sets both)
    device: str = "cpu"  # "cpu" or "cuda"
    dtype: str = "float64"  # of the process (the start's Adam runs in float32): a key of DTYPES
    imports: tuple[str, ...] = ()  # modules imported first, for what they register (processes, data sets, ...)
    resume: bool = False  # continue the run in ``out`` from its last step
    overwrite: bool = False  # empty an existing ``out`` first
    max_work: float | None = None  # stop following after this many gradient-equivalents of the process
    # objective (the start's polish included, not the Adam training of a fresh model, nor a transfer
    # baseline's epochs): a budget for runs that crawl; resume with a larger one to go on (None: no limit)

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", str(self.out))
        if self.max_work is not None and not 0 < self.max_work < math.inf:
            raise bad_value("max_work", "a finite number of gradient-equivalents > 0 (None: no limit)", self.max_work)
        object.__setattr__(self, "imports", module_names(self.imports))
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise bad_value("samples", "an integer >= 1", self.samples)
        if self.dtype not in DTYPES:
            raise choice_error("dtype", DTYPES, self.dtype)
        check_chunk_size(self.chunk_size)

    def to_dict(self) -> dict[str, Any]:
        """The sections as nested dicts of plain values (config.json's keys besides ``record``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls: type[_Settings], data: Mapping[str, Any]) -> _Settings:
        """The config of ``data``: :meth:`to_dict`'s result or a run's config.json (its ``record``
        is skipped). A missing key takes its default; an unknown one is refused. The modules of
        ``imports`` are imported first: the names in the config may be theirs."""
        if not isinstance(data, Mapping):
            raise bad_value("run config", "a mapping of its sections", type(data).__name__)
        import_modules(data.get("imports", ()))
        return _from_mapping(cls, {key: value for key, value in data.items() if key != RECORD}, "run config")


@dataclass(frozen=True)
class RunConfig(RunSettings):
    """Every setting of a process run: the shared ones (:class:`RunSettings`) and the process."""

    process: ProcessConfig = field(default_factory=ProcessConfig)


def _from_mapping(kind: type[_Config], data: Any, where: str) -> _Config:
    """The dataclass ``kind`` from ``data``, its dataclass fields built the same way."""
    if not isinstance(data, Mapping):
        raise bad_value(where, "a mapping", data)
    known = fields(kind)  # type: ignore[arg-type]
    names = [f.name for f in known]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise bad_value(f"keys of {where}", f"among {{{', '.join(names)}}}", unknown)
    required = [f.name for f in known if f.default is MISSING and f.default_factory is MISSING]
    if not set(required) <= set(data):
        raise bad_value(where, f"a mapping with the keys {{{', '.join(required)}}}", sorted(data))
    hints = typing.get_type_hints(kind)
    return kind(
        **{
            key: _from_mapping(hints[key], value, f"{where} {key}") if is_dataclass(hints[key]) else value
            for key, value in data.items()
        }
    )


def module_names(names: Iterable[str]) -> tuple[str, ...]:
    """``names`` as a tuple of module names (a single string is refused: it is not a list of them)."""
    if isinstance(names, str):
        raise bad_value("imports", "a sequence of module names", names)
    return tuple(names)


def import_modules(names: Iterable[str]) -> None:
    """Import each module of ``names`` (for the registrations it makes); one that is not found raises."""
    for name in module_names(names):
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name != name and not name.startswith(f"{error.name}."):  # one that it imports is missing
                raise
            raise bad_value("--import", "a module on the Python path", name) from None


def torch_device(name: str) -> torch.device:
    """The device named ``name``: "cpu", or "cuda" where CUDA is available."""
    accepted = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    if name not in accepted:
        raise choice_error(
            "device" + ("" if torch.cuda.is_available() else " (CUDA is not available here)"), accepted, name
        )
    return torch.device(name)


def torch_dtype(name: str) -> torch.dtype:
    """The dtype named ``name``, a key of :data:`DTYPES`."""
    if name not in DTYPES:
        raise choice_error("dtype", DTYPES, name)
    return DTYPES[name]


def versions() -> dict[str, str]:
    """The versions config.json records: this package, Python and the numerical libraries."""
    import numpy
    import scipy
    import sklearn

    return {
        "quasistatic": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "scikit-learn": sklearn.__version__,
    }


def run_record(split: DataSplit, group: ShardGroup | None) -> dict[str, Any]:
    """What config.json's ``record`` holds of every run: the data's sizes, the versions, the threads
    and the ranks."""
    return {
        "data": {"name": split.name, "train": len(split.train), "val": len(split.val)},
        "versions": versions(),
        "threads": torch.get_num_threads(),
        "ranks": 1 if group is None else group.size,
    }


def record_budget(run: RunDirectory, config: RunSettings) -> None:
    """A resumed run's config.json gets the work budget it now runs under (the one key of
    :data:`RESUME_IGNORES` that changes what the run does), so that ``rerun`` repeats it."""
    saved = run.read_json(CONFIG_FILE)
    if saved.get("max_work") != config.max_work:
        run.write_json(CONFIG_FILE, {**saved, "max_work": config.max_work})


def model_for_data(model: ModelConfig, data: LabeledData) -> ModelConfig:
    """``model`` with the input shape and the number of classes of ``data``."""
    return replace(model, input_shape=data.input_shape, num_classes=data.num_classes)


def split_objectives(
    model: RepresentationModel,
    split: DataSplit,
    *,
    samples: int = 1,
    sigma: float = 0.0,
    seed: int = 0,
    chunk_size: int | None = None,
    group: ShardGroup | None = None,
) -> tuple[Objective, Objective]:
    """J on the training split (noise seed ``seed``) and on the validation split (its own, seed + 1000),
    each evaluated ``chunk_size`` examples at a time and sharded over the ranks of ``group`` when given."""
    return (
        Objective(model, split.train, samples, noise_seed=seed, chunk_size=chunk_size, sigma=sigma, group=group),
        Objective(model, split.val, samples, noise_seed=seed + 1000, chunk_size=chunk_size, sigma=sigma, group=group),
    )


def rank_directory(run: RunDirectory, group: ShardGroup | None) -> RunDirectory:
    """Where this rank writes ``run``: the run directory itself on rank 0 (or alone); on the other
    ranks a temporary directory of their own, removed at exit, that starts as a copy of the run
    directory when it resumes (the module docstring says why). Every rank of ``group`` calls it, and
    rank 0 returns (and may create or empty the directory, or change it: a resumed run drops the
    rows after its last state) only once every rank has checked it and the others have their copy."""
    if group is None:
        return run
    own = run
    if not group.is_main:
        scratch = Path(tempfile.mkdtemp(prefix=f"quasistatic-rank{group.rank}-"))
        atexit.register(shutil.rmtree, scratch, ignore_errors=True)
        if run.resume:
            shutil.copytree(run.path, scratch, dirs_exist_ok=True)
        own = RunDirectory(scratch, overwrite=not run.resume, resume=run.resume)
    group.barrier()
    return own


def starting_model(
    start: StartConfig,
    model: ModelConfig,
    run: RunDirectory,
    objective_of: Callable[[RepresentationModel], Objective],
    *,
    linear_solve: LinearSolveConfig,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float64,
    progress: bool = True,
) -> RepresentationModel:
    """The model a process starts from, on ``device`` in ``dtype``: the run's own start.pt when it
    resumes, ``start.checkpoint`` (its controls must be the start's), or a fresh model of ``model``
    trained with ``start.equilibration`` on ``objective_of(model)`` at the start's controls (in
    float32; ``linear_solve`` is checked for the model's size before the training)."""
    controls = start.controls
    if run.resume and run.file("start.pt").exists():
        return load_checkpoint(run.file("start.pt"), expect=model).model(device, dtype)
    if start.checkpoint:
        checkpoint = load_checkpoint(start.checkpoint, expect=model)
        saved = checkpoint.controls
        if (saved.lam, saved.gamma) != (controls.lam, controls.gamma):
            raise InputError(
                f"--lam and --gamma must equal the checkpoint's controls "
                f"({saved.lam:g}, {saved.gamma:g}), got ({controls.lam:g}, {controls.gamma:g})"
            )
        return checkpoint.model(device, dtype)
    fresh = build_model(model, seed=seed).to(device)  # Adam in float32, on the device
    linear_solve.resolved(sum(p.numel() for p in fresh.parameters()))  # refused before the training
    equilibrate(objective_of(fresh), controls, start.equilibration, seed=seed, progress=progress)
    return fresh.to(dtype=dtype)


def follow(
    process: Process,
    objective: Objective,
    recorder: TrajectoryRecorder,
    config: FollowConfig,
    *,
    seed: int = 0,
    batch_size: int = 32,
    start: Tensor | None = None,
    progress: bool = True,
    max_work: float | None = None,
) -> StopError | None:
    """Polish ``start`` (default: the model's parameters) onto the surface at ``process.start``
    (unless ``recorder``'s run directory resumes: then from its last state), then follow
    ``process`` to s = 1 by ``config.method``, recording every step. None when s = 1 was reached;
    else the error that stopped the process (a fold it stopped at is also written to fold.json).
    ``max_work``: a :class:`WorkBudgetSpent` once the objective's work counter reaches it, checked
    after the start and after every step; the polish of the start is held to as many L-BFGS
    iterations (one gradient each), and one that stops there unconverged is the budget spent.
    ``seed`` and ``batch_size``: fd-equilibration's minibatches."""
    controls = process.start
    linear_solve = LinearSolve(objective, config.linear_solve)
    engine = QuasiStaticEngine(
        objective, process, config.make_integrator(), config.make_corrector(), config.engine, linear_solve
    )
    recorder.linear_solve = linear_solve
    state = recorder.restore() if recorder.run.resume else None
    if state is None:
        theta = objective.initial_theta() if start is None else start
        budget = {} if max_work is None else {"max_iter": min(POLISH_ITERATIONS, max(1, int(max_work)))}
        polished = polish(linear_solve, theta, controls, grad_tol=config.engine.grad_tol, progress=progress, **budget)
        if not polished.converged and max_work is not None and objective.work.gradient_equivalents >= max_work:
            return WorkBudgetSpent(
                f"the work budget of {max_work:g} gradient-equivalents is spent in the polish of the start "
                f"(|grad J| = {polished.grad_norm:.3e} > {config.engine.grad_tol:g} after "
                f"{objective.work.gradient_equivalents:.0f}); --resume with a larger --max-work polishes again"
            )
        require_equilibrium(polished, config.engine.grad_tol)
        state = engine.start(polished.theta, controls)
        recorder.record(state)
    stepper = (
        engine
        if config.method == "engine"
        else FiniteDifferenceEquilibration(
            objective,
            process,
            steps=config.engine.steps,
            fd_step=config.fd_step,
            epochs=config.fd_epochs,
            batch_size=batch_size,
            seed=seed,
        )
    )

    def check_budget(state: EngineState) -> None:
        spent = objective.work.gradient_equivalents
        if max_work is not None and spent >= max_work and state.s < 1.0 - 1e-12:
            where = state.controls
            raise WorkBudgetSpent(
                f"the work budget of {max_work:g} gradient-equivalents is spent ({spent:.0f} at s="
                f"{state.s:.6g}: lambda={where.lam:.6g}, gamma={where.gamma:.6g}, t={where.t:.6g}); "
                "--resume with a larger --max-work goes on"
            )

    def on_step(report: StepReport) -> None:
        recorder.on_step(report)
        check_budget(report.state)

    try:
        check_budget(state)
        stepper.run(state, on_step)
    except (StepSizeError, DivergenceError, WorkBudgetSpent) as error:
        if isinstance(error, FoldError):
            recorder.run.write_json("fold.json", error.fold.to_dict())
        return error
    return None


def stop_message(error: StopError, directory: Path) -> str:
    """What stopped a process, and where its trajectory so far (and the fold it stopped at) are."""
    written = str(directory / "trajectory.csv")
    if isinstance(error, FoldError):
        written = f"{written}, the fold in {directory / 'fold.json'}"
    return f"{error}; the trajectory so far is in {written}"


def trajectory_numbers(rows: list[dict[str, str]], sigma: float, process: Process | None) -> dict[str, Any]:
    """What a recorded trajectory ``rows`` shows, as numbers: where it ended, the drift of the
    process's constraint g (C when it has none), the first-law residual dR + λdD + γdC + σdS
    (eq. 7; with the data term ∂_tJ dt where t moves) relative to |dR| on the worst continuous
    stretch between jumps past folds (nan when no stretch moved R, or when t moved in rows without
    ∂_tJ), the jumps and the free energy they dissipated, ‖∇θJ‖ at both ends, validation accuracy
    (start, min, max; and on the target alone, start and end, for a transfer) and the cost."""
    jumps = [i for i, row in enumerate(rows) if row.get("event") == "jump"]
    values = [numeric(row) for row in rows]
    weights = (None if process is None else process.constraint) or (0.0, 0.0, 1.0)
    held = [sum(w * v[name] for w, name in zip(weights, "RDC")) for v in values]
    edges = [0, *jumps, len(values)]
    laws = [first_law_residual(values[a:b], sigma) for a, b in zip(edges[:-1], edges[1:]) if b - a > 1]
    if any(math.isnan(residual) for residual, _ in laws):  # t moved in rows without ∂_tJ: not checked
        laws = []
    ratios = [residual / delta_r for residual, delta_r in laws if delta_r > 0]
    data_moved = any(v["t"] != values[0]["t"] for v in values)
    accuracy = [v["val_acc"] for v in values if "val_acc" in v]
    target = [v["target_val_acc"] for v in values if "target_val_acc" in v]
    first, last = values[0], values[-1]
    return {
        "steps": len(rows) - 1,
        "s_end": last["s"],
        "t_end": last["t"],
        "lam_start": first["lam"],
        "gamma_start": first["gamma"],
        "lam_end": last["lam"],
        "gamma_end": last["gamma"],
        "constraint": " + ".join(f"{w:g}*{x}" if w != 1 else x for w, x in zip(weights, "RDC") if w) or "C",
        "max_drift": max(abs(g - held[0]) for g in held) / abs(held[0]),
        "first_law": max(ratios) if ratios else math.nan,
        "first_law_total": laws[0] if len(laws) == 1 else None,  # (|residual|, |dR|) when the path is one stretch
        "stretches": len(laws),
        "data_moved": data_moved,
        "jumps": len(jumps),
        "dissipation": sum(values[i]["dissipation"] for i in jumps),
        "grad_norm_start": first["grad_norm"],
        "grad_norm_end": last["grad_norm"],
        "val_acc_start": accuracy[0] if accuracy else math.nan,
        "val_acc_min": min(accuracy, default=math.nan),
        "val_acc_max": max(accuracy, default=math.nan),
        "target_val_acc_start": target[0] if target else math.nan,
        "target_val_acc_end": target[-1] if target else math.nan,
        "grad_evals": last["grad_evals"],
        "wall_s": last["wall_s"],
    }


def trajectory_summary(rows: list[dict[str, str]], sigma: float, process: Process | None) -> str:
    """Drift of the process's constraint, first-law residual (on each continuous stretch when the
    run jumped past folds, with the dissipated free energy), ‖∇θJ‖ at both ends and the cost of the
    recorded trajectory ``rows`` (:func:`trajectory_numbers`), as the line the commands print."""
    n = trajectory_numbers(rows, sigma, process)
    if n["data_moved"] and not n["stretches"]:
        law = "the first law of eq. 7 not checked (the data moved and the rows do not hold dJ/dt)"
        if n["jumps"]:
            law += f", {n['jumps']} jump(s) past folds dissipating {n['dissipation']:.6g} (J before - J after)"
    elif n["jumps"]:
        law = (
            f"first law on each of {n['stretches']} continuous stretches <= {n['first_law']:.3e} of its |dR|, "
            f"{n['jumps']} jump(s) past folds dissipating {n['dissipation']:.6g} (J before - J after)"
        )
    else:
        residual, delta_r = n["first_law_total"] or (0.0, 0.0)
        law = f"first law |dR + lam dD + gamma dC + sigma dS| = {residual:.3e} of |dR| = {delta_r:.3e}"
    return (
        f"{n['steps']} steps, max |g - g0|/g0 = {n['max_drift']:.3e} for g = {n['constraint']}, {law}, "
        f"grad_norm {n['grad_norm_start']:.2e} -> {n['grad_norm_end']:.2e}, "
        f"{n['grad_evals']:.0f} gradient-equivalents, {n['wall_s']:.0f} s"
    )


class RecordedRun:
    """What a finished run (of :func:`run_process` or
    :func:`~quasistatic.experiments.transfer_run.run_transfer`) shows from its directory: the
    trajectory, why it stopped, its numbers. Needs ``config`` (its ``sigma``), ``process`` (None:
    no constraint), ``directory`` and ``error``."""

    config: RunSettings
    process: Process | None
    directory: Path
    error: StopError | None

    @property
    def trajectory(self) -> list[dict[str, str]]:
        """The rows of trajectory.csv as written, one per step (:func:`.trajectory.read_trajectory`)."""
        return read_trajectory(self.directory)

    @property
    def failure(self) -> str | None:
        """Why the run stopped before s = 1 and where its trajectory is; None when it got there."""
        return None if self.error is None else stop_message(self.error, self.directory)

    def numbers(self) -> dict[str, Any]:
        """:func:`trajectory_numbers` of the trajectory."""
        return trajectory_numbers(self.trajectory, self.config.sigma, self.process)


@dataclass
class Run(RecordedRun):
    """A process run: the config it ran with, the process, its directory and how it ended."""

    config: RunConfig  # as run (the model's input_shape and num_classes are the data's)
    process: Process
    directory: Path
    label: str  # the summary line's lead: "iso-classification (engine, hermite/newton)", "... return"
    error: StopError | None = None  # what stopped the process before s = 1 (None: it got there)
    figures: list[Path] = field(default_factory=list)  # drawn by run_process: Figs. 2 and 4b
    returned: Run | None = None  # the return sweep (config.process.return_sweep) in directory/return/: its
    # process is the way back, its config the forward run's
    hysteresis: Path | None = None  # both sweeps drawn together, once the return sweep got back

    def summary(self) -> str:
        """The line the command line prints: the label, the constraint's drift, the first law, the
        gradient norms and the cost (:func:`trajectory_summary`)."""
        return f"{self.label}: {trajectory_summary(self.trajectory, self.config.sigma, self.process)}"

    def plot(self, directory: str | Path | None = None) -> list[Path]:
        """Figs. 2 and 4b of the trajectory as PNGs in ``directory`` (default: the run's, created when
        missing); their paths."""
        target = self.directory if directory is None else Path(directory)
        target.mkdir(parents=True, exist_ok=True)
        return plot_trajectory(self.trajectory, target, f"{self.config.process.name} ({self.config.follow.method})")

    def _loop_name(self) -> str:
        """The λ loop of a return sweep: "lambda 1 -> 1.2 -> 1"."""
        lam, lam_end = self.config.start.lam, self.config.process.params["lam_end"]
        return f"lambda {lam:g} -> {lam_end:g} -> {lam:g}"

    def loop_summary(self) -> str:
        """The free energy dissipated by the jumps past folds of both sweeps of the loop."""
        if self.returned is None:
            raise ValueError("loop_summary needs a run with a return sweep")
        rows = [*self.trajectory, *self.returned.trajectory]
        jumps = [numeric(row)["dissipation"] for row in rows if row.get("event") == "jump"]
        return f"loop {self._loop_name()}: dissipated free energy {sum(jumps):.6g} in {len(jumps)} jump(s)"


def check_resumable(run: RunDirectory, config: RunSettings) -> None:
    """A resumed run goes on with the config it started with: every key of config.json but
    :data:`RESUME_IGNORES` (and its ``record``) must equal ``config``'s."""
    saved = run.read_json(CONFIG_FILE)
    current = json.loads(json.dumps(config.to_dict(), default=str))
    sections = sorted(key for key in (f.name for f in fields(config)) if is_dataclass(getattr(config, key)))
    if not set(sections) <= set(saved):
        kind = type(config).__name__
        raise bad_value(
            f"--resume's {run.file(CONFIG_FILE)}",
            f"a {kind} with the sections {', '.join(sections)} (written by a run of the same kind)",
            sorted(saved),
        )
    new = _flatten(current)
    old = _flatten({key: value for key, value in saved.items() if key != RECORD})
    for key in sorted(new.keys() | old.keys()):
        if key.split(".")[0] not in RESUME_IGNORES and new.get(key) != old.get(key):
            raise InputError(f"{key} must equal the resumed run's {old.get(key)!r}, got {new.get(key)!r}")


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one mapping with dotted keys ("follow.engine.steps")."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def run_process(
    config: RunConfig, *, resume: bool | None = None, progress: bool = True, group: ShardGroup | None = None
) -> Run:
    """Run ``config``'s process end to end in ``config.out``, as the process commands do: start on
    the surface, follow the process to s = 1, write config.json, start.pt, state.pt,
    trajectory.csv and the figures, and with ``return_sweep`` the sweep back (``return/``,
    hysteresis.png). ``resume`` (default: ``config.resume``) continues an interrupted run to the
    same trajectory. Every setting is checked before anything is written (a bad one raises
    :class:`~quasistatic.InputError`); a process that cannot be followed ends the run with
    :attr:`Run.error` set, its trajectory so far recorded.

    ``group``: run data-parallel on its ranks (each calls ``run_process`` with the same config;
    they must agree on it); only rank 0 writes ``config.out`` and shows progress (the module
    docstring), and the :class:`Run` of another rank points to its temporary copy."""
    if resume is not None:
        config = replace(config, resume=resume)
    if group is not None:
        group.agree("the run config", config.to_dict())
        progress = progress and group.is_main
    import_modules(config.imports)
    device, dtype = torch_device(config.device), torch_dtype(config.dtype)
    controls = config.start.controls
    process = config.process.make(controls)
    if process.uses_mixture:
        raise InputError(
            f"process {config.process.name!r} must run on a source/target mixture, got the single "
            f"data set {config.data.dataset!r} (use the transfer command)"
        )
    config.follow.check(process)
    run = RunDirectory(config.out, overwrite=config.overwrite, resume=config.resume)
    split = config.data.load(config.seed)
    config = replace(config, model=model_for_data(config.model, split.train))
    if config.resume:
        check_resumable(run, config)

    def objectives(model: RepresentationModel) -> tuple[Objective, Objective]:
        return split_objectives(
            model,
            split,
            samples=config.samples,
            sigma=config.sigma,
            seed=config.seed,
            chunk_size=config.chunk_size,
            group=group,
        )

    model = starting_model(
        config.start,
        config.model,
        run,
        lambda m: objectives(m)[0],
        linear_solve=config.follow.linear_solve,
        seed=config.seed,
        device=device,
        dtype=dtype,
        progress=progress,
    )
    train, val = objectives(model)
    run = rank_directory(run, group)
    run.prepare()
    if config.resume:
        record_budget(run, config)
    else:
        run.write_json(
            CONFIG_FILE,
            {
                **config.to_dict(),
                RECORD: {"process": process.describe(), **run_record(split, group)},
            },
        )
        save_checkpoint(run.file("start.pt"), model, controls, {"dataset": split.name, "classes": config.data.classes})
    method = config.follow
    how = f"engine, {method.integrator}/{method.corrector}" if method.method == "engine" else method.method
    result = Run(config, process, run.path, f"{config.process.name} ({how})")
    result.error = _follow_run(config, process, train, TrajectoryRecorder(run, train, val), progress=progress)
    if result.error is None:
        result.figures = result.plot()
        if config.process.return_sweep:
            _return_sweep(result, train, val, progress)
    return result


def _follow_run(
    config: RunConfig,
    process: Process,
    train: Objective,
    recorder: TrajectoryRecorder,
    *,
    start: Tensor | None = None,
    progress: bool,
) -> StopError | None:
    """:func:`follow` with the run's settings."""
    return follow(
        process,
        train,
        recorder,
        config.follow,
        seed=config.seed,
        batch_size=config.start.equilibration.batch_size,
        start=start,
        progress=progress,
        max_work=config.max_work,
    )


def _return_sweep(forward: Run, train: Objective, val: Objective, progress: bool) -> None:
    """The same process from ``forward``'s end state back to its starting λ, in forward.directory/
    return/ (resumable), set as ``forward.returned``; once it gets back, hysteresis.png draws both
    sweeps (the free energy their jumps dissipate: :meth:`Run.loop_summary`)."""
    config = forward.config
    end: EngineState = torch.load(forward.directory / STATE_FILE, weights_only=False)["state"]
    back = config.process.make(end.controls, lam_end=config.start.lam)
    path = forward.directory / "return"
    resume = config.resume and (path / CONFIG_FILE).exists()
    sweep = RunDirectory(path, overwrite=not resume, resume=resume)
    sweep.prepare()
    if not resume:
        sweep.write_json(CONFIG_FILE, {"return_of": str(forward.directory), "process": back.describe()})
        train.work = WorkCounter()  # the return sweep's rows count its own work (a resumed one restores it)
    error = _follow_run(config, back, train, TrajectoryRecorder(sweep, train, val), start=end.theta, progress=progress)
    forward.returned = Run(config, back, path, f"{config.process.name} return", error)
    if error is None:
        forward.hysteresis = plot_hysteresis(
            [("forward", forward.trajectory), ("return", forward.returned.trajectory)],
            forward.directory / "hysteresis.png",
            f"{config.process.name}: {forward._loop_name()}",
        )
