"""The embedded default data set: scikit-learn's 1797 handwritten digits, 8x8 pixels, no download."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from sklearn.datasets import load_digits as _sklearn_digits

from .base import DataSplit, LabeledData
from .subsets import train_val_split

__all__ = ["load_digits"]


def load_digits(
    data_dir: Path | None = None, *, download: bool = False, seed: int = 0, val_fraction: float = 0.2
) -> DataSplit:
    """The digits as a seeded, stratified train/val split.

    x: (n, 1, 8, 8) float32, pixels / 16 in [0, 1]; y: (n,) int64 in 0..9. The data ship inside
    scikit-learn, so ``data_dir`` and ``download`` are unused (a warning says so when given).
    """
    if data_dir is not None or download:
        warnings.warn(
            "the digits data set ships with scikit-learn: data_dir and download are unused", UserWarning, stacklevel=2
        )
    bunch = _sklearn_digits()
    x = torch.as_tensor(bunch.images / 16.0, dtype=torch.float32).unsqueeze(1)  # (1797, 1, 8, 8)
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    data = LabeledData(x, y, 10, tuple(str(d) for d in range(10)))
    train, val = train_val_split(data, val_fraction, seed)
    return DataSplit(train, val, "digits")
