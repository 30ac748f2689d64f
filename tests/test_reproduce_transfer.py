"""`quasistatic reproduce fig5|fig6`: a transfer figure's runs are the transfer command's runs and
start from one source model, results.json/results.md hold t and the target's accuracy, a work
budget stops a run that crawls (and --resume goes on to the same trajectory), fig6 runs end to end
on CIFAR-10 batches with a resnet18, and bad input exits 2 with nothing written."""

import csv
import json
import math

import pytest
import torch

from quasistatic import load_checkpoint
from quasistatic.cli import main
from quasistatic.continuation.engine import first_law_residual
from quasistatic.experiments.trajectory import numeric
from quasistatic.experiments.reproduce import FIGURES
from test_cli_transfer import PAIR
from test_data import cifar_batches, write_batches

pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:the digits data set ships with scikit-learn")]

COMMON = ["--dataset", PAIR, "--hidden", "", "--latent-dim", "1", "--samples", "2", "--sigma", "1e-2",
          "--epochs", "30", "--batch-size", "4", "--grad-tol", "1e-7", "--drift-tol", "1e-8", "--steps", "2",
          "--no-progress"]
TASKS = ["--lam", "1", "--param", "gamma=4", "--param", "source=0-2", "--param", "target=3-5",
         "--param", "slope=-0.05"]
# the same runs by the transfer command (fig5 has one head over all classes: --labels shared)
TRANSFER = [*COMMON, "--lam", "1", "--gamma", "4", "--source", "0-2", "--target", "3-5", "--labels", "shared"]


def trajectory(path):
    with (path / "trajectory.csv").open() as f:
        return [{k: v for k, v in row.items() if k != "wall_s"} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def figure(tmp_path_factory):
    out = tmp_path_factory.mktemp("fig5") / "fig5"
    code = main(["reproduce", "fig5", *COMMON, *TASKS, "--out", str(out)])
    return code, out


def test_the_figures_runs_are_the_transfer_commands_runs(figure, tmp_path):
    """Each run of fig5 is `quasistatic transfer --method METHOD` with the same flags: the same rows."""
    _, out = figure
    for method in ("iso-c", "finetune"):
        assert main(["transfer", *TRANSFER, "--method", method, "--out", str(tmp_path)]) in (0, 1)
        assert trajectory(out / method) == trajectory(tmp_path / method)


def test_every_method_starts_from_the_same_source_model(figure):
    """The runs train their source model apart (each may run in its own process) from the same
    seed and data: the models are equal to the last bit."""
    _, out = figure
    models = [load_checkpoint(out / method / "start.pt")["state_dict"] for method in ("iso-c", "geodesic", "finetune")]
    for other in models[1:]:
        assert models[0].keys() == other.keys()
        assert all(torch.equal(models[0][key], other[key]) for key in models[0])


def test_results_hold_t_and_the_target_accuracy(figure):
    """results.json holds each run's numbers from its trajectory: t reached, accuracy on the target,
    C drift of the processes and their first law with the work of moving the data; the baselines
    (Adam epochs, no quasi-static process) have no drift and no first law."""
    code, out = figure
    results = json.loads((out / "results.json").read_text())
    runs = {run["name"]: run for run in results["runs"]}
    assert list(runs) == ["iso-c", "geodesic", "finetune", "scratch"]
    assert code == (1 if any(run["error"] for run in runs.values()) else 0)
    for name, run in runs.items():
        n = run["numbers"]
        rows = trajectory(out / name)
        assert n["t_end"] == float(rows[-1]["t"]) and n["grad_evals"] == float(rows[-1]["grad_evals"])
        assert n["target_val_acc_end"] == pytest.approx(float(rows[-1]["target_val_acc"]))
        if name in ("finetune", "scratch"):
            assert n["t_end"] == 1 and n["steps"] == 30 and n["max_drift"] is None and run["error"] is None
            assert n["first_law"] is None
        else:
            c = [float(r["C"]) for r in rows]
            assert n["data_moved"] and n["max_drift"] == pytest.approx(max(abs(x - c[0]) for x in c) / c[0])
            assert n["max_drift"] <= 1e-8 and n["t_end"] > 0
            # the first law with the data's work, dR + λdD + γdC + σdS = ∂_tJ dt (J_t: J_target − J_source)
            assert n["first_law"] <= 1e-2, n["first_law"]
            values = [numeric(r) for r in rows]
            without = first_law_residual([{**v, "J_t": 0.0} for v in values], 1e-2)
            assert without[0] > 10 * n["first_law"] * without[1]  # the data term is not negligible here
            unknown = first_law_residual([{k: x for k, x in v.items() if k != "J_t"} for v in values], 1e-2)
            assert math.isnan(unknown[0])  # where t moves, rows without J_t give no first law
            assert (run["error"] is None) == (n["t_end"] == 1)
    table = (out / "results.md").read_text()
    assert "| reached t |" in table and "| finetune | 1 | 1, 4 | 30 |" in table
    assert "The paper: dataset: MNIST, digits 0-4 -> 5-9" in table and (out / "fig5.png").stat().st_size > 0


def test_a_work_budget_stops_a_run_and_resume_goes_on(figure, tmp_path, capsys):
    """--max-work stops following once the work counter reaches it (after the start or a step),
    with the trajectory so far; --resume with a larger budget ends where the run without one did."""
    _, out = figure
    args = ["transfer", *TRANSFER, "--method", "iso-c", "--out", str(tmp_path)]
    full = trajectory(out / "iso-c")
    budget = float(full[1]["grad_evals"])  # reached by the first step
    assert main([*args, "--max-work", f"{budget:.0f}"]) == 1
    assert "the work budget of" in capsys.readouterr().err
    assert trajectory(tmp_path / "iso-c") == full[:2]
    assert main([*args, "--resume"]) in (0, 1)
    work = ("grad_evals", "precond_builds")  # a resumed run builds its preconditioner once more
    resumed = trajectory(tmp_path / "iso-c")
    assert [{k: v for k, v in r.items() if k not in work} for r in resumed] == [
        {k: v for k, v in r.items() if k not in work} for r in full
    ]
    assert json.loads((tmp_path / "iso-c" / "config.json").read_text())["max_work"] is None  # as it ran last


def test_a_budget_spent_in_the_polish_stops_the_run_not_as_bad_input(tmp_path, capsys, monkeypatch):
    """A polish that stops short of --grad-tol within --max-work (its L-BFGS held to the budget) is
    the budget spent: exit 1 and nothing recorded, not the exit 2 of a start that cannot be
    polished. (This small problem polishes in a few Newton iterations, so the polish is asked for
    ‖∇θJ‖ ≤ 1e-30 here, which it cannot reach.)"""
    from quasistatic.experiments import runner

    unreachable = runner.polish
    monkeypatch.setattr(runner, "polish", lambda *a, **k: unreachable(*a, **{**k, "grad_tol": 1e-30}))
    args = ["transfer", *TRANSFER, "--method", "iso-c", "--out", str(tmp_path)]
    assert main([*args, "--max-work", "3"]) == 1
    assert "spent in the polish of the start" in capsys.readouterr().err
    assert trajectory(tmp_path / "iso-c") == []
    assert main([*args, "--overwrite"]) == 2  # without a budget: a start that cannot be polished
    assert "must reach equilibrium" in capsys.readouterr().err


def test_fig6_runs_end_to_end_on_cifar10_batches_with_a_resnet18(tmp_path):
    """The paper's CIFAR-10 transfer (vehicles -> animals, a 4-way head, eq. 32 from (4, 100)) with a
    resnet18 of width 2 on synthetic batches: every run has a trajectory, the process stops at its
    work budget after the start (a resnet's engine step costs ~2,500 GE: minutes here)."""
    data_dir = write_batches(tmp_path / "cifar", cifar_batches())
    out = tmp_path / "fig6"
    assert main(["reproduce", "fig6", "--dataset", "cifar10", "--data-dir", str(data_dir), "--model", "resnet18",
                 "--width", "2", "--latent-dim", "2", "--epochs", "1", "--batch-size", "8", "--grad-tol", "1e4",
                 "--max-work", "1", "--no-progress", "--out", str(out)]) == 1
    runs = {run["name"]: run for run in json.loads((out / "results.json").read_text())["runs"]}
    assert list(runs) == ["constant-lambda-rate", "finetune", "scratch"]
    process = runs["constant-lambda-rate"]
    assert "work budget" in process["error"] and process["numbers"]["lam_start"] == 4
    assert process["numbers"]["gamma_start"] == 100
    assert all(runs[b]["numbers"]["t_end"] == 1 and runs[b]["error"] is None for b in ("finetune", "scratch"))
    assert load_checkpoint(out / "finetune" / "start.pt")["model_config"]["num_classes"] == 4
    assert (out / "fig6.png").exists()


@pytest.mark.parametrize("extra, words", [
    (["fig6", "--dataset", "digits"], ["source classes", "vehicles"]),
    (["fig5", "--dataset", "digits", "--param", "target=3-7"], ["disjoint", "3-7"]),
    (["fig5", "--dataset", "digits", "--param", "gamma=-1"], ["gamma", "-1"]),
    (["fig5", "--dataset", "digits", "--max-work", "0"], ["max_work", "0"]),
    (["fig5", "--dataset", "digits", "--max-work", "inf"], ["max_work", "inf"]),
    (["fig5", "--dataset", "digits", "--classes", "0-4"], ["--classes", "source"]),
    (["fig6", "--dataset", "digits", "--lam-end", "2"], ["lam_end", "fig6"]),
])
def test_bad_input_exits_2_naming_the_value_and_writes_nothing(tmp_path, capsys, extra, words):
    out = tmp_path / "out"
    assert main(["reproduce", *extra, "--no-progress", "--out", str(out)]) == 2
    message = capsys.readouterr().err
    assert all(word in message for word in words), message
    assert not out.exists()


def test_the_transfer_figures_are_registered():
    assert {"fig5", "fig6"} <= set(FIGURES.available())
