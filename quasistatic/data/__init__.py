"""Data: the in-memory containers, the loaders by name, label subsets and the data mixture (eq. 23)."""

from __future__ import annotations

from .base import DataSplit, LabeledData
from .registry import DATASETS, available_datasets, load_dataset, register_dataset
from .subsets import parse_classes
from .mixture import DataMixture  # last: written separately, needs only .base

__all__ = [
    "LabeledData",
    "DataSplit",
    "DATASETS",
    "load_dataset",
    "register_dataset",
    "available_datasets",
    "parse_classes",
    "DataMixture",
]
