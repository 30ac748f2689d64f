"""The per-step measurements every run records: R, D, C, F, validation C and accuracy, ‖∇θJ‖."""

from __future__ import annotations

import torch
from torch import Tensor

from .objective import Controls, Objective

__all__ = ["measure"]


def measure(train: Objective, theta: Tensor, controls: Controls, val: Objective | None = None) -> dict[str, float]:
    """R, D, C, S and F = R + λD + γC + σS on the training objective at θ (nats per example), the
    equilibrium residual ‖∇θJ‖ (eq. 15), and on ``val`` (when given) val_C and val_acc, the
    accuracy of the classifier at the encoder mean."""
    theta = theta.detach()
    values = train.report(theta, controls.t)
    row = {
        "R": values.R,
        "D": values.D,
        "C": values.C,
        "S": values.S,
        "F": values.free_energy(controls.lam, controls.gamma),
        "grad_norm": float(torch.linalg.vector_norm(train.gradient(theta, controls))),
    }
    if val is not None:
        row["val_C"] = val.report(theta, controls.t).C
        row["val_acc"] = val.accuracy(theta, controls.t)
    return row
