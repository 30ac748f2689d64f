"""How one engine step's cost grows with the training set and with the number of ranks (gloo).

Run (from the repository root; minutes per case on a free core, none of it asserted)::

    PYTHONPATH=. python benchmarks/bench_scaling.py [--fractions 0.25 0.5 1] [--ranks 1 2] [--steps 3] [--epochs 60] \
        [--out benchmarks/results/scaling.json]

Each case is a training-set size (the first ``fraction`` of the seeded digits training split) and a
number of ranks; every case runs in fresh processes started with ``torch.multiprocessing`` (one
thread each; the 1-rank case without a process group, the others over gloo on 127.0.0.1). A case
trains the CLI's default digits model (one hidden layer of 16, latent 8, σ = 3e-2, K = 1, float64)
with Adam at (λ, γ) = (1, 10) for ``--epochs`` epochs, polishes it to ‖∇θJ‖ ≤ 1e-6, then follows
iso-classification to λ = 1 + 0.05·steps in ``--steps`` steps (hermite predictor, newton corrector,
the run's default linear solve), and reports per accepted step: seconds, gradient-equivalents (GE:
passes over the whole training set, whatever the number of ranks), seconds per GE and the fraction
of the step's time spent in all-reduce (waiting for the slowest rank included). The start is not
timed. The JSON holds every case and the environment; the markdown table printed at the end, with
the slope of log(seconds per GE) against log(examples) fitted over the 1-rank cases, is the one for
benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import quasistatic as qs
from quasistatic.continuation.engine import EngineConfig, QuasiStaticEngine
from quasistatic.continuation.correctors import make_corrector
from quasistatic.continuation.polish import polish
from quasistatic.integrators import make_integrator
from quasistatic.linalg import LinearSolve
from quasistatic.processes import make_process

START = qs.Controls(1.0, 10.0)
SIGMA = 3e-2


def case(rank: int, ranks: int, port: int, fraction: float, steps: int, epochs: int, out: str) -> None:
    """One rank of one case; rank 0 writes its measurements to ``out``."""
    torch.set_num_threads(1)
    group = None
    if ranks > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=ranks, timeout=datetime.timedelta(seconds=120))
        group = qs.ShardGroup()
    split = qs.load_dataset("digits", seed=0)
    train = split.train.subset(torch.arange(max(ranks, round(fraction * len(split.train)))))
    config = qs.ModelConfig(hidden=(16,), input_shape=train.input_shape, num_classes=train.num_classes)
    model = qs.build_model(config, seed=0).to(torch.float64)
    objective = qs.Objective(model, train, samples=1, noise_seed=0, sigma=SIGMA, group=group)
    qs.equilibrate(objective, START, qs.EquilibrationConfig(epochs=epochs), seed=0, progress=False)
    linear_solve = LinearSolve(objective)
    start = polish(linear_solve, objective.initial_theta(), START, grad_tol=1e-6)
    process = make_process("iso-classification", START, lam_end=START.lam + 0.05 * steps)
    engine = QuasiStaticEngine(
        objective,
        process,
        make_integrator("hermite"),
        make_corrector("newton"),
        EngineConfig(steps=steps, grad_tol=1e-6, drift_tol=1e-4),
        linear_solve,
    )
    state = engine.start(start.theta, START)
    rows = []
    marks = [time.perf_counter(), objective.work.gradient_equivalents, group.stats.seconds if group else 0.0]

    def on_step(report: object) -> None:
        now, work, comm = time.perf_counter(), objective.work.gradient_equivalents, group.stats.seconds if group else 0
        rows.append({"seconds": now - marks[0], "grad_evals": work - marks[1], "all_reduce_s": comm - marks[2]})
        marks[:] = [now, work, comm]

    engine.run(state, on_step)
    if rank == 0:
        seconds = sum(r["seconds"] for r in rows)
        work = sum(r["grad_evals"] for r in rows)
        result = {
            "fraction": fraction,
            "examples": len(train),
            "ranks": ranks,
            "parameters": objective.layout.numel,
            "steps": len(rows),
            "seconds_per_step": seconds / len(rows),
            "grad_evals_per_step": work / len(rows),
            "seconds_per_grad_eval": seconds / work,
            "all_reduce_fraction": sum(r["all_reduce_s"] for r in rows) / seconds,
            "all_reduces": objective.work.all_reduces,
            "rows": rows,
        }
        Path(out).write_text(json.dumps(result))
    if group is not None:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment() -> dict:
    return {
        "torch": torch.__version__,
        "quasistatic": qs.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "threads_per_rank": 1,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--out", default="benchmarks/results/scaling.json")
    args = parser.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = environment()
    cases = []
    for fraction in args.fractions:
        for ranks in args.ranks:
            part = out.with_name(f"{out.stem}-{fraction:g}-{ranks}.json")
            started = time.perf_counter()
            mp.spawn(
                case,
                args=(ranks, free_port(), fraction, args.steps, args.epochs, str(part)),
                nprocs=ranks,
                join=True,
            )
            cases.append(json.loads(part.read_text()))
            part.unlink()
            print(f"fraction {fraction:g}, {ranks} rank(s): {time.perf_counter() - started:.0f} s with the start")
    env["load_average_end"] = os.getloadavg()
    singles = [c for c in cases if c["ranks"] == 1]
    slope = None
    if len(singles) >= 2:
        x = [math.log(c["examples"]) for c in singles]
        y = [math.log(c["seconds_per_grad_eval"]) for c in singles]
        mx, my = sum(x) / len(x), sum(y) / len(y)
        slope = sum((a - mx) * (b - my) for a, b in zip(x, y)) / sum((a - mx) ** 2 for a in x)
    out.write_text(json.dumps({"environment": env, "cases": cases, "slope_seconds_per_ge": slope}, indent=2) + "\n")
    print("| examples | ranks | s/step | GE/step | s/GE | all-reduce share | all-reduces (start included) |")
    print("|---|---|---|---|---|---|---|")
    for c in cases:
        print(
            f"| {c['examples']} | {c['ranks']} | {c['seconds_per_step']:.2f} | {c['grad_evals_per_step']:.0f} | "
            f"{c['seconds_per_grad_eval'] * 1e3:.2f} ms | {c['all_reduce_fraction']:.1%} | {c['all_reduces']} |"
        )
    if slope is not None:
        print(f"slope of log(s/GE) against log(examples), 1 rank: {slope:.2f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
