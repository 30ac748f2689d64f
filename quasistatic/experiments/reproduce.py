"""The paper's figures as runs: ``quasistatic reproduce FIGURE``.

A :class:`FigureSpec` names the independent process runs a figure of the paper needs (each a
:class:`~quasistatic.experiments.runner.RunConfig` with its own directory under the output
folder, so that every run resumes on its own), draws their trajectories on one figure, and holds
the paper's numbers to print beside ours. :func:`reproduce` runs them, in parallel processes with
``jobs`` > 1 (each run is a whole process run: processes, not threads, because the 2-core machines
this runs on gain nothing from threads inside one small model), and writes for every run its
``results.json`` and for the figure ``results.json`` and ``results.md`` (the table of
docs/results.md), all measured by the command. Data parallel (``group``, under torchrun): the runs
go one after the other, each over all ranks (:func:`~quasistatic.experiments.runner.run_process`
with the group), and only rank 0 writes the figure's files.

Figures are registered in :data:`FIGURES` like every other named thing of the library; the
built-in ones are Fig. 2 (five iso-classification runs from λ = 0.25, γ₀ ∈ {4, 6, 8, 10, 15},
Sec. 5.1), Fig. 4 (the free energy along the same runs, Fig. 4b), and the transfers of Fig. 5
(MNIST 0–4 → 5–9: the iso-c and geodesic transfers, fine-tuning and training from scratch, Sec.
4.3) and Fig. 6 (CIFAR-10 vehicles → animals: eq. 32's transfer with λ̇ = −1.5 from (4, 100),
fine-tuning and scratch). A figure's run is a process run
(:class:`~quasistatic.experiments.runner.RunConfig`) or a transfer run
(:class:`~quasistatic.experiments.transfer_run.TransferConfig`); the transfer runs of one figure
train the same source model (same settings and seed), so each can run in its own process.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import re
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, fields, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

from ..distributed import ShardGroup, is_main_process
from ..errors import InputError, bad_value
from ..registry import Parameter, Registry
from .plots import new_figure, save_figure
from .runner import Run, RunConfig, RunSettings, run_process
from .trajectory import read_trajectory
from .transfer import draw_transfer
from .transfer_run import TransferConfig, TransferRun, run_transfer

__all__ = ["FIGURES", "FigureSpec", "RunResult", "reproduce"]

logger = logging.getLogger(__name__)

Rows = list[dict[str, str]]


@dataclass(frozen=True)
class FigureSpec:
    """A figure of the paper: its runs (name → config), how to draw them, and the paper's numbers."""

    name: str  # the PNG's name: out/<name>.png
    title: str
    runs: Mapping[str, RunSettings]  # RunConfig (a process run) or TransferConfig (a transfer run)
    draw: Callable[[Mapping[str, Rows], Path], Path]  # the runs' trajectories (name → rows) → the PNG written
    paper: dict[str, Any] = field(default_factory=dict)  # what the paper reports, printed beside ours


@dataclass(frozen=True)
class RunResult:
    """What one run of a figure did, from its trajectory (written to its results.json)."""

    name: str
    directory: str
    numbers: dict[str, Any]  # :func:`~quasistatic.experiments.runner.trajectory_numbers`
    error: str | None  # why the process stopped before s = 1 (None: it got there)
    wall_s: float  # this invocation's wall time for the run (a resumed run: the time after resuming)


FIGURES: Registry[FigureSpec] = Registry("figure")


def _gammas(text: str) -> tuple[float, ...]:
    """ "4,6,8" → (4.0, 6.0, 8.0)."""
    try:
        values = tuple(float(part) for part in str(text).split(","))
    except ValueError:
        raise bad_value("gammas", "comma-separated numbers, e.g. 4,6,8,10,15", text) from None
    if not values or not all(v > 0 for v in values):
        raise bad_value("gammas", "comma-separated numbers > 0", text)
    return values


def _iso_classification_runs(template: RunConfig, lam: float, lam_end: float, gammas: str) -> dict[str, RunConfig]:
    """One iso-classification run per γ₀ from (lam, γ₀) to λ = lam_end (λ̇ given, the paper's
    end point λ ≈ 3.5 of Fig. 2b), each in template.out/gamma<γ₀>."""
    runs = {}
    for gamma in _gammas(gammas):
        name = f"gamma{gamma:g}"
        runs[name] = replace(
            template,
            out=str(Path(template.out) / name),
            start=replace(template.start, lam=lam, gamma=gamma),
            process=replace(template.process, name="iso-classification", params={"lam_end": lam_end}),
        )
    return runs


_FIG2_PARAMETERS = (
    Parameter("lam", float, 0.25, "λ₀ of every run (the paper's 0.25)"),
    Parameter("lam_end", float, 3.5, "final λ (the paper's Fig. 2b ends near 3.5)"),
    Parameter("gammas", str, "4,6,8,10,15", "the runs' γ₀, comma-separated (the paper's 4,6,8,10,15)"),
)
_FIG2_PAPER = {
    "dataset": "MNIST",
    "runs": "lambda 0.25 -> ~3.5, gamma0 in {4, 6, 8, 10, 15} (gamma ends near 26 for gamma0 = 15)",
    "val_acc": "0.92-0.98, constant along each run",
    "train_C": "0.06-0.2, almost unchanged",
    "method": "Remark 7 with finite differences and Adam re-equilibration (C held approximately)",
}


def _draw_fig2(runs: Mapping[str, Rows], path: Path) -> Path:
    """Fig. 2: (a) the R–D curves, (b) the (λ, γ) paths, (c) the validation loss and (d) accuracy
    along λ, all runs on one figure, jumps past folds marked."""
    return _draw(runs, path, (("D", "R"), ("lam", "gamma"), ("lam", "val_C"), ("lam", "val_acc")), "Fig. 2")


def _draw_fig4(runs: Mapping[str, Rows], path: Path) -> Path:
    """Fig. 4b: the free energy F = R + λD + γC along each run."""
    return _draw(runs, path, (("lam", "F"), ("step", "F")), "Fig. 4b")


def _draw(runs: Mapping[str, Rows], path: Path, panels: Sequence[tuple[str, str]], title: str) -> Path:
    fig = new_figure((4.2 * len(panels), 3.4))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for name, rows in runs.items():
        for ax, (x, y) in zip(axes, panels):
            (line,) = ax.plot([float(r[x]) for r in rows], [float(r[y]) for r in rows], marker=".", label=name)
            jumps = [r for r in rows if r.get("event") == "jump"]
            ax.plot([float(r[x]) for r in jumps], [float(r[y]) for r in jumps], "x", color=line.get_color())
    for ax, (x, y) in zip(axes, panels):
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    return save_figure(fig, path, f"{title} (x: jumps past folds)")


def fig2(template: RunConfig, *, lam: float = 0.25, lam_end: float = 3.5, gammas: str = "4,6,8,10,15") -> FigureSpec:
    """Fig. 2 of the paper (Sec. 5.1): iso-classification from λ = ``lam`` to ``lam_end`` for each γ₀."""
    runs = _iso_classification_runs(template, lam, lam_end, gammas)
    return FigureSpec("fig2", "Fig. 2: iso-classification", runs, _draw_fig2, _FIG2_PAPER)


def fig4(template: RunConfig, *, lam: float = 0.25, lam_end: float = 3.5, gammas: str = "4,6,8,10,15") -> FigureSpec:
    """Fig. 4b of the paper: the free energy along Fig. 2's runs (the same run directories: a
    finished Fig. 2 in the same output folder is reused with ``--resume``)."""
    runs = _iso_classification_runs(template, lam, lam_end, gammas)
    return FigureSpec("fig4", "Fig. 4b: free energy along iso-classification", runs, _draw_fig4, _FIG2_PAPER)


fig2.parameters = fig4.parameters = _FIG2_PARAMETERS  # type: ignore[attr-defined]
FIGURES.register("fig2", fig2)
FIGURES.register("fig4", fig4)


def _transfer_runs(
    template: RunConfig,
    lam: float,
    gamma: float,
    source: str,
    target: str,
    labels: str,
    methods: Mapping[str, Mapping[str, Any]],
) -> dict[str, TransferConfig]:
    """One transfer run per method (name → its process parameters), each in template.out/<method>,
    from (lam, gamma) with the template's shared settings (its process section is not used)."""
    if template.data.classes is not None or template.data.relabel:
        raise bad_value(
            "--classes/--relabel", "not given for a transfer figure (its tasks: --param source=… target=…)", "given"
        )
    shared = {f.name: getattr(template, f.name) for f in fields(RunSettings)}
    return {
        method: TransferConfig(
            **{
                **shared,
                "out": str(Path(template.out) / method),
                "data": replace(template.data, classes=None, relabel=False),
                "start": replace(template.start, lam=lam, gamma=gamma),
            },
            method=method,
            source=source,
            target=target,
            labels=labels,
            params=dict(params),
        )
        for method, params in methods.items()
    }


def _draw_transfer(runs: Mapping[str, Rows], path: Path) -> Path:
    return draw_transfer(runs, path, path.stem.replace("fig", "Fig. "))


_FIG5_PARAMETERS = (
    Parameter("lam", float, 1.0, "λ of the source model and the transfers' start"),
    Parameter("gamma", float, 10.0, "γ of the source model and the transfers' start"),
    Parameter("lam_end", float, None, "iso-c: final λ (default: λ kept, γ alone holds C)"),
    Parameter("slope", float, 0.208, "geodesic: k = dD/dR (default: the iso-c path's own slope at t = 0 on digits)"),
    Parameter("source", str, "0-4", "source classes"),
    Parameter("target", str, "5-9", "target classes"),
)
_FIG5_PAPER = {
    "dataset": "MNIST, digits 0-4 -> 5-9",
    "runs": "geodesic iso-classification transfer (constant dD/dR: R falls, D rises), fine-tuning, scratch",
    "target_val_acc": "the transfer ends near scratch's accuracy; fine-tuning starts near 0",
    "method": "finite differences and Adam re-equilibration (C held approximately)",
}
_FIG6_PARAMETERS = (
    Parameter("lam", float, 4.0, "λ of the source model and the transfer's start (the paper's 4)"),
    Parameter("gamma", float, 100.0, "γ of the source model and the transfer's start (the paper's 100)"),
    Parameter("k", float, -1.5, "λ̇ of eq. 32 (the paper's -1.5)"),
    Parameter("source", str, "vehicles", "source classes"),
    Parameter("target", str, "animals", "target classes"),
)
_FIG6_PAPER = {
    "dataset": "CIFAR-10, vehicles -> animals (a 4-way head)",
    "runs": "iso-classification transfer with lambda' = -1.5 from (4, 100) (eq. 32), fine-tuning, scratch",
    "target_val_acc": "the transfer ends near scratch's accuracy; fine-tuning starts near 0",
    "method": "finite differences and Adam re-equilibration, 300 source epochs (C held approximately)",
}


def fig5(
    template: RunConfig,
    *,
    lam: float = 1.0,
    gamma: float = 10.0,
    lam_end: float | None = None,
    slope: float = 0.208,
    source: str = "0-4",
    target: str = "5-9",
) -> FigureSpec:
    """Fig. 5 of the paper (Sec. 4.3): the iso-c transfer (eqs. 26–28), the geodesic transfer
    (eq. 30, slope ``slope``), fine-tuning and training from scratch, ``source`` → ``target`` with
    one head over all classes."""
    methods: dict[str, dict[str, Any]] = {
        "iso-c": {} if lam_end is None else {"lam_end": lam_end},
        "geodesic": {"slope": slope},
        "finetune": {},
        "scratch": {},
    }
    runs = _transfer_runs(template, lam, gamma, source, target, "shared", methods)
    return FigureSpec("fig5", "Fig. 5: transfer (iso-c, geodesic)", runs, _draw_transfer, _FIG5_PAPER)


def fig6(
    template: RunConfig,
    *,
    lam: float = 4.0,
    gamma: float = 100.0,
    k: float = -1.5,
    source: str = "vehicles",
    target: str = "animals",
) -> FigureSpec:
    """Fig. 6 of the paper: eq. 32's transfer (λ̇ = ``k``, γ̇ holds C) from (``lam``, ``gamma``),
    fine-tuning and training from scratch, ``source`` → ``target`` each relabelled to 0..k−1."""
    methods = {"constant-lambda-rate": {"k": k}, "finetune": {}, "scratch": {}}
    runs = _transfer_runs(template, lam, gamma, source, target, "separate", methods)
    return FigureSpec("fig6", "Fig. 6: transfer with constant lambda rate", runs, _draw_transfer, _FIG6_PAPER)


fig5.parameters = _FIG5_PARAMETERS  # type: ignore[attr-defined]
fig6.parameters = _FIG6_PARAMETERS  # type: ignore[attr-defined]
FIGURES.register("fig5", fig5)
FIGURES.register("fig6", fig6)


def _run_one(name: str, config: RunSettings, threads: int, group: ShardGroup | None = None) -> RunResult:
    """One run of a figure (in a worker process with ``jobs`` > 1; on the ranks of ``group``, when
    given): run_process or run_transfer, its numbers, its results.json (on the other ranks: in
    their scratch copy). A run that raises (a start that cannot be polished, a bad directory) is a
    result with that error and no numbers: the figure's other runs are kept. On ranks only bad
    input (:class:`~quasistatic.InputError`, a start that cannot be polished included) is kept so:
    every rank raises it alike (the settings and the reduced values are the same on all of them),
    while any other error may be one rank's alone, the others waiting for it in a collective, so
    it ends the launch (:func:`quasistatic.distributed.abort_on_failure`)."""
    torch.set_num_threads(threads)
    started = time.perf_counter()
    kept = Exception if group is None else InputError  # the errors reported in the figure's results
    try:
        if isinstance(config, TransferConfig):
            run: Run | TransferRun = run_transfer(config, progress=False, group=group, compare=False)
        elif isinstance(config, RunConfig):
            run = run_process(config, progress=False, group=group)
        else:
            raise bad_value("figure run", "a RunConfig or a TransferConfig", type(config).__name__)
        numbers = run.numbers()
    except kept as error:
        return RunResult(name, config.out, {}, f"{type(error).__name__}: {error}", time.perf_counter() - started)
    result = RunResult(name, str(run.directory), _plain(numbers), run.failure, time.perf_counter() - started)
    (run.directory / "results.json").write_text(json.dumps(result.__dict__, indent=2, allow_nan=False) + "\n")
    return result


def _plain(value: Any) -> Any:
    """``value`` with every nan replaced by None (JSON has no nan)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def reproduce(
    spec: FigureSpec,
    out: str | Path,
    *,
    jobs: int = 1,
    threads: int = 1,
    command: str = "",
    group: ShardGroup | None = None,
) -> dict:
    """Run every run of ``spec`` (``jobs`` at a time, each in its own process when ``jobs`` > 1,
    with ``threads`` torch threads; on the ranks of ``group``, one after the other), draw the
    figure in ``out``, write ``out``/results.json and ``out``/results.md; the results (as written
    by rank 0)."""
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise bad_value("--jobs", "an integer >= 1", jobs)
    if group is not None and jobs > 1:
        raise InputError(
            f"--jobs must be 1 under torchrun (--jobs 1 runs the figure's runs one after the other, each "
            f"data-parallel over all {group.size} ranks), got {jobs}"
        )
    splits = {(config.data, config.seed): config.data.load(config.seed) for config in spec.runs.values()}
    for config in spec.runs.values():  # absent or corrupt data, bad classes: an InputError, nothing written
        if isinstance(config, TransferConfig):
            config.tasks(splits[config.data, config.seed])
    out = Path(out)
    writes = is_main_process(group)
    if writes:
        out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict[str, RunResult] = {}
    logger.info(
        "%s: %d run(s), %d at a time (%s)",
        spec.title,
        len(spec.runs),
        jobs,
        "one process each" if jobs > 1 else "in this process",
    )
    if jobs == 1:
        for name, config in spec.runs.items():
            results[name] = _report(_run_one(name, config, torch.get_num_threads(), group))
    else:
        with ProcessPoolExecutor(max_workers=min(jobs, len(spec.runs)), mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(_run_one, name, config, threads) for name, config in spec.runs.items()]
            for future in as_completed(futures):
                result = _report(future.result())
                results[result.name] = result
    ordered = [results[name] for name in spec.runs]
    figure = out / f"{spec.name}.png"
    written = {
        "figure": spec.title,
        "command": command,
        "machine": _machine(jobs, threads, 1 if group is None else group.size),
        "wall_s": time.perf_counter() - started,
        "png": str(figure),
        "runs": [r.__dict__ for r in ordered],
        "paper": spec.paper,
    }
    if writes:  # the other ranks' runs are in their scratch copies: the figure is rank 0's
        spec.draw({r.name: read_trajectory(Path(r.directory)) for r in ordered if r.numbers}, figure)
        (out / "results.json").write_text(json.dumps(written, indent=2, allow_nan=False) + "\n")
        (out / "results.md").write_text(results_table(written))
    return written


def _report(result: RunResult) -> RunResult:
    n = result.numbers
    if not n:
        logger.info("%s: failed: %s", result.name, result.error)
        return result
    logger.info(
        "%s: %s at t %.4g, lambda %.4g, gamma %.4g after %d steps (%d jump(s)), max C drift %s, %.0f GE, %.0f s",
        result.name,
        "stopped" if result.error else "done",
        n["t_end"],
        n["lam_end"],
        n["gamma_end"],
        n["steps"],
        n["jumps"],
        _cell(n["max_drift"], ".2e"),
        n["grad_evals"],
        result.wall_s,
    )
    return result


def _machine(jobs: int, threads: int, ranks: int) -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "jobs": jobs,
        "threads_per_job": threads,
        "ranks": ranks,  # torchrun's processes, all on each run (1: alone)
        "torch": torch.__version__,
    }


def results_table(results: Mapping[str, Any]) -> str:
    """The Markdown of a figure's results.json: the command, the machine, one row per run (a
    transfer figure's with t reached and accuracy on the target), the paper's numbers."""
    ranks = results["machine"].get("ranks", 1)  # absent from the results written before torchrun ran them
    transfer = any(run["numbers"].get("target_val_acc_end") is not None for run in results["runs"])
    head = (
        "| run | reached t | λ, γ at the end | steps | jumps | dissipated ΔJ | max \\|C − C0\\|/C0 | first law "
        "(worst stretch) | target val acc (start → end) | GE | wall s (this invocation) | stopped because |"
        if transfer
        else "| run | reached λ | γ at the end | steps | jumps | dissipated ΔJ | max \\|C − C0\\|/C0 | first law "
        "(worst stretch) | val acc (start → min … max) | GE | wall s (this invocation) | stopped because |"
    )
    lines = [
        f"### {results['figure']}",
        "",
        f"`{results['command']}` — {results['wall_s']:.0f} s wall on {results['machine']['cpus']} CPUs "
        f"({results['machine']['jobs']} job(s) × {results['machine']['threads_per_job']} thread(s)"
        f"{f' × {ranks} torchrun ranks' if ranks > 1 else ''}), "
        f"{results['machine']['platform']}, torch {results['machine']['torch']}",
        "",
        head,
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in results["runs"]:
        n = run["numbers"]
        if not n:  # the run raised before it had a trajectory
            lines.append(f"| {run['name']} |" + " – |" * 10 + f" {_short(run['error'])} |")
            continue
        reached = (
            f"{n['t_end']:.4g} | {n['lam_end']:.4g}, {n['gamma_end']:.4g}"
            if transfer
            else f"{n['lam_end']:.4g} | {n['gamma_end']:.4g}"
        )
        accuracy = (
            f"{_cell(n['target_val_acc_start'], '.3f')} → {_cell(n['target_val_acc_end'], '.3f')}"
            if transfer
            else f"{n['val_acc_start']:.3f} → {n['val_acc_min']:.3f} … {n['val_acc_max']:.3f}"
        )
        lines.append(
            f"| {run['name']} | {reached} | {n['steps']} | {n['jumps']} | {n['dissipation']:.3g} | "
            f"{_cell(n['max_drift'], '.1e')} | {_cell(n['first_law'], '.1e')} | {accuracy} | "
            f"{n['grad_evals']:.0f} | {run['wall_s']:.0f} | {_short(run['error'])} |"
        )
    lines += ["", "The paper: " + "; ".join(f"{k}: {v}" for k, v in results["paper"].items()), ""]
    return "\n".join(lines)


def _cell(value: float | None, spec: str) -> str:
    """``value`` formatted by ``spec``, "–" for None (JSON's nan) or nan."""
    return "–" if value is None or math.isnan(value) else format(value, spec)


def _short(error: str | None) -> str:
    """A stop message as a table cell ("–" for none): where the run stopped and why, without the
    fold's full description and the paths."""
    if not error:
        return "–"
    message = error.split("; the trajectory so far")[0]
    head, _, reason = message.partition("extrapolated to 0): ")
    where = re.search(r"lambda=([-0-9.e+]+)", head)
    if reason and where:
        message = f"fold at λ {where.group(1)}: {reason}"
    return message.replace("|", "\\|")[:240]
