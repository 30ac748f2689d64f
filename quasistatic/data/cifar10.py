"""CIFAR-10 from the python-pickle batches or their tar.gz archive, optionally downloaded.

The validation split is taken from the five training batches; the test batch stays out of it.
Pixels are standardized per channel with the mean and standard deviation of the train split.
"""

from __future__ import annotations

import pickle
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from ..errors import bad_value
from .base import DataSplit, LabeledData
from .download import download as download_file
from .subsets import CIFAR10_CLASSES, train_val_split

__all__ = ["ARCHIVE", "ARCHIVE_SHA256", "MIRRORS", "load_cifar10", "read_batches"]

MIRRORS = ("https://www.cs.toronto.edu/~kriz/",)
ARCHIVE = "cifar-10-python.tar.gz"
# SHA-256 of the official archive, as in keras (datasets/cifar10.py) and torchvision's prototype
# datasets (cifar.py); the CIFAR page publishes its MD5, c58f30108f718f92721af3b95e74349a.
ARCHIVE_SHA256 = "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"
BATCH_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_BATCH_FORMAT = "a pickled dict with b'data' (N x 3072 uint8) and b'labels' (N labels in 0..9)"


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists and numpy arrays only, so a batch file cannot run code."""

    _ALLOWED = {
        ("_codecs", "encode"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        return super().find_class(module, name)


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The (N, 3072) uint8 pixels and (N,) int64 labels of one batch file, checked."""
    try:
        with open(path, "rb") as stream:
            batch = _BatchUnpickler(stream, encoding="bytes").load()
    except Exception as err:  # unpickling malformed bytes can raise almost any exception
        raise bad_value(f"CIFAR-10 batch {path}", _BATCH_FORMAT, f"{type(err).__name__}: {err}") from err
    if not isinstance(batch, dict) or not {b"data", b"labels"} <= batch.keys():
        got = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise bad_value(f"CIFAR-10 batch {path}", _BATCH_FORMAT, f"keys {got}")
    data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise bad_value(f"CIFAR-10 batch {path}", _BATCH_FORMAT, f"data {data.dtype} of shape {data.shape}")
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise bad_value(
            f"CIFAR-10 batch {path}",
            _BATCH_FORMAT,
            f"{len(data)} images but labels {labels.dtype} of shape {labels.shape}",
        )
    if labels.size and not 0 <= labels.min() <= labels.max() < 10:
        raise bad_value(f"CIFAR-10 batch {path}", _BATCH_FORMAT, f"labels in {labels.min()}..{labels.max()}")
    return data, labels.astype(np.int64)


def read_batches(batch_dir: Path, names: Sequence[str] = TRAIN_BATCHES) -> tuple[np.ndarray, np.ndarray]:
    """Pixels (N, 3, 32, 32) uint8 and labels (N,) int64 of the batches ``names`` in ``batch_dir``.

    A row of b'data' holds the 1024 red, then green, then blue pixels, each row-major.
    """
    parts = [_read_batch(batch_dir / name) for name in names]
    data = np.concatenate([p[0] for p in parts]).reshape(-1, 3, 32, 32)
    return data, np.concatenate([p[1] for p in parts])


def _extract(archive: Path, data_dir: Path) -> Path:
    """Unpack ``archive`` into ``data_dir`` and return its batch directory.

    Only regular files and directories with relative paths free of ``..`` are accepted; the
    batch directory appears in one rename, so an interrupted extraction leaves nothing behind.
    """
    try:
        with tarfile.open(archive, "r:gz") as tar, tempfile.TemporaryDirectory(dir=data_dir, prefix=".cifar10-") as tmp:
            members = tar.getmembers()
            for member in members:
                path = PurePosixPath(member.name)
                if path.is_absolute() or ".." in path.parts or not (member.isfile() or member.isdir()):
                    raise bad_value(
                        f"member of {archive}",
                        "a file or directory with a relative path inside the archive",
                        member.name,
                    )
            for member in filter(tarfile.TarInfo.isfile, members):
                target = Path(tmp, *PurePosixPath(member.name).parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(member)
                assert src is not None  # a regular file's member has contents
                with src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            if not (Path(tmp) / BATCH_DIR).is_dir():
                raise bad_value(
                    f"archive {archive}",
                    f"a tar.gz holding {BATCH_DIR}/",
                    sorted({PurePosixPath(m.name).parts[0] for m in members}),
                )
            (Path(tmp) / BATCH_DIR).rename(data_dir / BATCH_DIR)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        raise bad_value(f"archive {archive}", "a readable tar.gz", str(err)) from err
    return data_dir / BATCH_DIR


def _batch_dir(data_dir: Path, download: bool, mirrors: Sequence[str], timeout: float) -> Path:
    """The directory holding the batches: found, unpacked from the archive, or downloaded."""
    for candidate in (data_dir / BATCH_DIR, data_dir):
        if (candidate / TRAIN_BATCHES[0]).is_file():
            return candidate
    archive = data_dir / ARCHIVE
    if not archive.is_file() and download:
        archive = download_file(ARCHIVE, data_dir, mirrors=mirrors, sha256=ARCHIVE_SHA256, timeout=timeout)
    if archive.is_file():
        return _extract(archive, data_dir)
    state = "a directory without them" if data_dir.is_dir() else "no such directory"
    raise bad_value(
        f"cifar10 data_dir {data_dir}",
        f"a directory with {', '.join(TRAIN_BATCHES)} (directly or "
        f"in {BATCH_DIR}/) or {ARCHIVE}, or download=True to fetch it",
        state,
    )


def _standardize(data: LabeledData, mean: torch.Tensor, std: torch.Tensor) -> LabeledData:
    """``data`` with pixels (x - mean) / std, per channel."""
    return LabeledData((data.x - mean) / std, data.y, data.num_classes, data.class_names)


def load_cifar10(
    data_dir: Path | str | None,
    *,
    download: bool = False,
    seed: int = 0,
    val_fraction: float = 0.2,
    mirrors: Sequence[str] = MIRRORS,
    timeout: float = 60.0,
) -> DataSplit:
    """CIFAR-10 as a seeded, stratified train/val split of the five training batches.

    x: (n, 3, 32, 32) float32, standardized per channel with the train split's mean and standard
    deviation; y: (n,) int64 in 0..9 (names in ``CIFAR10_CLASSES``). With download=True, a missing
    archive is fetched from ``mirrors`` into ``data_dir`` and SHA-256-checked before unpacking.
    """
    if data_dir is None:
        raise bad_value("cifar10 data_dir", "a directory for the batches (download=True fetches them)", None)
    pixels, labels = read_batches(_batch_dir(Path(data_dir), download, mirrors, timeout))
    data = LabeledData(
        torch.from_numpy(pixels.astype(np.float32) / 255.0), torch.from_numpy(labels), 10, CIFAR10_CLASSES
    )
    train, val = train_val_split(data, val_fraction, seed)
    mean = train.x.mean(dim=(0, 2, 3), keepdim=True)  # (1, 3, 1, 1)
    std = train.x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-8)
    return DataSplit(_standardize(train, mean, std), _standardize(val, mean, std), "cifar10")
