"""`quasistatic transfer`: every method end to end on small data sets, resume, the MNIST and CIFAR-10
paths, and every bad input.

The transfer processes run on a gentle, well-posed task pair (the target is the source with its
pixel logits shifted, its labels moved to two new classes), where the engine holds C to rounding;
the baselines run on 20 digits per class.
"""

import csv
import hashlib
import json
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from quasistatic import (DataSplit, LabeledData, ParameterLayout, TransferObjectives, load_checkpoint, load_dataset,
                         transfer_data)
from quasistatic.cli import main
from quasistatic.data import available_datasets, register_dataset
from quasistatic.experiments.trajectory import MIXTURE_COLUMNS, TARGET_COLUMNS, TRAJECTORY_COLUMNS, numeric
from quasistatic.experiments.transfer_run import TransferConfig
from small_problem import small_labeled
from test_data import cifar_batches, write_batches

pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:the digits data set ships with scikit-learn")]

PAIR = "transfer-pair-test-set"
SHIFT = 0.3  # the pixel-logit shift from source to target
MNIST_T10K = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist-t10k"


def _pair_part(n: int, seed: int) -> LabeledData:
    """Source (labels 0..2) and target (the same images with pixel logits shifted by 0.3, labels 3..5):
    with --labels separate, the mixture of tests/test_engine.py's transfer test."""
    source, target = small_labeled(n, seed, 0.0), small_labeled(n, seed, SHIFT)
    return LabeledData(torch.cat([source.x, target.x]).float(), torch.cat([source.y, target.y + 3]), 6,
                       tuple("abcdef"))


def _pair(data_dir=None, *, download=False, seed=0, val_fraction=0.2) -> DataSplit:
    return DataSplit(_pair_part(12, 1), _pair_part(8, 2), PAIR)


if PAIR not in available_datasets():
    register_dataset(PAIR, _pair)

PROCESS = ["--dataset", PAIR, "--source", "0-2", "--target", "3-5", "--labels", "separate", "--hidden", "",
           "--latent-dim", "1", "--samples", "2", "--sigma", "1e-2", "--lam", "1", "--gamma", "4", "--epochs", "30",
           "--batch-size", "4", "--grad-tol", "1e-7", "--drift-tol", "1e-8", "--steps", "2", "--no-progress"]
DIGITS = ["--dataset", "digits", "--source", "0-4", "--target", "5-9", "--max-per-class", "20", "--hidden", "8",
          "--latent-dim", "2", "--epochs", "2", "--no-progress"]


def rows(path: Path) -> list[dict[str, float]]:
    with (path / "trajectory.csv").open() as f:
        return [numeric(row) for row in csv.DictReader(f)]


def header(path: Path) -> list[str]:
    with (path / "trajectory.csv").open() as f:
        return next(csv.reader(f))


def tree_hash(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def pair_runs(tmp_path_factory):
    """iso-c, geodesic and constant-lambda-rate into one --out (the source model trained once).

    The geodesic's slope k = dD/dR is near the R–D slope of the iso-c path here: a slope far from
    it asks for a λ̇ that drives λ below 0 within the first step."""
    out = tmp_path_factory.mktemp("pair") / "transfer"
    assert main(["transfer", *PROCESS, "--method", "iso-c", "--out", str(out)]) == 0
    start = ["--from-checkpoint", str(out / "iso-c" / "start.pt")]
    assert main(["transfer", *PROCESS, *start, "--method", "geodesic", "--slope", "-0.05", "--out", str(out)]) == 0
    assert main(["transfer", *PROCESS, *start, "--method", "constant-lambda-rate", "--k", "-0.1", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def digit_runs(tmp_path_factory):
    """finetune and scratch on 20 digits per class."""
    out = tmp_path_factory.mktemp("digits") / "transfer"
    assert main(["transfer", *DIGITS, "--method", "finetune", "--out", str(out)]) == 0
    assert main(["transfer", *DIGITS, "--method", "scratch", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("method", ["iso-c", "geodesic", "constant-lambda-rate"])
def test_transfer_process_moves_the_data_at_constant_c(pair_runs, method):
    recorded = rows(pair_runs / method)
    assert [r["step"] for r in recorded] == list(range(len(recorded))) and len(recorded) >= 3  # h may halve
    assert recorded[0]["t"] == 0 and recorded[-1]["t"] == pytest.approx(1.0)
    assert [r["t"] for r in recorded] == pytest.approx([r["s"] for r in recorded])  # ṫ = 1
    c0 = recorded[0]["C"]
    assert max(abs(r["C"] - c0) for r in recorded) <= 1e-8 * c0  # the newton corrector holds C0
    assert all(r["grad_norm"] <= 1e-7 for r in recorded)  # on the surface (--grad-tol)
    evals = [r["grad_evals"] for r in recorded]
    assert evals == sorted(evals) and evals[-1] > evals[0]
    assert header(pair_runs / method) == [*TRAJECTORY_COLUMNS, *TARGET_COLUMNS, *MIXTURE_COLUMNS]
    assert recorded[-1]["gamma"] != pytest.approx(4.0)  # γ moved to hold C
    if method == "constant-lambda-rate":
        assert recorded[-1]["lam"] == pytest.approx(0.9)


def test_c0_is_the_source_and_the_end_is_the_target(pair_runs):
    """config.json records C of the starting model on the source alone; at t = 1 the mixture's
    validation columns are the target's (tests/test_transfer.py checks the ends of J itself)."""
    last = rows(pair_runs / "iso-c")[-1]
    data = transfer_data(_pair(), "0-2", "3-5", "separate")
    model = load_checkpoint(pair_runs / "iso-c" / "start.pt").model(dtype=torch.float64)
    source = TransferObjectives(model, data, samples=2, seed=0, sigma=1e-2).source
    recorded = json.loads((pair_runs / "iso-c" / "config.json").read_text())["record"]["start_C"]
    assert recorded == pytest.approx(source.report(source.initial_theta()).C, rel=1e-12)
    assert last["val_C"] == pytest.approx(last["target_val_C"], rel=1e-12)
    assert last["val_acc"] == pytest.approx(last["target_val_acc"], abs=1e-7)  # mixed in float32 by Objective


def test_target_columns_equal_an_independent_evaluation(pair_runs):
    """target_val_acc and target_val_C of the last row, recomputed by hand from the saved θ: the
    accuracy at the encoder mean, and C on the K = 2 fixed draws of the target's validation seed
    (seed + 1001, drawn in float64 like quasistatic.thermo.functionals.fixed_noise)."""
    last = rows(pair_runs / "iso-c")[-1]
    theta = torch.load(pair_runs / "iso-c" / "state.pt", weights_only=False)["state"].theta
    model = load_checkpoint(pair_runs / "iso-c" / "start.pt").model(dtype=torch.float64)
    ParameterLayout(model).write(model, theta)
    target = transfer_data(_pair(), "0-2", "3-5", "separate").target.val.to(dtype=torch.float64)
    assert target.y.tolist() == [y - 3 for y in _pair().val.y.tolist() if y >= 3]  # relabelled
    with torch.no_grad():
        accuracy = float((model.mean_logits(target.x).argmax(-1) == target.y).double().mean())
        mu, logvar = model.encode(target.x)
        noise = torch.randn(2, len(target), 1, generator=torch.Generator().manual_seed(1001), dtype=torch.float64)
        logits = model.classifier(mu + torch.exp(0.5 * logvar) * noise)  # (K, n, classes)
        c = float(torch.stack([F.cross_entropy(k_logits, target.y) for k_logits in logits]).mean())
    assert last["target_val_acc"] == pytest.approx(accuracy, abs=1e-12)
    assert last["target_val_C"] == pytest.approx(c, rel=1e-10)


def test_comparison_figure_and_summary(pair_runs, digit_runs):
    for out, methods in ((pair_runs, ("iso-c", "geodesic", "constant-lambda-rate")), (digit_runs, ("finetune", "scratch"))):
        assert (out / "transfer.png").stat().st_size > 0
        for method in methods:
            assert (out / method / "config.json").exists()
    for name in ("rate_distortion.png", "controls.png", "classification.png", "free_energy.png", "start.pt"):
        assert (pair_runs / "iso-c" / name).stat().st_size > 0, name


def test_baselines_record_the_same_columns_and_their_work(digit_runs):
    for method in ("finetune", "scratch"):
        recorded = rows(digit_runs / method)
        assert header(digit_runs / method) == [*TRAJECTORY_COLUMNS, *TARGET_COLUMNS]
        assert [r["step"] for r in recorded] == [1, 2] and all(r["t"] == 1 for r in recorded)
        # one gradient-equivalent per epoch of minibatches; the per-epoch measurements are bookkeeping
        assert [r["grad_evals"] for r in recorded] == pytest.approx([1.0, 2.0])
        assert all(r["val_acc"] == pytest.approx(r["target_val_acc"]) for r in recorded)
    assert (digit_runs / "finetune" / "start.pt").exists() and not (digit_runs / "scratch" / "start.pt").exists()


def test_finetune_prints_its_first_epoch_target_accuracy(tmp_path, capsys):
    out = tmp_path / "t"
    assert main(["transfer", *DIGITS, "--epochs", "1", "--method", "finetune", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    first = rows(out / "finetune")[0]["target_val_acc"]
    assert f"first-epoch target_val_acc = {first:.4f} (chance 1/5 = 0.2000)" in printed
    assert "C0 = " in printed and str(out / "transfer.png") in printed


def _interrupt_after(count: int):
    from quasistatic.experiments import trajectory

    original = trajectory.TrajectoryRecorder.record
    calls = {"n": 0}

    def interrupting(self, *args, **kwargs):
        row = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == count:
            raise KeyboardInterrupt
        return row

    return trajectory.TrajectoryRecorder, original, interrupting


@pytest.mark.parametrize("method, runs_fixture, extra", [
    ("iso-c", "pair_runs", PROCESS),
    ("finetune", "digit_runs", DIGITS),
])
def test_resume_continues_to_the_uninterrupted_trajectory(request, tmp_path, method, runs_fixture, extra):
    uninterrupted = rows(request.getfixturevalue(runs_fixture) / method)
    out = tmp_path / "run"
    args = ["transfer", *extra, "--method", method, "--out", str(out)]
    recorder, original, interrupting = _interrupt_after(2)
    recorder.record = interrupting
    try:
        with pytest.raises(KeyboardInterrupt):
            main(args)
    finally:
        recorder.record = original
    assert len(rows(out / method)) == 2
    assert main([*args, "--resume"]) == 0
    resumed = rows(out / method)
    assert len(resumed) == len(uninterrupted)
    for a, b in zip(resumed, uninterrupted):
        for key in ("lam", "gamma", "R", "D", "C", "target_val_acc"):
            assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-12), key


@pytest.mark.skipif(not MNIST_T10K.is_dir(), reason="no MNIST t10k files in ../shared/data/mnist-t10k")
def test_mnist_t10k(tmp_path):
    out = tmp_path / "mnist"
    args = ["--dataset", "mnist", "--data-dir", str(MNIST_T10K), "--source", "0-4", "--target", "5-9",
            "--max-per-class", "20", "--hidden", "8", "--latent-dim", "2", "--epochs", "2", "--no-progress"]
    with pytest.warns(UserWarning, match="t10k"):
        assert main(["transfer", *args, "--method", "finetune", "--out", str(out)]) == 0
    recorded = rows(out / "finetune")
    assert len(recorded) == 2 and recorded[-1]["grad_evals"] > recorded[0]["grad_evals"]
    config = (out / "finetune" / "config.json").read_text()
    assert '"num_classes": 10' in config and '"train": 100' in config


def test_cifar10_vehicles_to_animals_with_resnet18(tmp_path):
    data_dir = write_batches(tmp_path / "cifar", cifar_batches())
    out = tmp_path / "cifar-run"
    args = ["--dataset", "cifar10", "--data-dir", str(data_dir), "--source", "vehicles", "--target", "animals",
            "--labels", "separate", "--model", "resnet18", "--width", "2", "--latent-dim", "2", "--epochs", "1",
            "--batch-size", "8", "--no-progress"]
    assert main(["transfer", *args, "--method", "finetune", "--out", str(out)]) == 0
    recorded = rows(out / "finetune")
    assert len(recorded) == 1 and 0 <= recorded[0]["target_val_acc"] <= 1
    assert load_checkpoint(out / "finetune" / "start.pt")["model_config"]["num_classes"] == 4


@pytest.mark.parametrize("extra, message", [
    (["--source", "0-4", "--target", "3-7"], "target classes must be disjoint from the source classes [0, 1, 2, 3, 4] "
                                             "(both hold [3, 4]), got '3-7'"),
    (["--source", "", "--target", "5-9"], "source classes must be"),
    (["--source", "0-4", "--target", "vehicles"], "target classes must be"),
    (["--source", "0-4", "--target", "5-7", "--labels", "separate"], "target classes must be as many as the source's 5"),
    (["--source", "0-4", "--target", "5-9", "--labels", "both"], "labels must be one of {separate, shared}, got 'both'"),
    (["--source", "0-4", "--target", "5-9", "--method", "transport"], "method must be one of"),
    (["--source", "0-4", "--target", "5-9", "--method", "constant-lambda-rate"], "k must be a rate that keeps lambda >= 0"),
    (["--source", "0-4", "--target", "5-9", "--method", "geodesic"], "slope must be a number"),
    (["--source", "0-4", "--target", "5-9", "--max-per-class", "0"], "max_per_class must be an integer >= 1"),
    (["--source", "0-4", "--target", "5-9", "--corrector", "magic"], "corrector must be one of"),
    (["--source", "0-4", "--target", "5-9", "--follow", "adam"], "follow must be one of {engine, fd-equilibration}"),
    (["--source", "0-4", "--target", "5-9", "--at-fold", "arclength", "--arclength", "log"],
     "arclength must be one of {s-log-gamma, theta-s-gamma}, got 'log'"),
    (["--source", "0-4", "--target", "5-9", "--method", "geodesic", "--slope", "0.2", "--at-fold", "arclength",
      "--arclength", "s-log-gamma"], "needs a process with a residual form"),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, extra, message):
    out = tmp_path / "bad"
    base = [a for a in DIGITS if a not in ("--source", "0-4", "--target", "5-9")]
    assert main(["transfer", *base, *extra, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("quasistatic: error:") and message in err and "\n" not in err, err
    assert not out.exists()


def test_follow_fd_equilibration_runs_the_papers_procedure(pair_runs, tmp_path, capsys):
    """--follow fd-equilibration: --steps Euler steps of the finite-difference rates to t = 1, each
    followed by Adam (Sec. 5.1); the settings recorded in config.json."""
    start = ["--from-checkpoint", str(pair_runs / "iso-c" / "start.pt")]
    out = tmp_path / "transfer"
    assert main(["transfer", *PROCESS, *start, "--method", "iso-c", "--follow", "fd-equilibration", "--steps", "8",
                 "--out", str(out)]) == 0
    recorded = rows(out / "iso-c")
    assert [r["t"] for r in recorded] == pytest.approx([i / 8 for i in range(9)])  # --steps 8
    assert "iso-c (fd-equilibration): 8 steps" in capsys.readouterr().out
    config = json.loads((out / "iso-c" / "config.json").read_text())
    assert config["follow"]["method"] == "fd-equilibration" and config["follow"]["engine"]["arclength"] == "theta-s-gamma"
    assert TransferConfig.from_dict(config).method == "iso-c"  # config.json holds the config as run


def test_checkpoint_head_must_fit_the_labels(digit_runs, tmp_path, capsys):
    before = tree_hash(digit_runs)
    shared_start = digit_runs / "finetune" / "start.pt"  # a 10-way head (--labels shared)
    assert main(["transfer", *DIGITS, "--labels", "separate", "--method", "finetune", "--from-checkpoint",
                 str(shared_start), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--from-checkpoint classifier head must be 5 classes wide (--labels separate" in err and "got 10" in err
    assert not (tmp_path / "x").exists()
    assert main(["transfer", *DIGITS, "--method", "finetune", "--out", str(digit_runs)]) == 2  # exists: no overwrite
    assert "--out must be a new or empty directory" in capsys.readouterr().err
    assert tree_hash(digit_runs) == before


def test_unused_flags_warn(tmp_path):
    with pytest.warns(UserWarning, match="--slope is unused by transfer --method scratch"):
        assert main(["transfer", *DIGITS, "--epochs", "1", "--method", "scratch", "--slope", "1",
                     "--out", str(tmp_path / "w")]) == 0


def test_mnist_subsets_of_the_digits_loader_share_one_partition():
    """transfer_data's parts come from the split load_dataset makes once over all classes."""
    split = load_dataset("digits", seed=0)
    data = transfer_data(split, "0-4", "5-9", "shared", 20)
    assert len(data.source.train) == 100 and set(data.target.train.y.tolist()) == {5, 6, 7, 8, 9}


@pytest.mark.parametrize("method, runs_fixture", [("iso-c", "pair_runs"), ("finetune", "digit_runs")])
def test_rerun_repeats_a_transfer_run_from_its_config_json(request, tmp_path, method, runs_fixture):
    """config.json of a transfer run is its TransferConfig: `quasistatic rerun` runs it again to the
    same trajectory (every column but the wall time)."""
    directory = request.getfixturevalue(runs_fixture) / method
    again = tmp_path / "again" / method
    assert main(["rerun", str(directory), "--out", str(again), "--no-progress"]) == 0
    with (directory / "trajectory.csv").open() as f, (again / "trajectory.csv").open() as g:
        first, second = list(csv.DictReader(f)), list(csv.DictReader(g))
    assert [{k: v for k, v in r.items() if k != "wall_s"} for r in first] == [
        {k: v for k, v in r.items() if k != "wall_s"} for r in second]
