"""Data sets by name: ``load_dataset("mnist", classes="0-4")`` and a public :func:`register_dataset`."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from ..registry import Registry
from .base import DataSplit
from .cifar10 import load_cifar10
from .digits import load_digits
from .mnist import load_mnist
from .subsets import check_split_args, parse_classes, select_classes

__all__ = ["Loader", "DATASETS", "available_datasets", "load_dataset", "register_dataset"]


class Loader(Protocol):
    """Loads one data set as a seeded train/val split of its training pool (all classes)."""

    def __call__(self, data_dir: Path | None, *, download: bool, seed: int, val_fraction: float) -> DataSplit: ...


DATASETS: Registry[DataSplit] = Registry("dataset")  # name -> Loader
DATASETS.register("digits", load_digits)
DATASETS.register("mnist", load_mnist)
DATASETS.register("cifar10", load_cifar10)


def register_dataset(name: str, loader: Loader, *, replace: bool = False) -> None:
    """Make ``loader`` available as ``load_dataset(name, ...)``; a taken name is refused unless ``replace``."""
    DATASETS.register(name, loader, replace=replace)


def available_datasets() -> list[str]:
    """The registered data set names, sorted."""
    return DATASETS.available()


def load_dataset(
    name: str,
    *,
    data_dir: Path | str | None = None,
    classes: str | Sequence[int] | None = None,
    relabel: bool = False,
    seed: int = 0,
    val_fraction: float = 0.2,
    download: bool = False,
) -> DataSplit:
    """The seeded, stratified train/val split of data set ``name``, restricted to ``classes``.

    The split is made over all classes first, so that class subsets of one data set (e.g. "0-4"
    and "5-9") come from one partition; ``classes`` (see :func:`parse_classes`) then selects, and
    ``relabel`` maps the chosen classes to 0..k-1 (see :func:`select_classes`).
    """
    loader = DATASETS.get(name)
    check_split_args(seed, val_fraction)  # before a possibly long load or download
    split = loader(
        None if data_dir is None else Path(data_dir).expanduser(),
        download=download,
        seed=seed,
        val_fraction=val_fraction,
    )
    if classes is None:
        if relabel:
            warnings.warn(
                "relabel=True without classes changes nothing: all labels are kept", UserWarning, stacklevel=2
            )
        return split
    chosen = parse_classes(classes, name, split.train.num_classes)
    return DataSplit(
        select_classes(split.train, chosen, relabel), select_classes(split.val, chosen, relabel), split.name
    )
