"""Tests of quasistatic.continuation.equilibrate: the paper's two learning-rate schedules (Sec. 5.1), that a short
run lowers the full-batch J, and that a non-finite loss stops the run before the bad update."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from quasistatic import (Controls, EquilibrationConfig, LabeledData, ModelConfig, Objective, build_model,
                         equilibrate, equilibration_rate, load_dataset)
from quasistatic.continuation.equilibrate import DivergenceError
from quasistatic.errors import InputError

CONTROLS = Controls(1.0, 10.0)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


def small_objective(data: LabeledData, seed: int = 0) -> Objective:
    model = build_model(ModelConfig(input_shape=data.input_shape, num_classes=data.num_classes,
                                    hidden=(16, 16)), seed=seed)
    return Objective(model, data, samples=1, noise_seed=seed)


# ---------------------------------------------------------------- schedules

def closed_form_rate(step: int, total: int, eta_max: float) -> float:
    """η_max·u²(1 − u)⁵ / max_u u²(1 − u)⁵ with the peak value 2²·5⁵/7⁷ computed exactly."""
    peak = Fraction(2, 7) ** 2 * Fraction(5, 7) ** 5
    assert peak == Fraction(12500, 823543)
    u = Fraction(step, total)
    return float(eta_max * (u**2 * (1 - u) ** 5 / peak))


@pytest.mark.parametrize("eta_max", [1.5e-3, 0.2])
def test_equilibration_rate_peaks_at_eta_max_at_two_sevenths(eta_max):
    total = 700
    rates = [equilibration_rate(s, total, eta_max) for s in range(total + 1)]
    assert rates[0] == 0.0 and rates[-1] == 0.0
    assert max(range(total + 1), key=rates.__getitem__) == 200  # s/T = 2/7
    assert rates[200] == pytest.approx(eta_max, rel=1e-14, abs=0)
    assert equilibration_rate(2, 7, eta_max) == pytest.approx(eta_max, rel=1e-14, abs=0)
    for s in range(0, total + 1, 7):
        assert rates[s] == pytest.approx(closed_form_rate(s, total, eta_max), rel=1e-12, abs=1e-300)


def test_equilibration_rate_default_peak_is_the_papers():
    assert equilibration_rate(2, 7) == pytest.approx(1.5e-3, rel=1e-14, abs=0)
    assert EquilibrationConfig().eta_max == 1.5e-3


def test_initial_schedule_divides_by_ten_every_fifty_epochs():
    config = EquilibrationConfig(schedule="initial")
    assert config.lr == 1e-3
    for epoch, expected in [(0, 1e-3), (49, 1e-3), (50, 1e-4), (99, 1e-4), (100, 1e-5), (119, 1e-5)]:
        for step in (0, 17, 10_000):  # the initial schedule ignores the step
            assert config.learning_rate(epoch, step, 5400) == pytest.approx(expected, rel=1e-12)


def test_equilibration_schedule_of_the_config():
    config = EquilibrationConfig(schedule="equilibration", eta_max=2e-3)
    for step in (0, 1, 100, 350, 699, 700):
        assert config.learning_rate(step // 45, step, 700) == pytest.approx(
            closed_form_rate(step, 700, 2e-3), rel=1e-12, abs=1e-300)


@pytest.mark.parametrize("kwargs, match", [
    ({"schedule": "cosine"}, r"schedule must be one of \{equilibration, initial\}, got 'cosine'"),
    ({"epochs": 0}, r"epochs must be an integer >= 1, got 0"),
    ({"batch_size": -3}, r"batch size must be an integer >= 1, got -3"),
])
def test_config_rejects_bad_settings(kwargs, match):
    with pytest.raises(InputError, match=match):
        EquilibrationConfig(**kwargs)


# ---------------------------------------------------------------- training

def test_short_run_lowers_full_batch_j(digits):
    objective = small_objective(digits.train)
    theta0 = objective.initial_theta()
    with torch.no_grad():
        j0 = float(objective.value(theta0, CONTROLS))
    epochs, rows = [], []
    theta = equilibrate(objective, CONTROLS, EquilibrationConfig(epochs=2, batch_size=64), seed=0,
                        on_epoch=lambda e, row, opt: (epochs.append(e), rows.append(row)), progress=False)
    with torch.no_grad():
        j1 = float(objective.value(theta, CONTROLS))
    assert j1 < j0 - 1.0, (j0, j1)
    assert torch.equal(theta, objective.initial_theta())  # the returned θ is the model's
    assert epochs == [0, 1]
    assert set(rows[-1]) == {"R", "D", "C", "S", "F", "grad_norm"}
    assert rows[-1]["F"] == pytest.approx(j1, rel=1e-5)


def test_resuming_from_saved_optimizer_state_reproduces_the_run(digits):
    config = EquilibrationConfig(epochs=3, batch_size=128)
    straight = small_objective(digits.train)
    equilibrate(straight, CONTROLS, config, seed=3, progress=False)

    saved = {}

    def keep(epoch, row, optimizer_state):
        if epoch == 0:
            saved["theta"] = resumed.initial_theta()
            saved["optimizer"] = {k: (v if k != "state" else {i: {n: t.clone() for n, t in s.items()}
                                                              for i, s in v.items()})
                                  for k, v in optimizer_state.items()}
            raise KeyboardInterrupt

    resumed = small_objective(digits.train)
    with pytest.raises(KeyboardInterrupt):
        equilibrate(resumed, CONTROLS, config, seed=3, on_epoch=keep, progress=False)
    fresh = small_objective(digits.train)  # same noise; its parameters are overwritten
    fresh.layout.write(fresh.model, saved["theta"])
    theta = equilibrate(fresh, CONTROLS, config, seed=3, start_epoch=1, optimizer_state=saved["optimizer"],
                        progress=False)
    assert torch.equal(theta, straight.initial_theta())


def _watch_minibatches(objective: Objective) -> list[torch.Tensor]:
    """Record θ each time a minibatch loss is evaluated (just before the update it would feed)."""
    seen: list[torch.Tensor] = []
    original = objective.minibatch_value

    def watched(index, controls):
        seen.append(objective.initial_theta())
        return original(index, controls)

    objective.minibatch_value = watched
    return seen


def test_nan_data_raises_before_any_update(digits):
    data = digits.train
    objective = small_objective(LabeledData(torch.full_like(data.x, float("nan")), data.y, data.num_classes,
                                            data.class_names))
    theta0 = objective.initial_theta()
    seen = _watch_minibatches(objective)
    called = []
    with pytest.raises(DivergenceError, match=r"the loss became nan at epoch 1, step 0"):
        equilibrate(objective, CONTROLS, EquilibrationConfig(epochs=2, batch_size=64),
                    on_epoch=lambda *a: called.append(a), progress=False)
    assert len(seen) == 1 and not called
    assert torch.equal(objective.initial_theta(), theta0)


def test_absurd_learning_rate_raises_before_the_bad_update(digits):
    objective = small_objective(digits.train)
    theta0 = objective.initial_theta()
    seen = _watch_minibatches(objective)
    with pytest.raises(DivergenceError, match=r"the loss became (nan|inf|-inf) at epoch 1, step [1-9]"):
        equilibrate(objective, CONTROLS, EquilibrationConfig(epochs=2, batch_size=64, lr=1e30), progress=False)
    theta = objective.initial_theta()
    assert len(seen) >= 2
    assert torch.isfinite(theta).all()
    assert not torch.equal(theta, theta0)  # the good updates were applied ...
    assert torch.equal(theta, seen[-1])  # ... but not the one from the non-finite loss
