"""Every command runs unchanged under torchrun: ``equilibrate``, ``transfer`` (a process and a
baseline) and ``reproduce`` on two gloo ranks, each a process with the variables torchrun sets
(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK) that calls ``quasistatic.cli.main``, exit 0
and write what the same commands write in one process, into one output directory (the other rank
writes its copies into scratch directories); ``--resume`` goes on under torchrun with what one
process began; ``reproduce --jobs 2`` under torchrun exits 2 naming ``--jobs``.

All of it is one launch (the ranks run the commands in turn, ``--jobs 2`` last: the ranks exit
there), against the commands run in this process, on tiny float64 problems.
"""

import contextlib
import csv
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import quasistatic.experiments.checkpoint
import quasistatic.experiments.trajectory
from quasistatic.cli import main
from quasistatic.experiments.rundir import atomic_save
from small_problem import register_small_dataset
from test_cli_transfer import PAIR, PROCESS
from test_distributed import free_port

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend"),
]

WORLD = 2
SMALL = register_small_dataset()
# The source task of test_cli_transfer's pair (its classes 0-2), so that the equilibrated checkpoint,
# polished to 1e-10, is the transfers' start: both transfers start at one point of the surface.
EQUILIBRATE = ["equilibrate", "--dataset", PAIR, "--classes", "0-2", "--relabel", "--hidden", "", "--latent-dim", "1",
               "--samples", "2", "--sigma", "1e-2", "--lam", "1", "--gamma", "4", "--batch-size", "4",
               "--dtype", "float64", "--grad-tol", "1e-10", "--no-progress"]
EPOCHS = ["--epochs", "30"]
FROM = ["--epochs", "3", "--lam", "1.2"]  # with --from-checkpoint: the equilibration schedule η(s)
# rk4, no eigenvalue tracking, tangent solves to 1e-6: 5 steps instead of the default's 23
TRANSFER = ["transfer", *PROCESS, "--integrator", "rk4", "--eigen-iterations", "0", "--tangent-tol", "1e-6"]
FINETUNE = ["--method", "finetune", "--epochs", "3"]
REPRODUCE = ["reproduce", "fig2", "--dataset", SMALL, "--hidden", "", "--latent-dim", "1", "--samples", "2",
             "--sigma", "1e-2", "--epochs", "30", "--batch-size", "4", "--steps", "2", "--grad-tol", "1e-9",
             "--drift-tol", "1e-10", "--eigen-iterations", "0", "--lam", "1", "--lam-end", "1.05",
             "--param", "gammas=3,4", "--no-progress", "--chunk-size", "6"]
# --chunk-size 6: one process sums the training set's 12 examples in the 2 ranks' shards, so the
# figure's processes take the same decisions bit for bit (the validation set's 8, in chunks of 6 + 2
# against shards of 4 + 4, agrees to rounding: Objective's module docstring).


def _rank(rank: int, port: int, commands: list[list[str]], out: str) -> None:
    """One rank as torchrun starts it: its variables set, then ``main`` on each command in turn.
    After each, out/rank{rank}.pt holds the exit codes so far and the scratch directories the rank
    made (in out/scratch{rank}); its stdout and stderr go to out/rank{rank}.out and .err."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    scratch = Path(out) / f"scratch{rank}"
    scratch.mkdir()
    tempfile.tempdir = str(scratch)
    for stream, suffix in ((sys.stdout, "out"), (sys.stderr, "err")):
        os.dup2(os.open(Path(out) / f"rank{rank}.{suffix}", os.O_WRONLY | os.O_CREAT), stream.fileno())
    codes = []
    for argv in commands:
        codes.append(main(argv))
        torch.save({"codes": codes, "scratch": sorted(p.name for p in scratch.iterdir())}, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


@contextlib.contextmanager
def interrupted(checkpoint: Path, saves: int = 1) -> Iterator[None]:
    """Ctrl-C in the block once ``checkpoint`` (equilibrate's checkpoint.pt, a run's state.pt) has
    been written ``saves`` times: what an interrupted run leaves."""
    written = []

    def save(obj: object, path: Path) -> None:
        atomic_save(obj, path)
        written.append(path)
        if written.count(checkpoint) == saves:
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(quasistatic.experiments.checkpoint, "atomic_save", save)
        patch.setattr(quasistatic.experiments.trajectory, "atomic_save", save)
        with pytest.raises(KeyboardInterrupt):
            yield


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The commands in this process (``alone``) and, in ``ranks``, the same on two ranks: the runs
    that resume begun in this process (and their copies resumed here), then the one launch."""
    root = tmp_path_factory.mktemp("torchrun")
    alone, ranks, out = root / "alone", root / "ranks", root / "launch"
    for path in (alone, ranks, out):
        path.mkdir()
    start = ["--from-checkpoint", str(alone / "eq" / "checkpoint.pt")]
    begun = time.perf_counter()
    assert main([*EQUILIBRATE, *EPOCHS, "--out", str(alone / "eq")]) == 0
    assert main([*EQUILIBRATE, *FROM, *start, "--out", str(alone / "eq-from")]) == 0
    assert main([*TRANSFER, "--method", "iso-c", *start, "--out", str(alone / "transfer")]) == 0
    assert main([*TRANSFER, *FINETUNE, *start, "--out", str(alone / "transfer")]) == 0
    with interrupted(ranks / "eq-resumed" / "checkpoint.pt", 2):  # 2 of 30 epochs
        main([*EQUILIBRATE, *EPOCHS, "--out", str(ranks / "eq-resumed")])
    with interrupted(ranks / "transfer-resumed" / "finetune" / "state.pt", 2):  # 2 of 3 epochs
        main([*TRANSFER, *FINETUNE, *start, "--out", str(ranks / "transfer-resumed")])
    # A figure with one run done, the other begun: its start trained and polished (row 0), its
    # process left. (A start the ranks train would differ: run_process trains it with Adam in
    # float32, where the order of the sums shows at 1e-7, and the polish's L-BFGS then takes
    # another path to the surface.) Resumed here too: a resumed run builds its preconditioner again.
    with interrupted(ranks / "fig2" / "gamma4" / "state.pt"):
        main([*REPRODUCE, "--out", str(ranks / "fig2")])
    shutil.copytree(ranks / "fig2", alone / "fig2")
    assert main([*REPRODUCE, "--resume", "--out", str(alone / "fig2")]) == 0
    commands = [
        [*EQUILIBRATE, *EPOCHS, "--out", str(ranks / "eq")],
        [*EQUILIBRATE, *FROM, *start, "--out", str(ranks / "eq-from")],
        [*EQUILIBRATE, *EPOCHS, "--resume", "--out", str(ranks / "eq-resumed")],
        [*TRANSFER, "--method", "iso-c", *start, "--out", str(ranks / "transfer")],
        [*TRANSFER, *FINETUNE, *start, "--out", str(ranks / "transfer")],
        [*TRANSFER, *FINETUNE, *start, "--resume", "--out", str(ranks / "transfer-resumed")],
        [*REPRODUCE, "--resume", "--out", str(ranks / "fig2")],
        [*REPRODUCE, "--jobs", "2", "--out", str(ranks / "fig2-jobs")],
    ]
    started = time.perf_counter()
    with pytest.raises(mp.ProcessExitedException) as stopped:  # by the last command
        mp.spawn(_rank, args=(free_port(), commands, str(out)), nprocs=WORLD, join=True)
    print(f"alone: {started - begun:.1f} s, the launch: {time.perf_counter() - started:.1f} s")
    return {"alone": alone, "ranks": ranks, "count": len(commands), "exit_code": stopped.value.exit_code,
            "saved": [torch.load(out / f"rank{r}.pt") for r in range(WORLD)],
            "stdout": [(out / f"rank{r}.out").read_text() for r in range(WORLD)],
            "stderr": [(out / f"rank{r}.err").read_text() for r in range(WORLD)]}


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


# Relative differences, 2 ranks against 1. Measured (printed by the tests): after Adam in float64
# the order of the sums shows at 1e-15 (metrics.csv 1.3e-15, finetune's rows 6e-16), the polished
# models' values at 8e-12, the figure's rows at 3.5e-12 (its results.json 1.6e-13); a process's
# corrector returns θ to the surface to --grad-tol only, within which a Krylov solve that takes an
# iteration more or less moves it (the transfer's, --grad-tol 1e-7: 1.3e-8).
TOLERANCE = 1e-8
PROCESS_TOLERANCE = 1e-7
# Where the order of the sums shows beyond rounding: the solvers' discrete decisions and the
# residuals at converged points, checked on their own. The polish's L-BFGS decides at the rounding
# of J near the surface (measured: 101 against 108 iterations, 154 against 229 gradient-equivalents,
# to the same point to 1e-11), and |grad J| at a converged point (1e-11) is rounding: both below
# --grad-tol. A Krylov solve whose residual meets its tolerance within rounding takes an iteration
# more or less (measured: 1 of 134 in a row), and the gradient-equivalents follow; a Newton
# correction whose ‖∇θJ‖ lands at --grad-tol within rounding takes an iteration more or less
# (measured on a CPU of another model: 2 against 3 in one row of the transfer).
POLISH = ("iterations", "gradient_equivalents", "grad_norm")  # polish.json
SOLVES = ("cg_iters", "grad_evals", "grad_norm", "corrector_iters")  # a process's rows


def worst(expected: object, got: object, skip: tuple[str, ...], where: str = "") -> tuple[float, str]:
    """The largest relative difference between the numbers of two results (nested dicts and lists
    of numbers, numbers written as text, other text) and where it is; other values must be equal.
    Time (``wall_s``), paths (``directory``) and the keys ``skip`` are left out."""
    if isinstance(expected, dict) and isinstance(got, dict):
        assert expected.keys() == got.keys(), where
        return max((worst(expected[k], got[k], skip, f"{where}/{k}") for k in expected
                    if k not in ("wall_s", "directory", *skip)), default=(0.0, where))
    if isinstance(expected, list) and isinstance(got, list):
        assert len(expected) == len(got), where
        return max((worst(a, b, skip, f"{where}[{i}]") for i, (a, b) in enumerate(zip(expected, got))),
                   default=(0.0, where))
    try:
        x, y = float(expected), float(got)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        assert expected == got, where
        return 0.0, where
    if x == y or (math.isnan(x) and math.isnan(y)):
        return 0.0, where
    return abs(x - y) / max(abs(x), 1e-300), f"{where}: {x!r} vs {y!r}"


def assert_close(expected: object, got: object, skip: tuple[str, ...] = (), tolerance: float = TOLERANCE) -> float:
    """The results agree to ``tolerance`` (relative) but for ``skip``; their largest difference."""
    difference, where = worst(expected, got, skip)
    assert difference <= tolerance, where
    return difference


def assert_solves_close(expected: list[dict[str, str]], got: list[dict[str, str]], grad_tol: float) -> None:
    """The columns :data:`SOLVES` of a process's rows: the Newton iterations within one, the Krylov
    iterations within 5 % (at least 3) a row (a row holds several solves: the tangent's columns, each
    Newton iteration's) and, where one run took a Newton iteration more, that run's count may be
    higher by that iteration's solve as well, at most the row's Krylov iterations over its Newton
    iterations (measured: 132 against 125 Krylov iterations for 3 against 2 Newton iterations, the
    second landing at 9.9e-8 under --grad-tol 1e-7), the gradient-equivalents within 5 %, |grad J|
    below ``grad_tol`` at every accepted step."""
    for a, b in zip(expected, got):
        x, y = int(a["cg_iters"]), int(b["cg_iters"])
        newton = (int(a["corrector_iters"]), int(b["corrector_iters"]))
        assert abs(newton[0] - newton[1]) <= 1, newton
        margin = max(3, 0.05 * x)
        extra = max(x, y) / max(newton) if newton[0] != newton[1] else 0  # the solve of the one more iteration
        more = y - x if newton[1] > newton[0] else x - y  # signed towards the run with more Newton iterations
        assert -margin <= (more if extra else abs(x - y)) <= margin + extra, (x, y, newton)
        assert float(b["grad_evals"]) == pytest.approx(float(a["grad_evals"]), rel=0.05)
        assert float(a["grad_norm"]) <= grad_tol and float(b["grad_norm"]) <= grad_tol


def test_every_command_exits_0_and_jobs_2_exits_2_naming_it(runs):
    for rank, saved in enumerate(runs["saved"]):
        assert saved["codes"] == [0] * (runs["count"] - 1), runs["stderr"][rank]
    assert runs["exit_code"] == 2
    message = "--jobs must be 1 under torchrun (--jobs 1 runs the figure's runs one after the other"
    assert any(f"error: rank {r}: {message}" in err and err.rstrip().endswith("got 2")
               for r, err in enumerate(runs["stderr"])), runs["stderr"]
    assert not (runs["ranks"] / "fig2-jobs").exists()


def test_only_rank_0_writes_and_prints(runs):
    alone, ranks = runs["alone"], runs["ranks"]
    for name in ("eq", "eq-from", "eq-resumed", "transfer", "transfer/iso-c", "transfer/finetune", "fig2",
                 "fig2/gamma4"):
        against = alone / ("eq" if name == "eq-resumed" else name)
        assert sorted(p.name for p in (ranks / name).iterdir()) == sorted(p.name for p in against.iterdir())
    # rank 1's copies: one per run directory (3 equilibrate, 3 transfer, 2 figure runs), none of rank 0
    rank0, rank1 = (saved["scratch"] for saved in runs["saved"])
    assert rank0 == [] and len(rank1) == 8 and all(name.startswith("quasistatic-rank1-") for name in rank1)
    printed = runs["stdout"][0]
    assert printed.count("polished (float64, full batch)") == 3 and "iso-c (rk4/newton)" in printed
    assert printed.count("finetune: first-epoch") == 2 and f"wrote {ranks / 'fig2' / 'fig2.png'}" in printed
    assert runs["stdout"][1] == ""
    assert [line for line in runs["stderr"][1].splitlines() if "quasistatic" in line and "--jobs" not in line] == []


def test_equilibrate_runs_data_parallel(runs):
    alone, ranks = runs["alone"], runs["ranks"]
    for name, against in (("eq", "eq"), ("eq-from", "eq-from"), ("eq-resumed", "eq")):
        adam = assert_close(rows(alone / against / "metrics.csv"), rows(ranks / name / "metrics.csv"))
        expected, got = (json.loads((path / "polish.json").read_text()) for path in (alone / against, ranks / name))
        polished = assert_close(expected, got, POLISH)
        assert expected["grad_norm"] <= 1e-10 and got["grad_norm"] <= 1e-10
        print(f"{name}: metrics.csv {adam:.1e}, polish.json {polished:.1e} (polish iterations "
              f"{expected['iterations']} -> {got['iterations']})")


def test_transfer_runs_data_parallel(runs):
    alone, ranks = runs["alone"], runs["ranks"]
    expected, got = (rows(path / "transfer" / "iso-c" / "trajectory.csv") for path in (alone, ranks))
    process = assert_close(expected, got, SOLVES, PROCESS_TOLERANCE)
    assert_solves_close(expected, got, 1e-7)
    baselines = [assert_close(rows(alone / "transfer" / "finetune" / "trajectory.csv"),
                              rows(ranks / name / "finetune" / "trajectory.csv"))
                 for name in ("transfer", "transfer-resumed")]
    assert (ranks / "transfer" / "transfer.png").exists() and (ranks / "transfer-resumed" / "transfer.png").exists()
    print(f"iso-c's trajectory.csv {process:.1e}, finetune's {baselines[0]:.1e}, resumed {baselines[1]:.1e}")


def test_reproduce_runs_the_figure_run_by_run_data_parallel(runs):
    alone, ranks = runs["alone"], runs["ranks"]
    expected, got = (json.loads((path / "fig2" / "results.json").read_text()) for path in (alone, ranks))
    assert got["machine"]["ranks"] == 2 and got["machine"]["jobs"] == 1
    assert "2 torchrun ranks" in (ranks / "fig2" / "results.md").read_text()
    for gamma in ("gamma3", "gamma4"):
        trajectories = [rows(path / "fig2" / gamma / "trajectory.csv") for path in (alone, ranks)]
        difference = assert_close(*trajectories, ("grad_norm",))
        assert [[a[k] for k in SOLVES] for a in trajectories[0]] == [[b[k] for k in SOLVES] for b in trajectories[1]]
        print(f"{gamma}'s trajectory.csv {difference:.1e}")
    # The figure's numbers are its trajectories'. Its residuals (the drift of C, the first law) are
    # differences of the rows' values, at their rounding: compared in absolute terms (measured: 2.6e-12).
    residuals = ("max_drift", "first_law", "first_law_total")
    results = assert_close(expected["runs"], got["runs"], ("grad_evals", "grad_norm_end", *residuals))
    for a, b in zip(expected["runs"], got["runs"]):
        for key in residuals:
            assert b["numbers"][key] == pytest.approx(a["numbers"][key], abs=1e-10, nan_ok=True), key
    print(f"results.json {results:.1e}")
