"""The library runner (:func:`quasistatic.run_process`): a run built in Python alone gives the
command line's trajectory, its config.json round-trips to its :class:`~quasistatic.RunConfig`,
``quasistatic rerun`` repeats a run from its config.json, resume refuses a changed config, and
every bad config value is refused before anything is written."""

import argparse
import csv
import hashlib
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

import quasistatic as qs
from quasistatic.cli import main
from small_problem import register_small_dataset

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

SMALL = register_small_dataset()
# tests/test_cli_process.py's fast settings, as flags and as a config
FLAGS = ["--dataset", SMALL, "--hidden", "", "--latent-dim", "1", "--samples", "2", "--sigma", "1e-2",
         "--lam", "1", "--gamma", "4", "--epochs", "30", "--batch-size", "4", "--no-progress",
         "--grad-tol", "1e-9", "--drift-tol", "1e-10", "--tangent-tol", "1e-12", "--lam-end", "1.1", "--steps", "3"]


def small_config(out: Path) -> qs.RunConfig:
    """FLAGS as a RunConfig (the model's input shape and classes are the small data set's)."""
    return qs.RunConfig(
        out=str(out),
        data=qs.DataConfig(dataset=SMALL),
        model=qs.ModelConfig(hidden=(), latent_dim=1, input_shape=(1, 2, 3), num_classes=3),
        start=qs.StartConfig(lam=1.0, gamma=4.0, equilibration=qs.EquilibrationConfig(epochs=30, batch_size=4)),
        process=qs.ProcessConfig("iso-classification", {"lam_end": 1.1}),
        follow=qs.FollowConfig(engine=qs.EngineConfig(steps=3, grad_tol=1e-9, drift_tol=1e-10, tangent_tol=1e-12)),
        samples=2, sigma=1e-2)


def rows_without_wall_time(directory: Path) -> list[dict[str, str]]:
    """trajectory.csv as written, every column but wall_s."""
    with (directory / "trajectory.csv").open(newline="") as f:
        return [{key: value for key, value in row.items() if key != "wall_s"} for row in csv.DictReader(f)]


def tree_hash(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def refuse_argparse(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any parse or Namespace (a fabricated one too) raise, so that a run that passes uses neither."""
    def refused(*args, **kwargs):
        raise AssertionError("argparse used on the library path")

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", refused)
    monkeypatch.setattr(argparse.Namespace, "__init__", refused)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same run from Python (argparse refused while it runs) and from the command line."""
    root = tmp_path_factory.mktemp("runner")
    config = small_config(root / "python")
    with pytest.MonkeyPatch.context() as monkeypatch:
        refuse_argparse(monkeypatch)
        run = qs.run_process(config, progress=False)
    assert main(["iso-classification", *FLAGS, "--out", str(root / "cli")]) == 0
    return config, run, root / "cli"


def test_a_run_from_python_alone_writes_the_command_line_s_trajectory(runs):
    config, run, cli = runs
    assert run.error is None and run.failure is None and run.directory == Path(config.out)
    assert rows_without_wall_time(run.directory) == rows_without_wall_time(cli)
    assert len(run.trajectory) == 4 and float(run.trajectory[-1]["lam"]) == pytest.approx(1.1)
    for name in ("start.pt", "state.pt", "rate_distortion.png", "controls.png", "classification.png",
                 "free_energy.png"):
        assert (run.directory / name).stat().st_size > 0, name
    assert run.figures == [run.directory / name for name in ("rate_distortion.png", "controls.png",
                                                              "classification.png", "free_energy.png")]


def test_the_command_line_makes_the_same_config(runs):
    config, _, cli = runs
    assert qs.RunConfig.from_dict(json.loads((cli / "config.json").read_text())) == replace(config, out=str(cli))


def test_config_json_round_trips(runs):
    config, run, _ = runs
    saved = json.loads((run.directory / "config.json").read_text())
    assert qs.RunConfig.from_dict(saved) == config == run.config
    assert qs.RunConfig.from_dict(config.to_dict()) == config
    assert set(saved) == {*config.to_dict(), "record"}
    assert saved["record"]["process"]["process"] == "IsoClassification"
    assert saved["record"]["data"] == {"name": SMALL, "train": 12, "val": 8}
    assert set(saved["record"]["versions"]) >= {"quasistatic", "torch", "python"}


def test_the_run_plots_where_asked(runs, tmp_path):
    _, run, _ = runs
    figures = run.plot(tmp_path / "figures")
    assert [p.parent for p in figures] == [tmp_path / "figures"] * 4 and all(p.stat().st_size > 0 for p in figures)


def test_rerun_repeats_a_run_from_its_config_json(runs, tmp_path, capsys):
    config, run, _ = runs
    new = tmp_path / "rerun"
    assert main(["rerun", str(run.directory), "--out", str(new), "--no-progress"]) == 0
    assert rows_without_wall_time(new) == rows_without_wall_time(run.directory)
    assert qs.RunConfig.from_dict(json.loads((new / "config.json").read_text())) == replace(config, out=str(new))
    printed = capsys.readouterr().out.splitlines()[0]
    line = run.summary()
    assert line.startswith("iso-classification (engine, hermite/newton): 3 steps, max |g - g0|/g0 = ")
    assert printed.rsplit(",", 1)[0] == line.rsplit(",", 1)[0]  # the command line's line, but its wall time


def test_rerun_into_its_own_directory_needs_overwrite(runs, capsys):
    _, run, _ = runs
    before = tree_hash(run.directory)
    assert main(["rerun", str(run.directory), "--no-progress"]) == 2
    assert "--out must be a new or empty directory (or pass --overwrite" in capsys.readouterr().err
    assert tree_hash(run.directory) == before


def test_resume_goes_on_with_the_same_config_only(runs, tmp_path):
    config, run, _ = runs
    before = tree_hash(run.directory)
    steps = replace(config, follow=replace(config.follow, engine=replace(config.follow.engine, steps=4)))
    with pytest.raises(qs.InputError, match=re.escape("follow.engine.steps must equal the resumed run's 3, got 4")):
        qs.run_process(steps, resume=True, progress=False)
    lam_end = replace(config, process=qs.ProcessConfig("iso-classification", {"lam_end": 1.2}))
    message = "process.params.lam_end must equal the resumed run's 1.1, got 1.2"
    with pytest.raises(qs.InputError, match=re.escape(message)):
        qs.run_process(lam_end, resume=True, progress=False)
    assert tree_hash(run.directory) == before
    old = tmp_path / "old"  # a run directory of the flags' format (equilibrate, transfer) is not a process run's
    old.mkdir()
    (old / "config.json").write_text(json.dumps({"settings": {"lam": 1.0}}))
    with pytest.raises(qs.InputError, match="config.json must be a RunConfig"):
        qs.run_process(replace(config, out=str(old)), resume=True, progress=False)


@pytest.mark.parametrize("make, message", [
    (lambda out: replace(small_config(out), samples=0), "samples must be an integer >= 1, got 0"),
    (lambda out: replace(small_config(out), dtype="float16"), "dtype must be one of {float32, float64}"),
    (lambda out: replace(small_config(out), device="tpu"), "device"),
    (lambda out: replace(small_config(out), process=qs.ProcessConfig("iso-classification", {"lam_end": 1.0})),
     "lam_end must be different from the starting lambda"),
    (lambda out: replace(small_config(out), process=qs.ProcessConfig("iso-classification", {"lam_ned": 1.2})),
     "options of process 'iso-classification' must be among {alpha, lam_end}, got 'lam_ned'"),
    (lambda out: replace(small_config(out), process=qs.ProcessConfig("iso-classification-transfer")),
     "must run on a source/target mixture"),
    (lambda out: replace(small_config(out), imports=("no_such_module_for_quasistatic",)),
     "--import must be a module on the Python path"),
    (lambda out: qs.RunConfig(out, start=qs.StartConfig(lam=-1.0)), "lambda must be a number >= 0, got -1.0"),
    (lambda out: qs.RunConfig(out, process=qs.ProcessConfig("iso-x")), "process must be one of"),
    (lambda out: qs.RunConfig(out, follow=qs.FollowConfig(method="guess")), "method must be one of"),
    (lambda out: qs.RunConfig(out, follow=qs.FollowConfig(integrator="rk5")), "integrator must be one of"),
    (lambda out: qs.RunConfig(out, follow=qs.FollowConfig(corrector_options={"max_iters": 3})),
     "options of corrector 'newton' must be among"),
    (lambda out: qs.RunConfig(out, data=qs.DataConfig(dataset="no-such-data")), "dataset must be one of"),
    (lambda out: qs.RunConfig(out, model=qs.ModelConfig(architecture="no-such-model")), "model must be one of"),
    (lambda out: qs.RunConfig(out, process=qs.ProcessConfig(return_sweep=True, params={"alpha": 0.5})),
     "--return must be given with --lam-end"),
    (lambda out: qs.RunConfig.from_dict({"out": str(out), "follow": {"engine": {"steps": 0}}}),
     "steps must be an integer >= 1, got 0"),
    (lambda out: qs.RunConfig.from_dict({"out": str(out), "start": {"lam": 1.0, "epochs": 3}}),
     "keys of run config start must be among {lam, gamma, checkpoint, equilibration}, got ['epochs']"),
    (lambda out: qs.RunConfig.from_dict({"data": {}}), "run config must be a mapping with the keys {out}, got ['data']"),
    (lambda out: qs.RunConfig.from_dict({"out": str(out), "imports": "plugin"}),
     "imports must be a sequence of module names, got 'plugin'"),
])
def test_a_bad_config_value_raises_and_writes_nothing(tmp_path, make, message):
    out = tmp_path / "bad"
    with pytest.raises(qs.InputError, match=re.escape(message)):
        qs.run_process(make(out), progress=False)
    assert not out.exists()


def test_rerun_of_a_bad_config_exits_2_and_writes_nothing(runs, tmp_path, capsys):
    _, run, _ = runs
    saved = json.loads((run.directory / "config.json").read_text())
    saved["follow"]["engine"]["steps"] = 0
    bad = tmp_path / "bad-config"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(saved))
    new = tmp_path / "new"
    assert main(["rerun", str(bad), "--out", str(new), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("quasistatic: error:") and "steps must be an integer >= 1, got 0" in err and "\n" not in err
    assert not new.exists()
    assert main(["rerun", str(tmp_path / "nothing"), "--out", str(new)]) == 2
    assert "DIR must be a run directory with a config.json" in capsys.readouterr().err
    assert not new.exists()


def test_the_library_s_defaults_are_the_command_line_s(monkeypatch, tmp_path):
    from quasistatic.cli import process_command

    made = []

    def capture(config, **options):
        made.append(config)
        raise qs.InputError("captured")

    monkeypatch.setattr(process_command, "run_process", capture)
    out = tmp_path / "x"
    assert main(["iso-classification", "--lam-end", "1.2", "--out", str(out)]) == 2
    assert made == [qs.RunConfig(out=out, process=qs.ProcessConfig(params={"lam_end": 1.2}))]
