"""The library side of a transfer: the source/target tasks, the objectives' shared noise, the
process per method, the baselines' rows and work, and the Figs. 5–6 plot."""

import csv

import pytest
import torch

from quasistatic import (Controls, DataSplit, EquilibrationConfig, InputError, LabeledData, ModelConfig,
                         TransferObjectives, build_model, load_dataset, make_transfer_process, plot_transfer,
                         train_baseline, transfer_data)
from quasistatic.processes import ConstantLambdaRate, GeodesicTransfer, IsoClassificationTransfer
from quasistatic.experiments.rundir import RunDirectory
from quasistatic.experiments.trajectory import TARGET_COLUMNS, TRAJECTORY_COLUMNS, TrajectoryRecorder, numeric
from quasistatic.experiments.transfer import first_per_class

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

START = Controls(1.0, 4.0)


@pytest.fixture(scope="module")
def digits() -> DataSplit:
    return load_dataset("digits", seed=0)


@pytest.fixture(scope="module")
def tasks(digits):
    """20 training and 20 validation digits per class, 0-4 -> 5-9, relabelled to 0..4."""
    return transfer_data(digits, "0-4", "5-9", "separate", max_per_class=20)


def small_model(data, seed=0):
    config = ModelConfig(input_shape=(1, 8, 8), num_classes=data.num_classes, latent_dim=2, hidden=(8,))
    return build_model(config, seed=seed).double()


def test_shared_labels_keep_the_data_sets_head(digits):
    data = transfer_data(digits, "0-4", "5-9", "shared")
    assert data.num_classes == 10 and data.labels == "shared"
    assert set(data.source.train.y.tolist()) == {0, 1, 2, 3, 4} and set(data.target.val.y.tolist()) == {5, 6, 7, 8, 9}
    assert len(data.source.train) + len(data.target.train) == len(digits.train)  # one partition, nothing lost
    assert data.describe()["sizes"]["target"]["val"] == len(data.target.val)


def test_separate_labels_relabel_each_task_in_the_order_given(digits):
    data = transfer_data(digits, "0-4", "9,8,7,6,5", "separate")
    assert data.num_classes == 5 and data.target_classes == (9, 8, 7, 6, 5)
    nines = digits.train.y == 9
    assert torch.equal(data.target.train.x[data.target.train.y == 0], digits.train.x[nines])


def test_max_per_class_keeps_the_first_examples(digits, tasks):
    assert len(tasks.source.train) == len(tasks.target.val) == 100
    fives = digits.train.x[digits.train.y == 5]
    assert torch.equal(tasks.target.train.x[tasks.target.train.y == 0], fives[:20])
    few = first_per_class(LabeledData(torch.zeros(6, 1, 1, 1), torch.tensor([1, 0, 1, 1, 0, 1]), 2, ("a", "b")), 2)
    assert few.y.tolist() == [1, 0, 1, 0]


@pytest.mark.parametrize("source, target, labels, extra, message", [
    ("0-4", "4-8", "shared", {}, r"target classes must be disjoint from the source classes \[0, 1, 2, 3, 4\] "
                                 r"\(both hold \[4\]\), got '4-8'"),
    ("", "5-9", "shared", {}, r"source classes must be a range like '0-4'.*, got ''"),
    ("0-4", "animals", "shared", {}, r"target classes must be .*\(cannot read 'animals'\), got 'animals'"),
    ("0-4", "5,6", "separate", {}, r"target classes must be as many as the source's 5 with labels 'separate'"),
    ("0-4", "5-9", "tied", {}, r"labels must be one of \{separate, shared\}, got 'tied'"),
    ("0-4", "5-9", "shared", {"max_per_class": 0}, r"max_per_class must be an integer >= 1"),
])
def test_bad_tasks(digits, source, target, labels, extra, message):
    with pytest.raises(InputError, match=message):
        transfer_data(digits, source, target, labels, **extra)


def test_a_class_without_examples_is_refused(digits):
    no_sevens = DataSplit(digits.train, digits.val.subset(torch.nonzero(digits.val.y != 7).flatten()), "digits")
    with pytest.raises(InputError, match=r"target classes must be classes with validation examples in digits "
                                         r"\(none for \[7\]\), got '5-9'"):
        transfer_data(no_sevens, "0-4", "5-9")


def test_the_mixture_ends_are_the_tasks_to_the_last_bit(tasks):
    """J under p(x, 0) is J on the source and J under p(x, 1) is J on the target (shared noise)."""
    objectives = TransferObjectives(small_model(tasks), tasks, samples=2, seed=3, sigma=1e-2)
    theta = objectives.mixture.initial_theta()
    assert torch.equal(objectives.mixture.functionals(theta, 0.0), objectives.source.functionals(theta))
    assert torch.equal(objectives.mixture.functionals(theta, 1.0), objectives.target.functionals(theta))
    assert torch.equal(objectives.mixture_val.functionals(theta, 1.0), objectives.target_val.functionals(theta))
    # Objective.accuracy mixes the parts' accuracies in Python floats: exact at the ends
    assert objectives.mixture_val.accuracy(theta, 1.0) == objectives.target_val.accuracy(theta)
    halfway = objectives.mixture.functionals(theta, 0.5)
    assert not torch.allclose(halfway, objectives.source.functionals(theta))  # the target part counts


@pytest.mark.parametrize("method, value, kind", [
    ("iso-c", None, IsoClassificationTransfer),
    ("geodesic", -0.5, GeodesicTransfer),
    ("constant-lambda-rate", None, ConstantLambdaRate),
])
def test_each_method_makes_its_mixture_process(method, value, kind):
    process = make_transfer_process(method, Controls(4.0, 100.0), value)
    assert type(process) is kind and process.uses_mixture and process.constraint == (0.0, 0.0, 1.0)


def test_transfer_process_errors():
    with pytest.raises(InputError, match=r"transfer process method must be one of \{constant-lambda-rate, geodesic, "
                                         r"iso-c\}, got 'finetune'"):
        make_transfer_process("finetune", START)
    with pytest.raises(InputError, match=r"k must be a rate that keeps lambda >= 0 up to s = 1 \(k >= -lambda = -1\), "
                                         r"got -1.5"):
        make_transfer_process("constant-lambda-rate", START)  # the paper's k = -1.5 needs λ >= 1.5
    assert make_transfer_process("constant-lambda-rate", START, -1.0).lam_rate == -1.0
    with pytest.raises(InputError, match="slope must be a number"):
        make_transfer_process("geodesic", START)


def rows(path):
    with path.open() as f:
        return [numeric(row) for row in csv.DictReader(f)]


@pytest.mark.parametrize("finetune", [True, False])
def test_baseline_rows_work_and_target_metrics(tmp_path, tasks, finetune):
    """One row per epoch with the transfer's columns; one gradient-equivalent per epoch; the
    target columns are the target validation objective's values at the recorded θ."""
    model = small_model(tasks)
    objectives = TransferObjectives(model, tasks, samples=1, seed=0, sigma=1e-2)
    if finetune:  # a source model: a few epochs on the source first (work on the source objective)
        from quasistatic import equilibrate
        equilibrate(objectives.source, START, EquilibrationConfig(epochs=2), progress=False)
    run = RunDirectory(tmp_path / "run")
    run.prepare()
    recorder = TrajectoryRecorder(run, objectives.target, objectives.mixture_val, target_val=objectives.target_val)
    controls = Controls(START.lam, START.gamma, 1.0)
    state = train_baseline(objectives.target, controls, EquilibrationConfig(epochs=3, batch_size=16), recorder,
                           progress=False)
    recorded = rows(run.file("trajectory.csv"))
    assert [r["step"] for r in recorded] == [1, 2, 3] and [r["s"] for r in recorded] == pytest.approx([1 / 3, 2 / 3, 1])
    assert [r["grad_evals"] for r in recorded] == pytest.approx([1.0, 2.0, 3.0])
    assert run.file("trajectory.csv").read_text().splitlines()[0].split(",") == [*TRAJECTORY_COLUMNS, *TARGET_COLUMNS]
    assert torch.equal(state.theta, objectives.target.initial_theta())
    assert recorded[-1]["target_val_C"] == pytest.approx(objectives.target_val.report(state.theta).C, rel=1e-12)
    assert recorded[-1]["target_val_acc"] == pytest.approx(objectives.target_val.accuracy(state.theta))
    assert recorded[-1]["C"] == pytest.approx(objectives.target.report(state.theta).C, rel=1e-12)


def test_plot_transfer(tmp_path):
    assert plot_transfer(tmp_path) is None  # no runs yet
    columns = [*TRAJECTORY_COLUMNS, *TARGET_COLUMNS]
    for method, count in (("iso-c", 3), ("finetune", 2), ("scratch", 2)):
        (tmp_path / method).mkdir()
        with (tmp_path / method / "trajectory.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, columns)
            writer.writeheader()
            writer.writerows({c: 0.1 * i for c in columns} | {"s": i / (count - 1)} for i in range(count))
    path = plot_transfer(tmp_path, "test")
    assert path == tmp_path / "transfer.png" and path.stat().st_size > 0
