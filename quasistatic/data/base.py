"""The in-memory data containers every loader returns.

A loader gives a :class:`DataSplit` of two :class:`LabeledData`: tensors that live in memory,
small enough to evaluate the objective on all of them (full-batch J, as the curvature code needs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["LabeledData", "DataSplit"]


@dataclass(frozen=True)
class LabeledData:
    """Images and integer labels.

    x: (n, channels, height, width) float32; pixels in [0, 1] (Bernoulli decoder) for digits and
       MNIST, per-channel standardized for CIFAR-10 (Gaussian decoder).
    y: (n,) int64 labels in 0..num_classes-1.
    num_classes: size of the classifier head these labels are meant for.
    class_names: the name of each label value, e.g. ("0", ..., "9") or ("bird", "cat", ...).
    """

    x: Tensor
    y: Tensor
    num_classes: int
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def subset(self, index: Tensor) -> "LabeledData":
        """The examples at ``index`` (a 1-D long tensor), same label space."""
        return LabeledData(self.x[index], self.y[index], self.num_classes, self.class_names)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "LabeledData":
        """A copy with x on ``device`` in ``dtype`` (labels stay int64)."""
        return LabeledData(
            self.x.to(device=device, dtype=dtype), self.y.to(device=device), self.num_classes, self.class_names
        )


@dataclass(frozen=True)
class DataSplit:
    """A seeded train/validation split of one data set (after label subsetting)."""

    train: LabeledData
    val: LabeledData
    name: str  # e.g. "digits", "mnist", "cifar10"
