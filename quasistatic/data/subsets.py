"""Subsets of a data set: the seeded train/validation split and the label subsets.

Every loader splits its training pool with :func:`train_val_split` (seeded, stratified by label,
examples kept in their original order); :func:`load_dataset` then keeps the classes that
:func:`parse_classes` reads from a spec such as ``"0-4"`` with :func:`select_classes`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from ..errors import bad_value
from .base import LabeledData

__all__ = ["CIFAR10_CLASSES", "NAMED_CLASSES", "check_split_args", "parse_classes", "select_classes", "train_val_split"]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# Class names a spec may use, per data set: each name stands for a tuple of labels.
NAMED_CLASSES: dict[str, dict[str, tuple[int, ...]]] = {
    "cifar10": {
        **{name: (label,) for label, name in enumerate(CIFAR10_CLASSES)},
        "vehicles": (0, 1, 8, 9),  # airplane, automobile, ship, truck
        "animals": (2, 3, 4, 5),  # bird, cat, deer, dog
    },
}

_RANGE = re.compile(r"(\d+)-(\d+)")


def check_split_args(seed: int, val_fraction: float) -> None:
    """Raise unless ``seed`` is an int in 0..2**32 - 1 and ``val_fraction`` lies strictly in (0, 1)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise bad_value("seed", "an int in 0..2**32 - 1", seed)
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise bad_value("val_fraction", "a number strictly between 0 and 1", val_fraction)


def train_val_split(data: LabeledData, val_fraction: float, seed: int) -> tuple[LabeledData, LabeledData]:
    """Split ``data`` into (train, val), stratified by label and seeded by ``seed``.

    ``val_fraction`` of the examples of each class go to val (rounded by scikit-learn's
    ``train_test_split``); both parts keep the original order of the examples.
    """
    check_split_args(seed, val_fraction)
    labels = data.y.numpy()
    try:
        train_idx, val_idx = train_test_split(
            np.arange(len(data)), test_size=val_fraction, stratify=labels, random_state=seed
        )
    except ValueError as err:  # a class too small to appear in both parts
        raise bad_value(
            "val_fraction",
            f"such that each class of the {len(data)} examples appears in both train and val ({err})",
            val_fraction,
        ) from err
    return (data.subset(torch.from_numpy(np.sort(train_idx))), data.subset(torch.from_numpy(np.sort(val_idx))))


def _accepted_forms(dataset: str, num_classes: int) -> str:
    """The accepted class specs, for error messages."""
    forms = "a range like '0-4', a list like '0,2,7', a single class like '3'"
    names = NAMED_CLASSES.get(dataset)
    if names:
        forms += f", or {dataset} names ({', '.join(names)})"
    return f"{forms}; classes in 0..{num_classes - 1}, each at most once"


def _parse_token(token: str, dataset: str, accepted: str, spec: str) -> tuple[int, ...]:
    """The labels one comma-separated token of a class spec stands for."""
    token = token.strip().lower()
    if token.isdigit():
        return (int(token),)
    match = _RANGE.fullmatch(token.replace(" ", ""))
    if match:
        first, last = int(match[1]), int(match[2])
        if first > last:
            raise bad_value("classes", f"{accepted} (a range must go up, got {token!r})", spec)
        return tuple(range(first, last + 1))
    named = NAMED_CLASSES.get(dataset, {})
    if token in named:
        return named[token]
    raise bad_value("classes", f"{accepted} (cannot read {token!r})", spec)


def parse_classes(spec: str | Sequence[int] | None, dataset: str, num_classes: int) -> tuple[int, ...]:
    """The labels selected by ``spec``, in the order given.

    ``spec`` is None (all classes), a sequence of ints, or a string of comma-separated tokens, each
    an integer (``"3"``), an inclusive range (``"0-4"``) or, for data sets in ``NAMED_CLASSES``, a
    class or group name (CIFAR-10: ``"cat"``, ``"vehicles"``, ``"animals"``).
    """
    accepted = _accepted_forms(dataset, num_classes)
    if spec is None:
        return tuple(range(num_classes))
    if isinstance(spec, str):
        if not spec.strip():
            raise bad_value("classes", accepted, spec)
        classes = tuple(c for token in spec.split(",") for c in _parse_token(token, dataset, accepted, spec))
    else:
        classes = tuple(spec)
        if not all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in classes):
            raise bad_value("classes", f"{accepted} (a sequence must hold ints)", spec)
        classes = tuple(int(c) for c in classes)
    if not classes:
        raise bad_value("classes", f"{accepted} (at least one class)", spec)
    if not all(0 <= c < num_classes for c in classes):
        raise bad_value("classes", f"{accepted} (out of range)", spec)
    if len(set(classes)) != len(classes):
        raise bad_value("classes", f"{accepted} (duplicate class)", spec)
    return classes


def select_classes(data: LabeledData, classes: Sequence[int], relabel: bool) -> LabeledData:
    """The examples of ``data`` whose label is in ``classes``, in their original order.

    relabel=True maps ``classes[i]`` to label i (num_classes = len(classes), class names follow);
    relabel=False keeps the labels, ``num_classes`` and ``class_names`` of ``data``, so that two
    subsets of one data set share a label space (as the data mixture of eq. 23 needs).
    """
    classes = parse_classes(classes, "", data.num_classes)
    wanted = torch.tensor(classes, dtype=torch.int64)
    kept = data.subset(torch.nonzero(torch.isin(data.y, wanted)).flatten())
    if not relabel:
        return kept
    new_label = torch.zeros(data.num_classes, dtype=torch.int64)
    new_label[wanted] = torch.arange(len(classes))
    return LabeledData(kept.x, new_label[kept.y], len(classes), tuple(data.class_names[c] for c in classes))
