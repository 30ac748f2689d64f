"""How the cost of an engine step grows with the training set, the parameter count and the ranks (gloo).

Run (from the repository root, with both cores free; defaults shown)::

    PYTHONPATH=. python benchmarks/bench_scaling.py --fractions 0.25 0.5 1 --mnist-examples 2000 4000 8000 \\
        --widths 16 64 256 --width-data mnist:2000 --ranks 1 2 --reps 3 --engine-steps 3 \\
        [--mnist-dir /work/shared/data/mnist-t10k] [--out benchmarks/results/scaling.json] [--resume]

Cases. A case is a training set, a hidden width and a number of ranks:

- data cases: the first ``fraction`` of the seeded digits training split (1,437 images) and the first
  ``--mnist-examples`` images of the seeded MNIST training split (with only the t10k files present,
  the library splits their 10,000 images 8,000/2,000), at the hidden width ``--width`` (16, the
  CLI's digits default); MNIST cases are skipped, with a printed line, when ``--mnist-dir`` holds no
  IDX files;
- width cases: the hidden widths ``--widths`` on the one training set ``--width-data``
  (``name:examples``); a width case that is also a data case is measured once;
- every case with each of ``--ranks``: fresh processes started by ``torch.multiprocessing``, one
  thread each, the 1-rank case without a process group, the others over gloo on 127.0.0.1.

The model is the CLI's MLP (one hidden layer of the case's width, latent 8, σ = 3e-2, K = 1,
float64) at (λ, γ) = (1, 10), trained with Adam for ``--epochs`` epochs: a cheaply reached point,
since what is timed there does not depend on how close θ is to the equilibrium.

Unit costs, measured for every case at that point; each is the median of ``--reps`` timed calls
(after one untimed warm-up where the call has not run before), the ranks aligned by a barrier before
each call, and its all-reduce seconds (``ShardGroup.stats``: waiting for the slowest rank included)
taken apart:

- ``gradient``: ``objective.gradient`` (1 GE);
- ``hvp``: one block of ``--columns`` Hessian-vector products through an operator whose pullback is
  already built (the engine's reverse mode, ``quasistatic.linalg.operators.hessian_products``;
  ``--columns`` GE);
- ``operator``: a fresh ``CurvatureOperator`` and its first block: the pullback build plus one block
  (1 + ``--columns`` GE), what every solve at a new point pays once;
- ``cg``: preconditioned CG on the block (``--preconditioner``, built once at the point, default
  kfac, which every width admits) run for exactly ``--cg-iterations`` lockstep iterations, plus the
  exact residual at its end; seconds per iteration = the solve's seconds / its matvecs.

GE (gradient-equivalents: passes over the whole training set, whatever the number of ranks) are
read from ``objective.work``, so seconds per GE is comparable between the units and the cases. The
slope of log(seconds per GE) against log(examples) is fitted per unit over the data cases of each data
set and number of ranks (1: a pass costs in proportion to the data; 0: a fixed cost per pass), and
against log(parameters) over the width cases.

Engine steps (``--engine-steps``, 0 to skip; digits data cases only, they are the costly part): a
fresh model trained for ``--start-epochs`` epochs and polished to ‖∇θJ‖ ≤ 1e-6 (computed by the
first number of ranks run and reused by the others), then iso-classification to λ = 1 + 0.05·steps
in that many nominal steps (hermite predictor, newton corrector, the run's default linear solve;
the step control may accept more, smaller ones); per accepted step: seconds, GE, seconds per GE,
the all-reduce share and all-reduces. The start is not timed.

For every case with more than one rank, the speed-up is its 1-rank twin's seconds per GE over its
own. The JSON (``--out``) holds every case, the fits and the environment; the markdown tables printed
at the end are the ones for benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import socket
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

import quasistatic as qs
from quasistatic.continuation.correctors import make_corrector
from quasistatic.continuation.engine import EngineConfig, QuasiStaticEngine
from quasistatic.continuation.polish import polish
from quasistatic.errors import InputError
from quasistatic.integrators import make_integrator
from quasistatic.linalg import CurvatureOperator, LinearSolve, LinearSolveConfig
from quasistatic.linalg.krylov import cg
from quasistatic.linalg.preconditioners import IdentityPreconditioner
from quasistatic.processes import make_process

from machine import cpu_model  # benchmarks/machine.py: the script's folder is on sys.path

START = qs.Controls(1.0, 10.0)
SIGMA = 3e-2
GRAD_TOL = 1e-6  # the polish's and the engine's ‖∇θJ‖
DEFAULT_MNIST_DIR = "/work/shared/data/mnist-t10k"
DATASETS = ("digits", "mnist")
UNITS = {"gradient": "gradient", "hvp": "HVP block", "operator": "operator + block", "cg": "CG iteration"}


@dataclass(frozen=True)
class Case:
    """One training set and hidden width (measured with each number of ranks)."""

    dataset: str  # "digits" or "mnist"
    examples: int  # the first ``examples`` of the seeded training split
    pool: int  # the size of that split
    width: int  # the MLP's one hidden layer
    runs_engine: bool  # whether engine steps are run on it

    @property
    def name(self) -> str:
        return f"{self.dataset}-{self.examples}-w{self.width}"


@dataclass(frozen=True)
class Settings:
    """What every case is measured with."""

    mnist_dir: str
    epochs: int  # Adam epochs to the point of the unit costs
    reps: int  # timed calls per unit
    columns: int  # k, the columns of an HVP block and of the CG solve
    cg_iterations: int
    preconditioner: str
    engine_steps: int
    start_epochs: int  # Adam epochs before the polish of the engine's start
    start_prefix: str  # path prefix of the polished starts kept between the numbers of ranks


def load_training_split(dataset: str, mnist_dir: str) -> qs.LabeledData:
    """The seeded training split of ``dataset`` (MNIST's t10k-only warning silenced: ``main`` shows it once)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="only the MNIST test split")
        return qs.load_dataset(dataset, data_dir=mnist_dir if dataset == "mnist" else None, seed=0).train


def build_objective(case: Case, settings: Settings, group: qs.ShardGroup | None) -> qs.Objective:
    """J on the case's examples for a freshly built model (seed 0, float64), data-parallel over ``group``."""
    train = load_training_split(case.dataset, settings.mnist_dir)
    train = train.subset(torch.arange(case.examples))
    config = qs.ModelConfig(hidden=(case.width,), input_shape=train.input_shape, num_classes=train.num_classes)
    model = qs.build_model(config, seed=0).to(torch.float64)
    return qs.Objective(model, train, samples=1, noise_seed=0, sigma=SIGMA, group=group)


def all_reduce_seconds(objective: qs.Objective) -> float:
    return objective.group.stats.seconds if objective.group is not None else 0.0


def timed(objective: qs.Objective, call: Callable[[], object], reps: int, warmup: int = 1) -> dict[str, Any]:
    """``call`` run ``warmup`` times untimed, then ``reps`` times, each after a barrier of the ranks:
    the median seconds, the GE and all-reduces one call counts on ``objective.work``, and the
    all-reduce seconds (median, and their share of the summed seconds)."""
    seconds, comm = [], []
    grad_evals, reduces = 0.0, 0
    for rep in range(warmup + reps):
        if objective.group is not None:
            dist.barrier(group=objective.group.group)
        comm_before, work_before, reduces_before = (
            all_reduce_seconds(objective),
            objective.work.gradient_equivalents,
            objective.work.all_reduces,
        )
        started = time.perf_counter()
        call()
        elapsed = time.perf_counter() - started
        if rep >= warmup:
            seconds.append(elapsed)
            comm.append(all_reduce_seconds(objective) - comm_before)
            grad_evals = objective.work.gradient_equivalents - work_before
            reduces = objective.work.all_reduces - reduces_before
    median = statistics.median(seconds)
    return {
        "seconds": median,
        "grad_evals": grad_evals,
        "seconds_per_grad_eval": median / grad_evals,
        "all_reduce_s": statistics.median(comm),
        "all_reduce_fraction": sum(comm) / sum(seconds),
        "all_reduces": reduces,
        "samples_s": seconds,
    }


def unit_costs(objective: qs.Objective, settings: Settings) -> dict[str, dict[str, Any]]:
    """The four unit costs (module docstring) at the objective's current θ and (λ, γ) = (1, 10)."""
    theta = objective.initial_theta().detach()
    generator = torch.Generator().manual_seed(0)
    block = torch.randn(theta.numel(), settings.columns, generator=generator, dtype=theta.dtype)
    block /= torch.linalg.vector_norm(block, dim=0)
    operator = CurvatureOperator(objective, theta, START)
    operator(block)  # builds the kept pullback
    linear_solve = LinearSolve(objective, LinearSolveConfig(preconditioner=settings.preconditioner))
    preconditioner = linear_solve.current(theta, START)
    apply = None if isinstance(preconditioner, IdentityPreconditioner) else preconditioner.apply
    if apply is not None:
        apply(block)  # its first application, untimed
    iterations = settings.cg_iterations

    def fresh_operator() -> Tensor:
        return CurvatureOperator(objective, theta, START)(block)

    def cg_solve() -> None:
        # tol out of reach and one check at the end: every column runs all the iterations (a column
        # that meets negative curvature is frozen but still multiplied), then the exact residual
        result = cg(
            operator, block, tol=1e-300, max_iter=iterations, x0=None, preconditioner=apply, check_every=iterations
        )
        assert result.matvecs == iterations + 1, result.summary()

    units = {
        "gradient": timed(objective, lambda: objective.gradient(theta, START), settings.reps),
        "hvp": timed(objective, lambda: operator(block), settings.reps, warmup=0),  # the build was its warm-up
        "operator": timed(objective, fresh_operator, settings.reps, warmup=0),  # its paths ran above
        "cg": timed(objective, cg_solve, settings.reps, warmup=0),
    }
    units["cg"].update(iterations=iterations, seconds_per_iteration=units["cg"]["seconds"] / (iterations + 1))
    units["cg"]["preconditioner"] = linear_solve.config.preconditioner
    return units


def polished_start(case: Case, objective: qs.Objective, settings: Settings) -> tuple[Tensor, bool]:
    """The engine's start for ``case`` and whether it was read: from ``settings.start_prefix`` when
    a run with another number of ranks left it there, else Adam for ``start_epochs`` epochs and the
    polish to ‖∇θJ‖ ≤ 1e-6 (then kept there by rank 0)."""
    path = Path(f"{settings.start_prefix}-{case.name}-e{settings.start_epochs}.pt")
    if path.exists():
        return torch.load(path), True
    qs.equilibrate(objective, START, qs.EquilibrationConfig(epochs=settings.start_epochs), seed=0, progress=False)
    theta = polish(LinearSolve(objective), objective.initial_theta(), START, grad_tol=GRAD_TOL).theta.detach()
    if objective.is_main:
        torch.save(theta, path)
    return theta, False


def engine_steps(case: Case, settings: Settings, group: qs.ShardGroup | None) -> dict[str, Any]:
    """Seconds, GE and all-reduces of each accepted step of iso-classification from the polished start."""
    objective = build_objective(case, settings, group)
    started = time.perf_counter()
    theta, read = polished_start(case, objective, settings)
    start_s = time.perf_counter() - started
    steps = settings.engine_steps
    engine = QuasiStaticEngine(
        objective,
        make_process("iso-classification", START, lam_end=START.lam + 0.05 * steps),
        make_integrator("hermite"),
        make_corrector("newton"),
        EngineConfig(steps=steps, grad_tol=GRAD_TOL, drift_tol=1e-4),
        LinearSolve(objective),
    )
    state = engine.start(theta, START)
    rows: list[dict[str, float]] = []

    def marks() -> tuple[float, float, float, int]:
        work = objective.work
        return time.perf_counter(), work.gradient_equivalents, all_reduce_seconds(objective), work.all_reduces

    last = [marks()]

    def on_step(report: object) -> None:
        now = marks()
        rows.append(
            dict(zip(("seconds", "grad_evals", "all_reduce_s", "all_reduces"), (a - b for a, b in zip(now, last[0]))))
        )
        last[0] = now

    engine.run(state, on_step)
    seconds, work = sum(r["seconds"] for r in rows), sum(r["grad_evals"] for r in rows)
    return {
        "start": "read" if read else "computed",
        "start_s": start_s,
        "nominal_steps": steps,
        "steps": len(rows),
        "seconds_per_step": seconds / len(rows),
        "grad_evals_per_step": work / len(rows),
        "seconds_per_grad_eval": seconds / work,
        "all_reduce_fraction": sum(r["all_reduce_s"] for r in rows) / seconds,
        "all_reduces_per_step": sum(r["all_reduces"] for r in rows) / len(rows),
        "rows": rows,
    }


def run_case(rank: int, ranks: int, port: int, case: Case, settings: Settings, out: str) -> None:
    """One rank of one case (the target of ``mp.spawn``); rank 0 writes the case's measurements to ``out``."""
    torch.set_num_threads(1)
    group = None
    if ranks > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=ranks, timeout=datetime.timedelta(seconds=300))
        group = qs.ShardGroup()
    try:
        objective = build_objective(case, settings, group)
        started = time.perf_counter()
        qs.equilibrate(objective, START, qs.EquilibrationConfig(epochs=settings.epochs), seed=0, progress=False)
        result: dict[str, Any] = {
            **asdict(case),
            "ranks": ranks,
            "parameters": objective.layout.numel,
            "threads": torch.get_num_threads(),
            "adam_s": time.perf_counter() - started,
            "units": unit_costs(objective, settings),
        }
        if case.runs_engine and settings.engine_steps > 0:
            result["engine"] = engine_steps(case, settings, group)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        result.update(cpu_user_s=usage.ru_utime, cpu_system_s=usage.ru_stime)  # this rank's whole process
        if rank == 0:
            Path(out).write_text(json.dumps(result))
        if group is not None:
            group.barrier()  # no rank tears the group down while another still uses it (gloo aborts then)
    finally:
        if group is not None:
            dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(case: Case, ranks: int, settings: Settings, part: Path) -> dict[str, Any]:
    """Run ``case`` on ``ranks`` fresh processes and return rank 0's measurements (with the wall time)."""
    started = time.perf_counter()
    mp.spawn(run_case, args=(ranks, free_port(), case, settings, str(part)), nprocs=ranks, join=True)
    result = json.loads(part.read_text())
    part.unlink()
    result["wall_s"] = time.perf_counter() - started
    return result


def case_key(result: dict[str, Any]) -> tuple[str, int, int]:
    """The case a result (or ``asdict`` of a :class:`Case`) is of: its data set, examples and width."""
    return result["dataset"], result["examples"], result["width"]


def remove_starts(out: Path) -> None:
    """Delete the polished starts kept beside ``out`` (by this run, or left by an interrupted one)."""
    for start in out.parent.glob(f"{out.stem}-start-*.pt"):
        start.unlink()


def environment() -> dict[str, Any]:
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "quasistatic": qs.__version__,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "threads_per_rank": 1,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
    }


def plan(args: argparse.Namespace, pools: dict[str, int]) -> list[Case]:
    """The distinct cases of the command line over the data sets present (``pools``: training split
    sizes), data cases first, then the width cases."""
    ranks = max(args.ranks)
    wanted = [("digits", max(ranks, round(f * pools["digits"])), args.width) for f in args.fractions]
    wanted += [("mnist", n, args.width) for n in args.mnist_examples]
    wanted += [(args.width_data[0], args.width_data[1], w) for w in args.widths]
    cases: dict[tuple[str, int, int], Case] = {}
    for dataset, examples, width in wanted:
        if dataset not in pools or (dataset, examples, width) in cases:
            continue
        if not ranks <= examples <= pools[dataset]:
            raise SystemExit(f"{dataset}: {examples} examples asked, {ranks} to {pools[dataset]} possible")
        engine = dataset == "digits" and width == args.width and args.engine_steps > 0
        cases[dataset, examples, width] = Case(dataset, examples, pools[dataset], width, engine)
    return list(cases.values())


def seconds_per_grad_eval(result: dict[str, Any], unit: str) -> float | None:
    """A result's seconds per GE for one unit, or for ``"engine"`` its engine steps' (None if not run)."""
    if unit == "engine":
        return result["engine"]["seconds_per_grad_eval"] if "engine" in result else None
    return result["units"][unit]["seconds_per_grad_eval"]


def attach_speed_ups(results: list[dict[str, Any]]) -> None:
    """``speed_up`` on every result with more than one rank: its 1-rank twin's seconds per GE over its
    own, per unit (and for the engine steps)."""
    singles = {case_key(r): r for r in results if r["ranks"] == 1}
    for result in results:
        single = singles.get((result["dataset"], result["examples"], result["width"]))
        if result["ranks"] == 1 or single is None:
            continue
        result["speed_up"] = {}
        for unit in (*UNITS, "engine"):
            mine, theirs = seconds_per_grad_eval(result, unit), seconds_per_grad_eval(single, unit)
            if mine is not None and theirs is not None:
                result["speed_up"][unit] = theirs / mine


def log_slope(points: Sequence[tuple[float, float]]) -> float | None:
    """The least-squares slope of log y against log x; None with fewer than two distinct x."""
    if len({x for x, _ in points}) < 2:
        return None
    xs, ys = [math.log(x) for x, _ in points], [math.log(y) for _, y in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def fits(results: list[dict[str, Any]], width: int, width_data: tuple[str, int]) -> list[dict[str, Any]]:
    """The slopes of log(seconds per GE), per unit and number of ranks: against log(examples) over the
    data cases of each data set, against log(parameters) over the width cases."""
    rows = []
    for ranks in sorted({r["ranks"] for r in results}):
        chosen = [r for r in results if r["ranks"] == ranks]
        groups = [
            (f"{d} examples", "examples", [r for r in chosen if r["dataset"] == d and r["width"] == width])
            for d in DATASETS
        ]
        on_width_data = [r for r in chosen if (r["dataset"], r["examples"]) == width_data]
        groups.append((f"{width_data[0]} {width_data[1]}: parameters", "parameters", on_width_data))
        for label, against, cases in groups:
            row: dict[str, Any] = {"fit": label, "against": against, "ranks": ranks, "cases": len(cases)}
            for unit in (*UNITS, "engine"):
                points = [(r[against], seconds_per_grad_eval(r, unit)) for r in cases]
                row[unit] = log_slope([(x, y) for x, y in points if y is not None])
            if any(row[unit] is not None for unit in (*UNITS, "engine")):
                rows.append(row)
    return rows


def milliseconds(seconds: float) -> str:
    value = seconds * 1e3
    return f"{value:,.2f}" if value < 10 else f"{value:,.1f}" if value < 100 else f"{value:,.0f}"


def per_unit(result: dict[str, Any], value: Callable[[dict[str, Any]], str]) -> str:
    """``value`` of each unit of ``result``, joined with " / " in the order of UNITS."""
    return " / ".join(value(result["units"][unit]) for unit in UNITS)


def speed_ups(result: dict[str, Any], units: Sequence[str]) -> str:
    found = result.get("speed_up", {})
    return " / ".join(f"{found[u]:.2f}×" if u in found else "–" for u in units) if found else "–"


def unit_table(results: list[dict[str, Any]], columns: int) -> list[str]:
    """The markdown table of the unit costs, one row per case and number of ranks."""
    names = " / ".join(UNITS)
    lines = [
        f"| data | examples | width | parameters | ranks | gradient ms | HVP ×{columns} ms "
        f"| operator + HVP ×{columns} ms | CG iteration ms | ms/GE ({names}) "
        f"| all-reduce share ({names}) | speed-up ({names}) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        units = r["units"]
        lines.append(
            f"| {r['dataset']} | {r['examples']:,} | {r['width']} | {r['parameters']:,} | {r['ranks']} "
            f"| {milliseconds(units['gradient']['seconds'])} | {milliseconds(units['hvp']['seconds'])} "
            f"| {milliseconds(units['operator']['seconds'])} | {milliseconds(units['cg']['seconds_per_iteration'])} "
            f"| {per_unit(r, lambda u: milliseconds(u['seconds_per_grad_eval']))} "
            f"| {per_unit(r, lambda u: format(u['all_reduce_fraction'], '.0%'))} | {speed_ups(r, list(UNITS))} |"
        )
    return lines


def engine_table(results: list[dict[str, Any]]) -> list[str]:
    """The markdown table of the engine steps (empty when none were run)."""
    rows = [r for r in results if "engine" in r]
    if not rows:
        return []
    lines = [
        "| examples | ranks | steps | s/step | GE/step | ms/GE | all-reduce share | all-reduces/step | speed-up |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        e = r["engine"]
        lines.append(
            f"| {r['examples']:,} | {r['ranks']} | {e['steps']} | {e['seconds_per_step']:.2f} | "
            f"{e['grad_evals_per_step']:,.0f} | {milliseconds(e['seconds_per_grad_eval'])} | "
            f"{e['all_reduce_fraction']:.1%} | {e['all_reduces_per_step']:,.0f} | {speed_ups(r, ['engine'])} |"
        )
    return lines


def slope_table(rows: list[dict[str, Any]]) -> list[str]:
    """The markdown table of the fitted slopes of log(seconds per GE)."""
    units = (*UNITS, "engine")
    lines = [
        f"| slope of log(s/GE) against log of | ranks | cases | {' | '.join(UNITS.values())} | engine step |",
        "|---|---|---|" + "---|" * len(units),
    ]
    for row in rows:
        slopes = " | ".join("–" if row[u] is None else f"{row[u]:.2f}" for u in units)
        lines.append(f"| {row['fit']} | {row['ranks']} | {row['cases']} | {slopes} |")
    return lines


def data_set_pools(mnist_dir: str) -> dict[str, int]:
    """The training split size of each data set present; MNIST's absence is said in one line."""
    pools = {"digits": len(load_training_split("digits", mnist_dir))}
    try:
        pools["mnist"] = len(qs.load_dataset("mnist", data_dir=mnist_dir, seed=0).train)  # its warning shown once
    except InputError as error:
        print(f"MNIST cases skipped: {error}")
    return pools


def width_data(text: str) -> tuple[str, int]:
    """``name:examples`` (the width cases' training set) as (name, examples)."""
    name, _, examples = text.partition(":")
    if name not in DATASETS or not examples.isdigit():
        raise argparse.ArgumentTypeError(f"expected digits:N or mnist:N, got {text!r}")
    return name, int(examples)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--fractions", type=float, nargs="*", default=[0.25, 0.5, 1.0], help="of digits' train split")
    parser.add_argument("--mnist-examples", type=int, nargs="*", default=[2000, 4000, 8000])
    parser.add_argument("--mnist-dir", default=DEFAULT_MNIST_DIR, help="the MNIST IDX files (t10k alone will do)")
    parser.add_argument("--width", type=int, default=16, help="hidden width of the data cases")
    parser.add_argument("--widths", type=int, nargs="*", default=[16, 64, 256], help="hidden widths of the width cases")
    parser.add_argument(
        "--width-data", type=width_data, default=("mnist", 2000), help="name:examples of the width cases"
    )
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--epochs", type=int, default=2, help="Adam epochs before the unit costs")
    parser.add_argument("--reps", type=int, default=3, help="timed calls per unit cost (their median is reported)")
    parser.add_argument("--columns", type=int, default=3, help="k of the HVP block and the CG solve (the tangents')")
    parser.add_argument("--cg-iterations", type=int, default=2)
    parser.add_argument("--preconditioner", default="kfac", help="of the CG unit: none, kfac, dense, auto, ...")
    parser.add_argument("--engine-steps", type=int, default=3, help="engine steps per digits data case (0: none)")
    parser.add_argument("--start-epochs", type=int, default=60, help="Adam epochs before the engine start's polish")
    parser.add_argument("--out", default="benchmarks/results/scaling.json")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the cases already in --out (written after every case) and run the rest",
    )
    args = parser.parse_args()
    if min(args.ranks) < 1 or args.reps < 1 or args.columns < 1 or args.cg_iterations < 1 or args.epochs < 1:
        parser.error("--ranks, --reps, --columns, --cg-iterations and --epochs must be >= 1")
    return args


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = Settings(
        mnist_dir=args.mnist_dir,
        epochs=args.epochs,
        reps=args.reps,
        columns=args.columns,
        cg_iterations=args.cg_iterations,
        preconditioner=args.preconditioner,
        engine_steps=args.engine_steps,
        start_epochs=args.start_epochs,
        start_prefix=str(out.with_name(f"{out.stem}-start")),
    )
    kept = json.loads(out.read_text()) if args.resume and out.exists() else {}
    if not kept:
        remove_starts(out)
    env = kept.get("environment") or environment()
    cases = plan(args, data_set_pools(args.mnist_dir))
    started = time.perf_counter() - env.get("wall_s", 0.0)
    results = kept.get("cases", [])
    summary = {"environment": env, "settings": {**asdict(settings), "command": vars(args)}, "cases": results}
    for case in cases:
        for ranks in args.ranks:
            if any(case_key(r) == case_key(asdict(case)) and r["ranks"] == ranks for r in results):
                continue  # measured by the run resumed
            result = measure(case, ranks, settings, out.with_name(f"{out.stem}-{case.name}-{ranks}.json"))
            results.append(result)
            env.update(wall_s=time.perf_counter() - started)
            out.write_text(json.dumps(summary, indent=2, default=list) + "\n")  # nothing lost if a later case fails
            print(f"{case.name}, {ranks} rank(s): {result['wall_s']:.0f} s", flush=True)
    remove_starts(out)
    env.update(load_average_end=os.getloadavg(), wall_s=time.perf_counter() - started)
    attach_speed_ups(results)
    slopes = fits(results, args.width, args.width_data)
    out.write_text(json.dumps({**summary, "fits": slopes}, indent=2, default=list) + "\n")
    print(
        f"\nRun of {env['date'][:10]}, {env['cpu']}, torch {env['torch']}, 1 thread per rank, "
        f"{env['wall_s'] / 60:.1f} min\n"
    )
    print("\n".join(unit_table(results, args.columns)), end="\n\n")
    if engine := engine_table(results):
        print("\n".join(engine), end="\n\n")
    if slopes:
        print("\n".join(slope_table(slopes)))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
