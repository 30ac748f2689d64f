"""`quasistatic reproduce`: a figure's runs are the process command's runs (in parallel processes
too), results.json/results.md are written from their trajectories, a partial figure resumes,
and bad input exits 2."""

import csv
import json

import pytest

from quasistatic.cli import main
from quasistatic.experiments.reproduce import FIGURES
from small_problem import register_small_dataset

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

SMALL = register_small_dataset()
# the small data set again in the spawned workers of --jobs 2: a module that registers it
REGISTERING_MODULE = "from small_problem import register_small_dataset\nregister_small_dataset()\n"
COMMON = ["--dataset", SMALL, "--hidden", "", "--latent-dim", "1", "--samples", "2", "--sigma", "1e-2",
          "--epochs", "30", "--batch-size", "4", "--no-progress", "--steps", "2",
          "--grad-tol", "1e-9", "--drift-tol", "1e-10", "--tangent-tol", "1e-12"]
FIGURE = ["--lam", "1", "--lam-end", "1.1", "--param", "gammas=3,4"]


def trajectory(path):
    with (path / "trajectory.csv").open() as f:
        return [{k: v for k, v in row.items() if k != "wall_s"} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def figure(tmp_path_factory):
    root = tmp_path_factory.mktemp("fig")
    (root / "small_figure_data.py").write_text(REGISTERING_MODULE)
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(root))
        out = root / "fig2"
        code = main(["--import", "small_figure_data", "reproduce", "fig2", *COMMON, *FIGURE, "--jobs", "2",
                     "--out", str(out)])
    return code, out, root


def test_the_figures_runs_are_the_process_commands_runs_in_parallel_processes(figure, tmp_path):
    code, out, _ = figure
    assert code == 0
    for gamma in ("3", "4"):
        single = tmp_path / gamma
        assert main(["iso-classification", *COMMON, "--lam", "1", "--gamma", gamma, "--lam-end", "1.1",
                     "--out", str(single)]) == 0
        assert trajectory(out / f"gamma{gamma}") == trajectory(single)


def test_results_are_written_from_the_trajectories(figure):
    _, out, _ = figure
    results = json.loads((out / "results.json").read_text())
    assert [run["name"] for run in results["runs"]] == ["gamma3", "gamma4"]
    assert results["machine"]["jobs"] == 2 and "reproduce fig2" in results["command"]
    for run in results["runs"]:
        numbers = run["numbers"]
        with (out / run["name"] / "trajectory.csv").open() as f:
            rows = list(csv.DictReader(f))
        assert numbers["lam_end"] == pytest.approx(1.1) and numbers["steps"] == len(rows) - 1
        assert numbers["grad_evals"] == float(rows[-1]["grad_evals"]) and run["error"] is None
        c = [float(r["C"]) for r in rows]
        assert numbers["max_drift"] == pytest.approx(max(abs(x - c[0]) for x in c) / c[0])
        assert numbers["max_drift"] <= 1e-8 and numbers["first_law"] <= 0.02
        assert json.loads((out / run["name"] / "results.json").read_text())["numbers"] == numbers
    table = (out / "results.md").read_text()
    assert "| gamma3 | 1.1 |" in table and "The paper: dataset: MNIST" in table
    assert (out / "fig2.png").stat().st_size > 0


def test_a_partial_figure_resumes_only_the_missing_run(figure, tmp_path):
    _, out, root = figure
    copy = tmp_path / "fig2"
    import shutil

    shutil.copytree(out, copy)
    shutil.rmtree(copy / "gamma4")
    kept = (copy / "gamma3" / "trajectory.csv").read_text()
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(root))
        assert main(["--import", "small_figure_data", "reproduce", "fig2", *COMMON, *FIGURE, "--resume",
                     "--out", str(copy)]) == 0
    assert (copy / "gamma3" / "trajectory.csv").read_text() == kept  # resumed at its end: nothing redone
    assert trajectory(copy / "gamma4") == trajectory(out / "gamma4")


@pytest.mark.parametrize("extra, words", [
    (["fig99"], ["figure", "fig99", "fig2", "fig4"]),
    (["fig2", "--gamma", "4"], ["--gamma", "gammas"]),
    (["fig2", "--jobs", "0"], ["--jobs", "0"]),
    (["fig2", "--param", "gammas=4,x"], ["gammas", "4,x"]),
    (["fig2", "--param", "width=3"], ["width", "lam", "lam_end", "gammas"]),
    (["fig2", "--from-checkpoint", "start.pt"], ["--from-checkpoint"]),
])
def test_bad_input_exits_2_naming_the_value_and_writes_nothing(tmp_path, capsys, extra, words):
    out = tmp_path / "out"
    assert main(["reproduce", *extra, *COMMON, "--out", str(out)]) == 2
    message = capsys.readouterr().err
    assert all(word in message for word in words), message
    assert not out.exists()


def test_a_figure_whose_data_set_is_absent_exits_2_naming_the_files_and_writes_nothing(tmp_path, capsys):
    out, nowhere = tmp_path / "out", tmp_path / "nowhere"
    assert main(["reproduce", "fig2", *COMMON, "--dataset", "mnist", "--data-dir", str(nowhere), "--out", str(out)]) == 2
    message = capsys.readouterr().err
    assert all(word in message for word in ("mnist", str(nowhere), "train-images-idx3-ubyte", "t10k-images-idx3-ubyte"))
    assert message.count("\n") == 1 and not out.exists()


def test_the_figures_are_registered():
    assert {"fig2", "fig4"} <= set(FIGURES.available())


def test_a_stopped_run_is_a_row_with_where_and_why():
    from quasistatic.experiments.reproduce import results_table

    numbers = {"lam_end": 0.3731, "gamma_end": 10.01, "steps": 15, "jumps": 1, "dissipation": 0.0112,
               "max_drift": 5.6e-8, "first_law": 3e-3, "val_acc_start": 0.964, "val_acc_min": 0.964,
               "val_acc_max": 0.969, "grad_evals": 29897.0}
    error = ("fold of the equilibrium branch located at lambda=0.3730829, gamma=10.01, t=0 (s=0.49 +- 5.8e-03; "
             "lambda_min of the Hessian -3.2e-07 at the last accepted s=0.49, extrapolated to 0): the jump past "
             "it failed: the constraint could not be re-imposed (|grad J| = 3.8e-04); the trajectory so far is "
             "in run/trajectory.csv, the fold in run/fold.json")
    results = {"figure": "Fig. 2", "command": "quasistatic reproduce fig2", "wall_s": 1.0,
               "machine": {"cpus": 2, "jobs": 1, "threads_per_job": 1, "platform": "p", "torch": "t"},
               "runs": [{"name": "gamma10", "numbers": numbers, "error": error, "wall_s": 478.0}], "paper": {}}
    row = results_table(results).splitlines()[6]
    assert row.startswith("| gamma10 | 0.3731 |")
    assert row.endswith("| fold at λ 0.3730829: the jump past it failed: the constraint could not be re-imposed "
                        "(\\|grad J\\| = 3.8e-04) |")


def test_a_run_that_raises_is_reported_and_the_others_are_kept(tmp_path, capsys):
    out = tmp_path / "fig2"
    (out / "gamma3").mkdir(parents=True)
    (out / "gamma3" / "mine.txt").write_text("not a run")  # a folder that is not a run: that run refuses it
    assert main(["reproduce", "fig2", *COMMON, *FIGURE, "--out", str(out)]) == 1
    results = json.loads((out / "results.json").read_text())
    failed, done = results["runs"]
    assert failed["name"] == "gamma3" and failed["numbers"] == {} and "InputError" in failed["error"]
    assert done["name"] == "gamma4" and done["error"] is None and done["numbers"]["lam_end"] == pytest.approx(1.1)
    assert (out / "gamma3" / "mine.txt").read_text() == "not a run" and (out / "fig2.png").exists()
    assert "gamma3: InputError" in capsys.readouterr().err
