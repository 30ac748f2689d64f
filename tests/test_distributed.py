"""Data parallelism (quasistatic.distributed): two CPU ranks (torch.multiprocessing spawn, gloo) on a
small problem in float64 give the single-process objective's values, gradients and curvature
products to 1e-12 with one all-reduce per product, the single-process trajectory of an
iso-classification run with the newton corrector to 1e-10, and a rank that fails stops both."""

import csv
import datetime
import math
import os
import socket
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import quasistatic as qs
from quasistatic.continuation.tangents import surface_gradients
from quasistatic.distributed import ShardGroup
from quasistatic.experiments.runner import split_objectives
from quasistatic.linalg import LinearSolve
from quasistatic.linalg.operators import dense_hessian
from quasistatic.linalg.kfac import kronecker_blocks
from small_problem import small_labeled

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend"),
]

WORLD = 2
EVEN = "small-test-set-12-12"  # 12 training and 12 validation examples: each of 2 ranks holds 6 of each


def _even_split(data_dir=None, *, download=False, seed=0, val_fraction=0.2):
    train, val = small_labeled(12, 1), small_labeled(12, 2)
    return qs.DataSplit(train.to(dtype=torch.float32), val.to(dtype=torch.float32), EVEN)


if EVEN not in qs.available_datasets():
    qs.register_dataset(EVEN, _even_split)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, task: str, out: str) -> None:
    """One rank: join the gloo group, run ``task`` with it, save what it returns in out/rank{rank}.pt."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).parent))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=30))
    result = TASKS[task](ShardGroup(), Path(out))
    torch.save(result, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def launch(task: str, out: Path) -> list:
    """Run ``task`` on WORLD ranks; what each returned."""
    mp.spawn(_rank, args=(free_port(), task, str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


# ---- (a), (b): the objective's products -----------------------------------------------------------


def problem(group: ShardGroup | None, chunk_size: int | None = None
            ) -> tuple[qs.Objective, qs.Objective, torch.Tensor, qs.Controls]:
    """A tiny model at a seeded θ, J on 40 examples (and on a 40 + 30 mixture), float64, σ > 0,
    evaluated ``chunk_size`` examples at a time."""
    model = qs.build_model(qs.ModelConfig(hidden=(4,), latent_dim=2, input_shape=(1, 2, 3), num_classes=3), seed=0)
    model = model.to(torch.float64)
    data = small_labeled(40, 3)
    single = qs.Objective(model, data, samples=2, noise_seed=5, sigma=0.02, group=group, chunk_size=chunk_size)
    mixture = qs.Objective(model, qs.DataMixture(data, small_labeled(30, 4, shift=0.5)), samples=2, sigma=0.02,
                           group=group, chunk_size=chunk_size)
    theta = single.initial_theta() + 0.3 * torch.randn(single.layout.numel, generator=torch.Generator().manual_seed(1),
                                                       dtype=torch.float64)
    return single, mixture, theta, qs.Controls(1.3, 4.0, 0.4)


def minibatch(objective: qs.Objective, controls: qs.Controls) -> torch.Tensor:
    """Adam's minibatch loss and its gradient in the model's parameters (the model at its own θ)."""
    index = objective.epoch_batches(8, torch.Generator().manual_seed(3))[1]
    loss = objective.minibatch_value(index, controls)
    gradients = torch.autograd.grad(loss, list(objective.model.parameters()))
    return torch.cat([loss.detach().reshape(1), *(g.reshape(-1) for g in gradients)])


def products(group: ShardGroup | None, out: Path | None = None, chunk_size: int | None = None) -> dict:
    """Every reduced quantity of the objective at the problem's θ, and the all-reduces each took."""
    single, mixture, theta, controls = problem(group, chunk_size)
    block = torch.randn(theta.numel(), 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    calls = []
    if group is not None:  # count the collectives themselves, not only the library's own count
        real = dist.all_reduce

        def counting(tensor, *args, **kwargs):
            calls.append(tuple(tensor.shape))
            return real(tensor, *args, **kwargs)

        dist.all_reduce = counting
    found, reduces, subsamples = {}, {}, []

    def take(name, compute):
        before = len(calls)
        found[name] = compute()
        reduces[name] = len(calls) - before

    for label, objective in (("single", single), ("mixture", mixture)):
        take(f"{label} functionals", lambda o=objective: o.functionals(theta, controls.t))
        take(f"{label} value", lambda o=objective: o.value(theta, controls))
        take(f"{label} gradient", lambda o=objective: o.gradient(theta, controls))
        take(f"{label} value_and_gradient", lambda o=objective: torch.cat(
            [v.reshape(-1) for v in o.value_and_gradient(theta, controls)]))
        take(f"{label} combination_gradients", lambda o=objective: torch.cat([v.reshape(-1) for v in
             o.combination_gradients(theta, torch.eye(3, dtype=theta.dtype), controls.t,
                                     torch.tensor([True, False, True]))]))
        take(f"{label} surface_gradients", lambda o=objective: torch.cat(
            [v.reshape(-1) for v in surface_gradients(o, theta, controls.t)]))
        take(f"{label} accuracy", lambda o=objective: torch.tensor(o.accuracy(theta, controls.t)))
        for kind in ("hessian", "ggn"):
            for mode in ("reverse", "forward"):
                operator = qs.CurvatureOperator(objective, theta, controls, kind=kind, mode=mode, damping=0.1)
                take(f"{label} {kind} {mode} block", lambda op=operator: op(block))
                take(f"{label} {kind} {mode} again", lambda op=operator: op(block[:, 0]))
        take(f"{label} dense hessian", lambda o=objective: dense_hessian(o, theta, controls))
        take(f"{label} minibatch", lambda o=objective: minibatch(o, controls))
        sub = objective.subsample(0.3, seed=4)  # with its own work counter
        take(f"{label} subsample", lambda o=sub: o.functionals(theta, controls.t))
        take(f"{label} subsample gradient", lambda o=sub: o.gradient(theta, controls))
        take(f"{label} subsample hessian", lambda o=sub: qs.CurvatureOperator(o, theta, controls)(block))
        take(f"{label} subsample kfac", lambda o=sub: torch.cat([torch.cat([b.A.reshape(-1), b.G.reshape(-1)])
             for b in kronecker_blocks(o, theta, controls, samples=3)]))
        tiny = objective.subsample(0.02, seed=4)  # one example a part: a rank holds none of it
        for kind in ("hessian", "ggn"):
            for mode in ("reverse", "forward"):
                take(f"{label} one-example {kind} {mode}",
                     lambda o=tiny, k=kind, m=mode: qs.CurvatureOperator(o, theta, controls, kind=k, mode=m)(block))
        take(f"{label} one-example value_and_gradient", lambda o=tiny: torch.cat(
            [v.reshape(-1) for v in o.value_and_gradient(theta, controls)]))
        take(f"{label} one-example dense hessian", lambda o=tiny: dense_hessian(o, theta, controls))
        take(f"{label} one-example kfac", lambda o=tiny: torch.cat([torch.cat([b.A.reshape(-1), b.G.reshape(-1)])
             for b in kronecker_blocks(o, theta, controls, samples=3)]))
        subsamples.extend([sub, tiny])
        take(f"{label} kfac", lambda o=objective: torch.cat([torch.cat([b.A.reshape(-1), b.G.reshape(-1)])
             for b in kronecker_blocks(o, theta, controls)]))
    if group is not None:  # bad input: more ranks than examples, ranks that disagree on a setting
        for check in (lambda: group.shard(1), lambda: group.agree("the seed", group.rank)):
            with pytest.raises(qs.InputError) as error:
                check()
            found.setdefault("errors", []).append(str(error.value))
    found["counted all-reduces"] = torch.tensor(float(sum(o.work.all_reduces for o in (single, mixture, *subsamples))))
    return {"values": found, "reduces": reduces, "calls": len(calls)}


def test_two_ranks_give_the_single_process_products_with_one_all_reduce_each(tmp_path):
    started = time.perf_counter()
    ranks = launch("products", tmp_path)
    elapsed = time.perf_counter() - started
    alone = products(None)["values"]
    assert ranks[1]["values"].pop("errors") == [
        "the number of ranks must be at most the number of examples (1), got 2 ranks",
        "the seed must be the same on every rank, got [0, 1]"]
    ranks[0]["values"].pop("errors")
    worst = {}
    for rank in ranks:
        for name, expected in alone.items():
            if name == "counted all-reduces":
                continue
            got = rank["values"][name]
            error = float((got - expected).abs().max() / max(1.0, float(expected.abs().max())))
            worst[name] = max(worst.get(name, 0.0), error)
    print(f"2 ranks in {elapsed:.1f} s; max relative difference {max(worst.values()):.2e}; "
          + ", ".join(f"{k}: {v:.1e}" for k, v in worst.items()))
    assert {k: v for k, v in worst.items() if not v <= 1e-12} == {}
    assert torch.equal(ranks[0]["values"]["single gradient"], ranks[1]["values"]["single gradient"])
    # One process evaluating the 40 examples in the ranks' two shards of 20 sums in the ranks' order:
    # the single data set's products are then equal bit for bit, on its subsample too (chunked like
    # its parent) and K-FAC's random draws with them (not Adam's minibatch, which reduces its own way,
    # nor the mixture, whose chunks are added part by part alone, position by position on the ranks).
    chunked = products(None, chunk_size=20)["values"]
    exact = [name for name in chunked if name.startswith("single") and name != "single minibatch"]
    assert len(exact) == 28 and [n for n in exact if not torch.equal(chunked[n], ranks[0]["values"][n])] == []
    reduces = ranks[0]["reduces"]
    print("all-reduces:", reduces)
    for label in ("single", "mixture"):
        for kind in ("hessian", "ggn"):
            for mode in ("reverse", "forward"):
                assert reduces[f"{label} {kind} {mode} block"] == 1  # three columns, one all-reduce
                assert reduces[f"{label} {kind} {mode} again"] == 1
        for name in ("functionals", "value", "gradient", "value_and_gradient", "combination_gradients",
                     "accuracy", "dense hessian", "subsample", "subsample gradient", "subsample hessian"):
            assert reduces[f"{label} {name}"] == 1, name
        assert reduces[f"{label} minibatch"] == (2 if label == "single" else 3)  # each part's value, the gradient
        assert reduces[f"{label} surface_gradients"] == 3  # jacrev's values and rows, and the values again
        assert reduces[f"{label} kfac"] == (2 if label == "single" else 3)  # Ā per part, then G
    # the library's count (Objective.work.all_reduces) is the number of collectives made
    assert int(ranks[0]["values"]["counted all-reduces"]) == ranks[0]["calls"]


# ---- (c): a whole run --------------------------------------------------------------------------------


SHARD = 6  # each split's 12 examples over 2 ranks


def small_run_config(out: Path, checkpoint: Path | None = None, chunk_size: int | None = SHARD) -> qs.RunConfig:
    """tests/test_runner.py's fast iso-classification run (newton corrector) on 12 + 12 examples,
    evaluated ``chunk_size`` examples at a time, from a fresh model or from ``checkpoint``."""
    return qs.RunConfig(
        out=str(out),
        data=qs.DataConfig(dataset=EVEN),
        model=qs.ModelConfig(hidden=(), latent_dim=1, input_shape=(1, 2, 3), num_classes=3),
        start=qs.StartConfig(lam=1.0, gamma=4.0, checkpoint=None if checkpoint is None else str(checkpoint),
                             equilibration=qs.EquilibrationConfig(epochs=30, batch_size=4)),
        process=qs.ProcessConfig("iso-classification", {"lam_end": 1.1}),
        follow=qs.FollowConfig(corrector="newton",
                               engine=qs.EngineConfig(steps=3, grad_tol=1e-9, drift_tol=1e-10, tangent_tol=1e-10)),
        samples=2, sigma=1e-2, chunk_size=chunk_size)


def trajectory(directory: Path) -> list[dict[str, str]]:
    with (directory / "trajectory.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def run(group: ShardGroup, out: Path) -> dict:
    started = time.perf_counter()
    result = qs.run_process(small_run_config(out / "run", out / "polished.pt"), progress=False, group=group)
    resumed = qs.run_process(small_run_config(out / "run", out / "polished.pt"), resume=True, progress=False,
                             group=group)  # at s = 1 already: nothing to add, every rank reads the state back
    assert resumed.error is None and len(resumed.trajectory) == len(result.trajectory)
    return {"error": result.error, "directory": str(result.directory), "seconds": time.perf_counter() - started,
            "all_reduces": group.stats.calls, "all_reduce_s": group.stats.seconds}


def polished_start(directory: Path) -> Path:
    """A checkpoint at the start's controls polished to |grad J| <= 1e-12, from the model a fresh
    run trained with Adam: both runs compared start from it.

    A fresh start would not do: Adam trains it in float32, where the order of the sums over the
    ranks shows at 1e-7, and the polish's L-BFGS runs until its line search stalls, a decision taken
    at the rounding of J, so that its iteration count (grad_evals) and the point it stops at
    (grad_norm) differ with the summation order."""
    config = small_run_config(directory / "fresh")
    qs.run_process(replace(config, process=qs.ProcessConfig("iso-classification", {"lam_end": 1.01})), progress=False)
    model = qs.load_checkpoint(directory / "fresh" / "start.pt").model("cpu", torch.float64)
    train, _ = split_objectives(model, config.data.load(config.seed), samples=config.samples, sigma=config.sigma,
                                seed=config.seed)
    controls = config.start.controls
    result = qs.polish(LinearSolve(train, config.follow.linear_solve), train.initial_theta(), controls, grad_tol=1e-12)
    assert result.converged
    train.layout.write(model, result.theta)
    qs.save_checkpoint(directory / "polished.pt", model, controls, {"dataset": EVEN, "classes": None})
    return directory / "polished.pt"


def differences(expected: list[dict[str, str]], got: list[dict[str, str]]) -> dict[str, float]:
    """Per column (wall time aside), the largest relative difference between two trajectories."""
    assert len(got) == len(expected) and all(a.keys() == b.keys() for a, b in zip(expected, got))
    worst: dict[str, float] = {}
    for a, b in zip(expected, got):
        for key in a:
            if key != "wall_s" and a[key] != b[key]:
                x, y = float(a[key]), float(b[key])
                worst[key] = max(worst.get(key, 0.0), abs(x - y) / max(abs(x), 1e-300))
    return worst


def test_two_ranks_follow_the_single_process_trajectory(tmp_path):
    """The acceptance run: one process evaluating the training data in the ranks' two shards
    (``chunk_size`` 6) writes the 2-rank trajectory bit for bit, every column but wall time; in one
    chunk (the default) the sums' order differs, and with it the last digits (measured below)."""
    start = polished_start(tmp_path)
    alone = qs.run_process(small_run_config(tmp_path / "alone", start), progress=False)
    one_chunk = qs.run_process(small_run_config(tmp_path / "one-chunk", start, chunk_size=None), progress=False)
    ranks = launch("run", tmp_path)
    assert alone.error is None and one_chunk.error is None and ranks[0]["error"] is None and ranks[1]["error"] is None
    assert ranks[0]["directory"] == str(tmp_path / "run")  # rank 0 wrote the run
    assert not Path(ranks[1]["directory"]).exists()  # rank 1's scratch copy is gone
    got = trajectory(tmp_path / "run")
    assert len(got) == 4 and all(float(row["grad_norm"]) <= alone.config.follow.engine.grad_tol for row in got)
    exact = differences(trajectory(tmp_path / "alone"), got)
    rounding = differences(trajectory(tmp_path / "one-chunk"), got)
    print(f"2 ranks: {ranks[0]['seconds']:.1f} s with {ranks[0]['all_reduces']} all-reduces "
          f"({ranks[0]['all_reduce_s']:.2f} s in them); against one process in the ranks' chunks: {exact}; "
          f"in one chunk: {rounding}")
    assert exact == {}
    # In one chunk the state agrees to rounding, not the columns of a solver's discrete decisions or
    # residuals (SOLVER_COLUMNS).
    assert {k: v for k, v in rounding.items() if k not in SOLVER_COLUMNS and v > 1e-10} == {}


# Columns that read a solver's discrete decisions or its residual, not the state: where a Krylov
# solve's residual meets its tolerance within rounding, another summation order takes one more or
# one less iteration (measured: 2 of ~110 in one row), which moves θ by a fraction of the solve's
# tolerance (R by 4e-12 relative) and the tracked smallest eigenvalue by ~1e-10; ‖∇θJ‖ at a converged
# point (1e-13 .. 2e-10) is a residual whose last digits are rounding. The work counted (grad_evals)
# follows the iteration counts (on another CPU of the same kind: 1.7–1.9 % in one chunk).
SOLVER_COLUMNS = ("grad_norm", "cg_iters", "lambda_min", "grad_evals")


# ---- (d): a failing rank ---------------------------------------------------------------------------


def failing(group: ShardGroup, out: Path) -> None:
    """Rank 1 raises during the run (a NaN in its shard's gradient), rank 0 goes on into the run's
    collectives: through the command line's handler both must end."""
    from quasistatic.cli import _report_failure
    from quasistatic.distributed import abort_on_failure

    if group.rank == 1:
        real = qs.Objective.gradient

        def poisoned(self, theta, controls):
            raise FloatingPointError("rank 1's shard gave a NaN gradient")

        qs.Objective.gradient = poisoned
        assert real is not None
    with abort_on_failure(group, _report_failure(group)):
        qs.run_process(small_run_config(out / "run"), progress=False, group=group)


def test_a_failing_rank_stops_every_rank_with_its_message(tmp_path, capfd):
    started = time.perf_counter()
    with pytest.raises(mp.ProcessExitedException) as failure:
        launch("failing", tmp_path)
    elapsed = time.perf_counter() - started
    captured = capfd.readouterr()
    print(f"stopped after {elapsed:.1f} s, exit code {failure.value.exit_code} of rank {failure.value.error_index}")
    assert failure.value.exit_code != 0
    assert "rank 1: FloatingPointError(\"rank 1's shard gave a NaN gradient\")" in captured.err
    assert elapsed < 30


TASKS = {"products": products, "run": run, "failing": failing}
