"""Equilibration: minimize J(θ; λ, γ, t) with Adam under the paper's schedules (Sec. 5.1).

Two learning-rate schedules:
- ``initial``: training from scratch, lr 1e-3 divided by 10 every 50 epochs;
- ``equilibration``: after a change of the controls, η(s) = η_max·(s/T)²(1 − s/T)⁵ normalized so
  that its peak is η_max = 1.5e-3 (s counts minibatch updates since the change, T their total).

Minibatches use the objective's fixed noise, so each step is an unbiased estimate of the same
deterministic J whose equilibrium surface ∇θJ = 0 (eq. 15) the rest of the library tracks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import bad_value, choice_error
from ..thermo.evaluation import measure
from ..thermo.objective import Controls, Objective

__all__ = ["EquilibrationConfig", "DivergenceError", "equilibration_rate", "equilibrate", "SCHEDULES"]

SCHEDULES = ("initial", "equilibration")
_ETA_PEAK = (2 / 7) ** 2 * (5 / 7) ** 5  # max of u²(1 − u)⁵, reached at u = 2/7


class DivergenceError(RuntimeError):
    """The loss became NaN or infinite; the last good state is kept by the caller."""


def equilibration_rate(step: int, total: int, eta_max: float = 1.5e-3) -> float:
    """η(s) = η_max·(s/T)²(1 − s/T)⁵ / max_u u²(1 − u)⁵ (Sec. 5.1), for s = step in [0, T]."""
    u = min(max(step / total, 0.0), 1.0)
    return eta_max * u**2 * (1 - u) ** 5 / _ETA_PEAK


@dataclass(frozen=True)
class EquilibrationConfig:
    """Settings of one equilibration run (defaults: the paper's, scaled to the digits data)."""

    epochs: int = 120  # passes over the (larger part of the) training data
    batch_size: int = 32  # minibatch size (digits: 45 updates per epoch)
    schedule: str = "initial"  # "initial" (from scratch) or "equilibration" (after a control change)
    lr: float = 1e-3  # initial schedule: starting learning rate
    lr_drop_every: int = 50  # initial schedule: epochs between divisions of the rate by 10
    eta_max: float = 1.5e-3  # equilibration schedule: peak learning rate

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise choice_error("schedule", SCHEDULES, self.schedule)
        if self.epochs < 1:
            raise bad_value("epochs", "an integer >= 1", self.epochs)
        if self.batch_size < 1:
            raise bad_value("batch size", "an integer >= 1", self.batch_size)

    def learning_rate(self, epoch: int, step: int, total_steps: int) -> float:
        """The rate for minibatch ``step`` (counted from the run's start) in ``epoch``."""
        if self.schedule == "initial":
            return self.lr / 10 ** (epoch // self.lr_drop_every)
        return equilibration_rate(step, total_steps, self.eta_max)

    def to_dict(self) -> dict:
        return asdict(self)


EpochCallback = Callable[[int, dict[str, float], dict], None]


def equilibrate(
    objective: Objective,
    controls: Controls,
    config: EquilibrationConfig,
    *,
    val: Objective | None = None,
    seed: int = 0,
    start_epoch: int = 0,
    optimizer_state: dict | None = None,
    on_epoch: EpochCallback | None = None,
    progress: bool = True,
) -> Tensor:
    """Train ``objective.model`` in place with Adam; returns the final θ.

    After each epoch, ``on_epoch(epoch, row, optimizer_state)`` receives the measurements of
    :func:`quasistatic.thermo.evaluation.measure` (R, D, C, F, grad_norm, val_C, val_acc); resuming at
    ``start_epoch`` with the saved optimizer state reproduces the uninterrupted run, because each
    epoch's shuffle is seeded by (seed, epoch). Raises :class:`DivergenceError` on a non-finite loss
    before the bad update is applied.
    """
    model = objective.model
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    # the whole data set's count (a rank holds a shard): the schedule is the same on every rank and alone
    steps_per_epoch = math.ceil(max(part.total for part in objective.parts) / config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    bar = tqdm(
        range(start_epoch, config.epochs),
        desc="equilibrate",
        unit="epoch",
        disable=not progress,
        initial=start_epoch,
        total=config.epochs,
    )
    for epoch in bar:
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        for b, index in enumerate(objective.epoch_batches(config.batch_size, generator)):
            step = epoch * steps_per_epoch + b
            for group in optimizer.param_groups:
                group["lr"] = config.learning_rate(epoch, step, total_steps)
            loss = objective.minibatch_value(index, controls)
            if not torch.isfinite(loss):
                raise DivergenceError(
                    f"the loss became {loss.item()} at epoch {epoch + 1}, step {step}; "
                    "try a smaller learning rate or batch of larger size"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with objective.work.paused():  # the per-epoch measurement is bookkeeping, not the method's work
            row = measure(objective, objective.initial_theta(), controls, val)
        bar.set_postfix(
            C=f"{row['C']:.3f}", val_acc=f"{row.get('val_acc', float('nan')):.3f}", grad=f"{row['grad_norm']:.2e}"
        )
        if on_epoch is not None:
            on_epoch(epoch, row, optimizer.state_dict())
    return objective.initial_theta()
