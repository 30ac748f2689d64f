"""The bookkeeping of benchmarks/bench_scaling.py: its case plan, unit costs (work counted per call),
fits, speed-ups and tables. Nothing is timed against a target and no process is spawned."""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

import quasistatic as qs

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_scaling.py"


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    """The benchmark script as a module (in sys.modules while the tests run: its dataclasses need it)."""
    spec = importlib.util.spec_from_file_location("bench_scaling", PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    sys.path.insert(0, str(PATH.parent))  # as when run as a script: its folder's modules (machine.py) import
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]
        sys.path.remove(str(PATH.parent))


def arguments(**changes: Any) -> argparse.Namespace:
    defaults = dict(
        fractions=[0.25, 1.0],
        mnist_examples=[2000, 8000],
        width=16,
        widths=[16, 64],
        width_data=("mnist", 2000),
        ranks=[1, 2],
        engine_steps=3,
    )
    return argparse.Namespace(**{**defaults, **changes})


def test_plan_dedupes_and_skips_absent_data(bench: ModuleType) -> None:
    cases = bench.plan(arguments(), {"digits": 1437, "mnist": 8000})
    assert [c.name for c in cases] == [
        "digits-359-w16",
        "digits-1437-w16",
        "mnist-2000-w16",  # also the first width case
        "mnist-8000-w16",
        "mnist-2000-w64",
    ]
    assert [c.runs_engine for c in cases] == [True, True, False, False, False]
    assert [c.name for c in bench.plan(arguments(engine_steps=0), {"digits": 1437})] == [
        "digits-359-w16",
        "digits-1437-w16",
    ]
    with pytest.raises(SystemExit):
        bench.plan(arguments(mnist_examples=[9000]), {"digits": 1437, "mnist": 8000})


def test_unit_costs_count_the_work_of_one_call(bench: ModuleType) -> None:
    split = qs.load_dataset("digits", seed=0)
    train = split.train.subset(torch.arange(64))
    config = qs.ModelConfig(hidden=(8,), input_shape=train.input_shape, num_classes=train.num_classes)
    objective = qs.Objective(qs.build_model(config, seed=0).to(torch.float64), train, sigma=bench.SIGMA)
    settings = bench.Settings(
        mnist_dir="",
        epochs=1,
        reps=2,
        columns=2,
        cg_iterations=3,
        preconditioner="kfac",
        engine_steps=0,
        start_epochs=1,
        start_prefix="",
    )
    units = bench.unit_costs(objective, settings)
    assert {name: unit["grad_evals"] for name, unit in units.items()} == {
        "gradient": 1,
        "hvp": 2,
        "operator": 3,  # the pullback and the block
        "cg": 2 * (3 + 1),  # the iterations and the exact residual
    }
    for unit in units.values():
        assert len(unit["samples_s"]) == 2 and unit["seconds"] > 0
        assert unit["all_reduce_s"] == 0 and unit["all_reduces"] == 0
    assert units["cg"]["seconds_per_iteration"] == pytest.approx(units["cg"]["seconds"] / 4)


def result(dataset: str, examples: int, width: int, ranks: int, scale: float, engine: bool = False) -> dict[str, Any]:
    """A measurement whose seconds per GE are ``scale`` for every unit."""
    unit = {"seconds": scale, "seconds_per_iteration": scale, "seconds_per_grad_eval": scale}
    found: dict[str, Any] = {
        "dataset": dataset,
        "examples": examples,
        "width": width,
        "parameters": 100 * width,
        "ranks": ranks,
        "units": {name: {**unit, "all_reduce_fraction": 0.1 * (ranks - 1)} for name in bench_units()},
    }
    if engine:
        found["engine"] = {
            "steps": 3,
            "seconds_per_step": 1.0,
            "grad_evals_per_step": 100,
            "seconds_per_grad_eval": scale,
            "all_reduce_fraction": 0.0,
            "all_reduces_per_step": 0,
        }
    return found


def bench_units() -> tuple[str, ...]:
    return ("gradient", "hvp", "operator", "cg")


def test_fits_speed_ups_and_tables(bench: ModuleType) -> None:
    assert tuple(bench.UNITS) == bench_units()
    results = [
        # digits: s/GE ∝ examples^0.5; mnist: ∝ examples; widths: ∝ parameters^0.25
        *(result("digits", n, 16, 1, 1e-3 * math.sqrt(n), engine=True) for n in (100, 400)),
        *(result("mnist", n, 16, 1, 1e-6 * n) for n in (1000, 4000)),
        result("mnist", 1000, 256, 1, 1e-3 * 16**0.25),
        result("mnist", 1000, 16, 2, 0.5e-3),
    ]
    bench.attach_speed_ups(results)
    assert results[-1]["speed_up"] == {name: pytest.approx(2.0) for name in bench_units()}
    rows = {(row["fit"], row["ranks"]): row for row in bench.fits(results, 16, ("mnist", 1000))}
    assert set(rows) == {("digits examples", 1), ("mnist examples", 1), ("mnist 1000: parameters", 1)}
    assert rows["digits examples", 1]["engine"] == pytest.approx(0.5)
    assert rows["mnist examples", 1]["cg"] == pytest.approx(1.0)
    assert rows["mnist examples", 1]["engine"] is None
    assert rows["mnist 1000: parameters", 1]["hvp"] == pytest.approx(0.25)
    assert bench.log_slope([(10, 1.0)]) is None
    assert len(bench.unit_table(results, 3)) == 2 + len(results)
    assert len(bench.engine_table(results)) == 2 + 2
    assert "2.00× / 2.00× / 2.00× / 2.00×" in bench.unit_table(results, 3)[-1]
