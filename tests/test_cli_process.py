"""`quasistatic iso-classification` and `quasistatic process`: a run end to end on a small
well-posed data set, resume, the paper's baseline, and every bad input."""

import csv
import hashlib
from pathlib import Path

import pytest

from quasistatic.cli import main
from quasistatic.continuation.engine import first_law_residual
from quasistatic.experiments.trajectory import numeric
from small_problem import register_small_dataset

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

SMALL = register_small_dataset()

BASE = ["--dataset", SMALL, "--hidden", "", "--latent-dim", "1", "--samples", "2", "--sigma", "1e-2",
        "--lam", "1", "--gamma", "4", "--epochs", "30", "--batch-size", "4", "--no-progress",
        "--grad-tol", "1e-9", "--drift-tol", "1e-10", "--tangent-tol", "1e-12"]


def rows(path: Path) -> list[dict[str, float]]:
    """The numeric columns of the trajectory (an empty cell, as in a row that is not a jump, is left out)."""
    with (path / "trajectory.csv").open() as f:
        return [numeric(row) for row in csv.DictReader(f)]


def tree_hash(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def iso_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("iso") / "run"
    assert main(["iso-classification", *BASE, "--lam-end", "1.1", "--steps", "3", "--out", str(out)]) == 0
    return out


def test_iso_classification_run_writes_trajectory_and_plots(iso_run):
    recorded = rows(iso_run)
    assert [r["step"] for r in recorded] == [0, 1, 2, 3]
    assert recorded[-1]["lam"] == pytest.approx(1.1) and recorded[-1]["s"] == pytest.approx(1.0)
    c0 = recorded[0]["C"]
    assert max(abs(r["C"] - c0) for r in recorded) <= 1e-8 * c0
    assert recorded[-1]["grad_norm"] <= max(recorded[0]["grad_norm"], 1e-9)
    residual, delta_r = first_law_residual(recorded, 1e-2)
    assert residual <= 0.02 * delta_r
    evals = [r["grad_evals"] for r in recorded]
    assert evals == sorted(evals) and evals[-1] > evals[0]
    for name in ("config.json", "start.pt", "rate_distortion.png", "controls.png", "classification.png",
                 "free_energy.png"):
        assert (iso_run / name).stat().st_size > 0, name


def test_resume_after_an_interruption_gives_the_same_trajectory(iso_run, tmp_path):
    out = tmp_path / "run"
    args = ["iso-classification", *BASE, "--lam-end", "1.1", "--steps", "3", "--out", str(out)]
    from quasistatic.experiments import trajectory

    original = trajectory.TrajectoryRecorder.on_step
    calls = {"n": 0}

    def interrupt_after_two(self, report):
        original(self, report)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    trajectory.TrajectoryRecorder.on_step = interrupt_after_two
    try:
        with pytest.raises(KeyboardInterrupt):
            main(args)
    finally:
        trajectory.TrajectoryRecorder.on_step = original
    assert len(rows(out)) == 3
    assert main([*args, "--resume"]) == 0
    resumed, uninterrupted = rows(out), rows(iso_run)
    assert len(resumed) == len(uninterrupted)
    for a, b in zip(resumed, uninterrupted):
        for key in ("lam", "gamma", "R", "D", "C"):
            assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-12), key
    # the rows before the interruption are kept as written; after it, the resumed run also pays for
    # rebuilding its preconditioner (not saved in state.pt: 2n² floats), which is counted
    for a, b in zip(resumed[:3], uninterrupted[:3]):
        assert a["grad_evals"] == b["grad_evals"]
    assert resumed[-1]["precond_builds"] > uninterrupted[-1]["precond_builds"]
    assert resumed[-1]["grad_evals"] > uninterrupted[-1]["grad_evals"]


def test_fd_equilibration_baseline_runs_on_the_same_path(tmp_path):
    out = tmp_path / "fd"
    assert main(["iso-classification", *BASE, "--lam-end", "1.1", "--steps", "2", "--method", "fd-equilibration",
                 "--fd-epochs", "2", "--out", str(out)]) == 0
    recorded = rows(out)
    assert len(recorded) == 3 and recorded[-1]["lam"] == pytest.approx(1.1)
    assert recorded[-1]["grad_evals"] > recorded[0]["grad_evals"]


def test_generic_process_command_runs_iso_c_rate(tmp_path):
    out = tmp_path / "rate"
    assert main(["process", "--process", "iso-c-rate", "--beta", "2", "--lam-end", "1.1", "--steps", "2", *BASE,
                 "--out", str(out)]) == 0
    recorded = rows(out)
    kept = [r["C"] + r["R"] / 2 for r in recorded]
    assert max(abs(k - kept[0]) for k in kept) <= 1e-8 * abs(kept[0])


@pytest.mark.parametrize("extra, message", [
    (["--integrator", "rk5"], "integrator must be one of"),
    (["--corrector", "magic"], "corrector must be one of"),
    (["--method", "guess"], "method must be one of"),
    (["--steps", "0"], "--steps must be an integer >= 1, got 0"),
    (["--lam-end", "1"], "lam_end must be different from the starting lambda"),
    (["--lam", "-1"], "lambda must be a number >= 0"),
    (["--chunk-size", "0"], "chunk_size must be an integer >= 1 (or none: all examples at once), got 0"),
    (["--examples", "0"], "examples must be an integer >= 1 (or none: every example), got 0"),
])
def test_bad_input_exits_2_and_keeps_earlier_output(iso_run, capsys, extra, message):
    before = tree_hash(iso_run)
    args = ["iso-classification", *BASE, "--lam-end", "1.1", "--out", str(iso_run), "--overwrite", *extra]
    if "--lam-end" in extra:
        args.remove("1.1")
        args.remove("--lam-end")
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("quasistatic: error:") and message in err and "\n" not in err, err
    assert tree_hash(iso_run) == before


def test_unknown_process_and_checkpoint_controls(iso_run, tmp_path, capsys):
    assert main(["process", "--process", "iso-x", *BASE, "--out", str(tmp_path / "x")]) == 2
    assert "process must be one of" in capsys.readouterr().err
    assert main(["iso-classification", *BASE, "--lam-end", "1.1", "--lam", "2", "--lam-end", "2.5",
                 "--from-checkpoint", str(iso_run / "start.pt"), "--out", str(tmp_path / "y")]) == 2
    assert "must equal the checkpoint's controls (1, 4), got (2, 4)" in capsys.readouterr().err
    assert main(["process", "--process", "iso-classification-transfer", *BASE, "--out", str(tmp_path / "z")]) == 2
    assert "must run on a source/target mixture" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--alpha", "0.5", "--at-fold", "arclength"], "needs a process with a residual form"),
    (["--alpha", "0.5", "--return"], "--return must be given with --lam-end"),
])
def test_arclength_and_return_need_a_lam_end_path(tmp_path, capsys, extra, message):
    out = tmp_path / "x"
    assert main(["iso-classification", *BASE, "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("quasistatic: error:") and message in err and "\n" not in err, err
    assert not out.exists()


def test_log_gamma_arclength_needs_a_constraint_that_fixes_gamma(tmp_path, capsys):
    out = tmp_path / "x"
    assert main(["process", "--process", "free", "--param", "lam_rate=0.1", *BASE, "--at-fold", "arclength",
                 "--arclength", "s-log-gamma", "--out", str(out)]) == 2
    assert "--arclength s-log-gamma needs a process whose constraint fixes gamma" in capsys.readouterr().err
    assert not out.exists()


def test_return_sweep_comes_back_and_draws_the_loop(tmp_path, capsys):
    out = tmp_path / "loop"
    assert main(["iso-classification", *BASE, "--lam-end", "1.1", "--steps", "2", "--return", "--out", str(out)]) == 0
    forward, back = rows(out), rows(out / "return")
    assert forward[-1]["lam"] == pytest.approx(1.1) and back[0]["lam"] == pytest.approx(1.1)
    assert back[-1]["lam"] == pytest.approx(forward[0]["lam"])
    assert abs(back[-1]["C"] - forward[0]["C"]) <= 1e-4 * abs(forward[0]["C"])  # C held on the way back too
    assert (out / "hysteresis.png").stat().st_size > 0
    assert "dissipated free energy 0 in 0 jump(s)" in capsys.readouterr().out
