"""Tests of ``quasistatic equilibrate``: the files of a run, resume, --from-checkpoint, divergence,
and bad input (one-line error, exit code 2, earlier output untouched)."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import quasistatic
import quasistatic.cli.equilibrate_command as cli
from quasistatic import (Controls, EquilibrationConfig, ModelConfig, Objective, build_model, equilibration_rate,
                         load_checkpoint, load_dataset, save_checkpoint)
from quasistatic.cli import main
from quasistatic.data.idx import IMAGES_MAGIC, LABELS_MAGIC
from small_problem import register_small_dataset

MNIST_T10K = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist-t10k"
COLUMNS = ["epoch", "lam", "gamma", "R", "D", "C", "F", "val_C", "val_acc", "grad_norm", "wall_s", "S"]
FAST = ["--hidden", "16,16", "--no-progress", "--batch-size", "128", "--no-polish"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def equilibrate_cli(out: Path, *args: str) -> int:
    return main(["equilibrate", "--out", str(out), *args])


def read_rows(out: Path) -> list[dict[str, str]]:
    with (out / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def without_wall(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in row.items() if k != "wall_s"} for row in rows]


def hashes(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` (relative path -> digest)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted 4-epoch run (never modified by the tests: copy it first)."""
    out = tmp_path_factory.mktemp("reference") / "eq"
    assert equilibrate_cli(out, "--epochs", "4", "--lam", "0.5", "--gamma", "5", "--seed", "3", *FAST) == 0
    return out


@pytest.fixture()
def old_run(reference, tmp_path) -> Path:
    """A private copy of the reference run, as earlier output that must survive bad input."""
    return Path(shutil.copytree(reference, tmp_path / "old"))


REFERENCE_ARGS = ["--epochs", "4", "--lam", "0.5", "--gamma", "5", "--seed", "3", *FAST]


# ---------------------------------------------------------------- a run's files

def test_run_writes_config_metrics_checkpoint_and_curves(reference, capsys):
    config = json.loads((reference / "config.json").read_text())
    settings = config["settings"]
    assert settings["dataset"] == "digits" and settings["model"] == "mlp" and settings["hidden"] == "16,16"
    assert (settings["lam"], settings["gamma"], settings["seed"], settings["epochs"]) == (0.5, 5.0, 3, 4)
    assert settings["samples"] == 1 and settings["batch_size"] == 128 and settings["device"] == "cpu"
    assert config["versions"]["quasistatic"] == quasistatic.__version__
    assert config["versions"]["torch"] == torch.__version__
    assert {"python", "numpy", "scipy", "scikit-learn"} <= set(config["versions"])
    assert config["equilibration"]["schedule"] == "initial"
    assert config["equilibration"]["lr"] == 1e-3 and config["equilibration"]["lr_drop_every"] == 50
    assert config["model"]["hidden"] == [16, 16]

    with (reference / "metrics.csv").open(newline="") as f:
        header, *lines = list(csv.reader(f))
    assert header == COLUMNS
    assert [int(line[0]) for line in lines] == [1, 2, 3, 4]
    rows = read_rows(reference)
    assert all(float(r["lam"]) == 0.5 and float(r["gamma"]) == 5.0 for r in rows)
    assert all(np.isfinite([float(v) for v in r.values()]).all() for r in rows)
    walls = [float(r["wall_s"]) for r in rows]
    assert walls == sorted(walls) and walls[0] > 0
    last = rows[-1]
    sigma = 3e-2  # the default --sigma
    assert float(last["F"]) == pytest.approx(float(last["R"]) + 0.5 * float(last["D"]) + 5 * float(last["C"])
                                             + sigma * float(last["S"]), rel=1e-6)
    assert float(rows[-1]["F"]) < float(rows[0]["F"])

    state = load_checkpoint(reference / "checkpoint.pt",
                            expect=ModelConfig(hidden=(16, 16), input_shape=(1, 8, 8), num_classes=10))
    assert state["epoch"] == 3 and state.controls == Controls(0.5, 5.0)
    model = state.model()
    split = load_dataset("digits", seed=3)
    train = Objective(model, split.train, samples=1, noise_seed=3)
    assert train.report(train.initial_theta()).C == pytest.approx(float(last["C"]), rel=1e-6)
    val = Objective(model, split.val, samples=1, noise_seed=3 + 1000)
    assert val.accuracy(val.initial_theta()) == pytest.approx(float(last["val_acc"]))

    png = (reference / "curves.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 1000


def test_run_prints_a_summary(tmp_path, capsys):
    assert equilibrate_cli(tmp_path / "eq", "--epochs", "1", *FAST) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("equilibrated (Adam): R=") and "metrics.csv" in captured.out
    assert "polish" not in captured.out and not (tmp_path / "eq" / "polish.json").exists()
    assert captured.err == ""  # --no-progress: no bar


def test_progress_bar_goes_to_stderr(tmp_path, capsys):
    assert equilibrate_cli(tmp_path / "eq", "--epochs", "1", "--hidden", "16,16", "--batch-size", "128",
                           "--no-polish") == 0
    err = capsys.readouterr().err
    assert "equilibrate" in err and "1/1" in err


# ---------------------------------------------------------------- resume

def _interrupt_after(monkeypatch, epochs_done: int, *, inside_checkpoint: bool = False) -> None:
    """Simulate Ctrl-C: after ``epochs_done`` complete epochs (row and checkpoint written), or with
    ``inside_checkpoint`` while saving the next checkpoint (its metrics row already written)."""
    if inside_checkpoint:
        real_save = cli.save_checkpoint

        def save(path, model, controls, data, **extra):
            if extra["epoch"] == epochs_done:
                raise KeyboardInterrupt
            real_save(path, model, controls, data, **extra)

        monkeypatch.setattr(cli, "save_checkpoint", save)
        return
    real_equilibrate = cli.equilibrate

    def equilibrate(*args, on_epoch, **kwargs):
        def interrupted(epoch, row, optimizer_state):
            on_epoch(epoch, row, optimizer_state)
            if epoch + 1 == epochs_done:
                raise KeyboardInterrupt

        return real_equilibrate(*args, on_epoch=interrupted, **kwargs)

    monkeypatch.setattr(cli, "equilibrate", equilibrate)


@pytest.mark.parametrize("inside_checkpoint", [False, True], ids=["between-epochs", "during-checkpoint"])
def test_resume_reproduces_the_uninterrupted_run(reference, tmp_path, monkeypatch, inside_checkpoint):
    out = tmp_path / "eq"
    _interrupt_after(monkeypatch, 2, inside_checkpoint=inside_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        equilibrate_cli(out, *REFERENCE_ARGS)
    monkeypatch.undo()
    assert len(read_rows(out)) == (3 if inside_checkpoint else 2)
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1
    assert not (out / "curves.png").exists()
    config_before = (out / "config.json").read_bytes()

    assert equilibrate_cli(out, *REFERENCE_ARGS, "--resume") == 0
    assert without_wall(read_rows(out)) == without_wall(read_rows(reference))
    assert (out / "config.json").read_bytes() == config_before
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 3
    assert (out / "curves.png").read_bytes().startswith(PNG_MAGIC)
    walls = [float(r["wall_s"]) for r in read_rows(out)]
    assert walls == sorted(walls)


def test_resume_accepts_another_spelling_of_out(reference, tmp_path, monkeypatch):
    out = tmp_path / "eq"
    _interrupt_after(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        equilibrate_cli(out, *REFERENCE_ARGS)
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    assert main(["equilibrate", "--out", "eq/", *REFERENCE_ARGS, "--resume"]) == 0
    assert without_wall(read_rows(out)) == without_wall(read_rows(reference))


def test_resume_before_the_first_checkpoint_starts_again(reference, tmp_path, monkeypatch):
    out = tmp_path / "eq"
    _interrupt_after(monkeypatch, 0, inside_checkpoint=True)
    with pytest.raises(KeyboardInterrupt):
        equilibrate_cli(out, *REFERENCE_ARGS)
    monkeypatch.undo()
    assert not (out / "checkpoint.pt").exists() and len(read_rows(out)) == 1
    assert equilibrate_cli(out, *REFERENCE_ARGS, "--resume") == 0
    assert without_wall(read_rows(out)) == without_wall(read_rows(reference))


# ---------------------------------------------------------------- --from-checkpoint, --overwrite

def test_from_checkpoint_uses_the_equilibration_schedule(reference, tmp_path, monkeypatch):
    rates, starts = [], []
    real_rate = EquilibrationConfig.learning_rate

    def learning_rate(self, epoch, step, total_steps):
        rate = real_rate(self, epoch, step, total_steps)
        rates.append((self.schedule, step, total_steps, rate))
        return rate

    real_equilibrate = cli.equilibrate

    def equilibrate(objective, *args, **kwargs):
        starts.append(objective.initial_theta())
        return real_equilibrate(objective, *args, **kwargs)

    monkeypatch.setattr(EquilibrationConfig, "learning_rate", learning_rate)
    monkeypatch.setattr(cli, "equilibrate", equilibrate)
    out = tmp_path / "eq"
    assert equilibrate_cli(out, "--from-checkpoint", str(reference / "checkpoint.pt"), "--lam", "2", "--gamma", "5",
                           "--epochs", "2", "--seed", "3", *FAST) == 0

    steps_per_epoch = -(-1437 // 128)  # digits: 1437 training examples at val fraction 0.2
    assert [(s, step, total) for s, step, total, _ in rates] == [
        ("equilibration", step, 2 * steps_per_epoch) for step in range(2 * steps_per_epoch)]
    assert all(rate == equilibration_rate(step, total, 1.5e-3) for _, step, total, rate in rates)
    assert rates[0][3] == 0.0 and max(r for *_, r in rates) <= 1.5e-3
    config = json.loads((out / "config.json").read_text())
    assert config["equilibration"]["schedule"] == "equilibration"
    assert config["settings"]["from_checkpoint"] == str(reference / "checkpoint.pt")

    source = load_checkpoint(reference / "checkpoint.pt").model()
    assert torch.equal(starts[0], Objective(source, load_dataset("digits").val).initial_theta())
    state = load_checkpoint(out / "checkpoint.pt")
    assert state.controls == Controls(2.0, 5.0) and state["epoch"] == 1
    assert [float(r["lam"]) for r in read_rows(out)] == [2.0, 2.0]


def test_overwrite_replaces_old_output(old_run, capsys):
    (old_run / "notes.txt").write_text("old")
    assert equilibrate_cli(old_run, "--overwrite", "--epochs", "2", *FAST) == 0
    assert sorted(p.name for p in old_run.iterdir()) == ["checkpoint.pt", "config.json", "curves.png", "metrics.csv"]
    assert [r["epoch"] for r in read_rows(old_run)] == ["1", "2"]
    assert json.loads((old_run / "config.json").read_text())["settings"]["epochs"] == 2
    assert load_checkpoint(old_run / "checkpoint.pt")["epoch"] == 1


# ---------------------------------------------------------------- divergence

def _nan_after(monkeypatch, good_steps: int) -> None:
    """Make the minibatch loss NaN from update number ``good_steps`` on."""
    real = Objective.minibatch_value
    calls = []

    def minibatch_value(self, index, controls):
        calls.append(1)
        loss = real(self, index, controls)
        return loss * float("nan") if len(calls) > good_steps else loss

    monkeypatch.setattr(Objective, "minibatch_value", minibatch_value)


def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    out = tmp_path / "eq"
    _nan_after(monkeypatch, 12 + 3)  # 12 updates per epoch at batch size 128: NaN in epoch 2
    assert equilibrate_cli(out, "--epochs", "3", *FAST) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "the loss became nan at epoch 2, step 15" in err and str(out / "checkpoint.pt") in err
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values())
    assert len(read_rows(out)) == 1


def test_divergence_in_the_first_epoch_names_no_checkpoint(tmp_path, monkeypatch, capsys):
    out = tmp_path / "eq"
    _nan_after(monkeypatch, 0)
    assert equilibrate_cli(out, "--epochs", "2", *FAST) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the loss became nan at epoch 1, step 0" in err
    assert not (out / "checkpoint.pt").exists()
    assert "checkpoint.pt" not in err


# ---------------------------------------------------------------- bad input

def _corrupt_mnist(folder: Path) -> Path:
    """An MNIST-named IDX pair whose image file has a wrong magic number."""
    folder.mkdir()
    header = np.array([1234, 2, 28, 28], dtype=">i4").tobytes()
    (folder / "train-images-idx3-ubyte").write_bytes(header + bytes(2 * 28 * 28))
    (folder / "train-labels-idx1-ubyte").write_bytes(np.array([LABELS_MAGIC, 2], dtype=">i4").tobytes() + b"\0\1")
    return folder


def _checkpoint_8_8(folder: Path) -> Path:
    path = folder / "mlp-8-8.pt"
    save_checkpoint(path, build_model(ModelConfig(hidden=(8, 8))), Controls(1.0, 10.0), {"dataset": "digits"})
    return path


BAD_INPUTS = {
    # id: (arguments, flag for an existing --out, fragments of the message)
    "unknown-dataset": (["--dataset", "cats"], "--overwrite", ["dataset must be one of", "cifar10, digits, mnist",
                                                               "'cats'"]),
    "unknown-model": (["--model", "transformer"], "--overwrite", ["model must be one of {{mlp, resnet18}}",
                                                                   "'transformer'"]),
    "class-out-of-range": (["--classes", "0-12"], "--overwrite", ["classes must be", "0..9", "'0-12'"]),
    "class-name": (["--classes", "cats"], "--overwrite", ["classes must be", "'0-4'", "'cats'"]),
    "mnist-without-data-dir": (["--dataset", "mnist"], "--overwrite", ["mnist data_dir must be", "None"]),
    "mnist-missing-data-dir": (["--dataset", "mnist", "--data-dir", "{tmp}/nowhere"], "--overwrite",
                               ["{tmp}/nowhere", "train-images-idx3-ubyte", "no such directory"]),
    "mnist-corrupt-data-dir": (["--dataset", "mnist", "--data-dir", "{corrupt}"], "--overwrite",
                               ["magic number of", "train-images-idx3-ubyte", str(IMAGES_MAGIC), "got 1234"]),
    "negative-lam": (["--lam", "-1"], "--overwrite", ["lambda must be a number >= 0, got -1.0"]),
    "negative-gamma": (["--gamma", "-0.5"], "--overwrite", ["gamma must be a number >= 0, got -0.5"]),
    "nan-lam": (["--lam", "nan"], "--overwrite", ["lambda must be a number >= 0, got nan"]),
    "zero-samples": (["--samples", "0"], "--overwrite", ["--samples must be an integer >= 1, got 0"]),
    "zero-epochs": (["--epochs", "0"], "--overwrite", ["epochs must be an integer >= 1, got 0"]),
    "zero-grad-tol": (["--grad-tol", "0"], "--overwrite", ["--grad-tol must be a number > 0, got 0.0"]),
    "unknown-preconditioner": (["--preconditioner", "ilu"], "--overwrite", ["preconditioner must be one of",
                                                                             "auto", "dense", "kfac", "'ilu'"]),
    "bad-hidden": (["--hidden", "16,x"], "--overwrite", ["--hidden must be comma-separated positive integers",
                                                         "'16,x'"]),
    "cuda": (["--device", "cuda"], "--overwrite", ["device", "must be one of {{cpu}}", "'cuda'"]),
    "existing-out": ([], None, ["--out must be a new or empty directory", "--overwrite or --resume",
                                "got the existing '{out}'"]),
    "overwrite-and-resume": (["--resume"], "--overwrite", ["--overwrite and --resume"]),
    "from-checkpoint-other-model": (["--from-checkpoint", "{ckpt88}"], "--overwrite",
                                    ["checkpoint model hidden must be (16, 16)", "got (8, 8)"]),
    "from-checkpoint-missing": (["--from-checkpoint", "{tmp}/none.pt"], "--overwrite",
                                ["checkpoint must be an existing file", "{tmp}/none.pt"]),
    "resume-other-hidden": (["--hidden", "8,8"], "--resume", ["--hidden must equal the resumed run's '16,16'",
                                                              "got '8,8'"]),
    "resume-other-model": (["--model", "resnet18"], "--resume", ["--model must equal the resumed run's 'mlp'",
                                                                 "got 'resnet18'"]),
    "resume-other-model-checkpoint": (["{swap88}"], "--resume", ["checkpoint model hidden must be (16, 16)",
                                                                 "got (8, 8)"]),
}


@pytest.mark.parametrize("case", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_exits_2_with_one_line_and_leaves_output_alone(case, old_run, tmp_path, capsys):
    if case[0] == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    arguments, flag, fragments = case
    names = {"tmp": str(tmp_path), "out": str(old_run)}
    if "{corrupt}" in arguments:
        names["corrupt"] = str(_corrupt_mnist(tmp_path / "corrupt"))
    if "{ckpt88}" in arguments:
        names["ckpt88"] = str(_checkpoint_8_8(tmp_path))
    if "{swap88}" in arguments:  # same settings, but the checkpoint holds another model
        shutil.copy(_checkpoint_8_8(tmp_path), old_run / "checkpoint.pt")
        arguments = []
    before = hashes(old_run)
    argv = [a.format(**names) for a in REFERENCE_ARGS + arguments] + ([flag] if flag else [])
    capsys.readouterr()
    assert equilibrate_cli(old_run, *argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("quasistatic: error: ") and "Traceback" not in captured.err
    for fragment in fragments:
        assert fragment.format(**names) in lines[0]
    assert captured.out == ""
    assert hashes(old_run) == before


def test_bad_input_creates_no_output_directory(tmp_path, capsys):
    out = tmp_path / "new"
    assert equilibrate_cli(out, "--samples", "0", *FAST) == 2
    assert equilibrate_cli(out, "--dataset", "mnist", "--data-dir", str(tmp_path / "nowhere"), *FAST) == 2
    assert not out.exists()


def test_resume_without_an_earlier_run(tmp_path, capsys):
    assert equilibrate_cli(tmp_path / "none", "--resume", *FAST) == 2
    err = capsys.readouterr().err
    assert err.startswith("quasistatic: error: --resume needs an earlier run in --out") and "config.json" in err


def test_console_script_reports_bad_input_without_traceback(old_run):
    script = shutil.which("quasistatic")
    command = [script] if script else [sys.executable, "-m", "quasistatic.cli"]
    before = hashes(old_run)
    result = subprocess.run([*command, "equilibrate", "--out", str(old_run), "--overwrite", "--gamma", "-2"],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2
    assert result.stderr == "quasistatic: error: gamma must be a number >= 0, got -2.0\n"
    assert result.stdout == ""
    assert hashes(old_run) == before


# ---------------------------------------------------------------- real MNIST test split

@pytest.mark.skipif(not MNIST_T10K.is_dir(), reason=f"{MNIST_T10K} is absent")
def test_mnist_test_split_runs_one_epoch(tmp_path, capsys):
    out = tmp_path / "mnist"
    with pytest.warns(UserWarning, match=r"only the MNIST test split \(t10k\)"):
        code = equilibrate_cli(out, "--dataset", "mnist", "--data-dir", str(MNIST_T10K), "--epochs", "1",
                               "--hidden", "16,16", "--batch-size", "256", "--no-progress", "--no-polish")
    assert code == 0
    rows = read_rows(out)
    assert len(rows) == 1 and np.isfinite(float(rows[0]["F"]))
    config = json.loads((out / "config.json").read_text())
    assert config["data"] == {"name": "mnist", "train": 8000, "val": 2000}
    assert config["model"]["input_shape"] == [1, 28, 28]


# ---------------------------------------------------------------- the polish after Adam

def test_polish_ends_on_the_surface_and_reports_both_gradient_norms(tmp_path, capsys):
    name = register_small_dataset()
    out = tmp_path / "eq"
    flags = ["--dataset", name, "--hidden", "8", "--epochs", "3", "--batch-size", "4", "--lam", "1", "--gamma", "10",
             "--seed", "0", "--no-progress", "--grad-tol", "1e-7"]
    assert equilibrate_cli(out, *flags) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "polish.json").read_text())
    assert summary["converged"] and summary["grad_norm"] <= 1e-7 < 1e-3 < summary["grad_norm_adam"]
    assert f"{summary['grad_norm_adam']:.3e} -> {summary['grad_norm']:.3e}" in printed
    assert summary["gradient_equivalents"] > 0
    # the checkpoint holds the polished model, in float64: ‖∇θJ‖ recomputed here, from the file
    model = load_checkpoint(out / "checkpoint.pt").model(dtype=torch.float64)
    train = Objective(model, load_dataset(name, seed=0).train, samples=1, noise_seed=0, sigma=3e-2)
    theta = train.initial_theta()
    assert theta.dtype == torch.float64
    assert float(torch.linalg.vector_norm(train.gradient(theta, Controls(1.0, 10.0)))) <= 1e-7
    assert train.report(theta).C == pytest.approx(summary["C"], rel=1e-9)


def test_dense_asked_for_above_its_size_limit_is_refused_before_training(tmp_path, capsys):
    out = tmp_path / "eq"
    assert equilibrate_cli(out, "--hidden", "64,64", "--epochs", "1", "--no-progress", "--preconditioner", "dense") == 2
    err = capsys.readouterr().err
    assert "preconditioner 'dense'" in err and "kfac" in err and "max_size = 6000" in err
    assert not out.exists()
