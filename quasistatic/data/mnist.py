"""MNIST from the four IDX files in a directory, optionally downloaded from standard mirrors.

The validation split is taken from the 60,000 training images; the official 10,000-image test
split (t10k) stays out of it. Only when the t10k files alone are present is t10k split into
train/val instead, with a warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

from ..errors import bad_value
from .base import DataSplit, LabeledData
from .download import download as download_file
from .idx import read_idx_pair
from .subsets import train_val_split

__all__ = ["MIRRORS", "SHA256", "load_mnist"]

MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",  # torchvision's mirror
    "https://storage.googleapis.com/cvdf-datasets/mnist/",  # tensorflow-datasets' mirror
    "http://yann.lecun.com/exdb/mnist/",  # the original site
)

# SHA-256 of the official .gz files, as listed by tensorflow-datasets (url_checksums/mnist.txt).
# The copy in ../shared/data/mnist-t10k does not match them (its own SHA256SUMS lists other .gz
# hashes), yet its decompressed bytes have the published SHA-256 of the official IDX files.
SHA256 = {
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}

_CLASS_NAMES = tuple(str(d) for d in range(10))


def _stems(split: str) -> tuple[str, str]:
    """The image and label file names of ``split`` ("train" or "t10k"), without ``.gz``."""
    return f"{split}-images-idx3-ubyte", f"{split}-labels-idx1-ubyte"


def _locate(data_dir: Path, split: str) -> list[Path | None]:
    """The image and label files of ``split`` in ``data_dir`` (gzip or raw), None where absent."""
    found = []
    for stem in _stems(split):
        candidates = [data_dir / (stem + ".gz"), data_dir / stem]
        found.append(next((path for path in candidates if path.is_file()), None))
    return found


def load_mnist(
    data_dir: Path | str | None,
    *,
    download: bool = False,
    seed: int = 0,
    val_fraction: float = 0.2,
    mirrors: Sequence[str] = MIRRORS,
    timeout: float = 60.0,
) -> DataSplit:
    """MNIST as a seeded, stratified train/val split of the training files in ``data_dir``.

    x: (n, 1, 28, 28) float32, pixels / 255 in [0, 1]; y: (n,) int64 in 0..9. With download=True,
    missing training files are fetched from ``mirrors`` into ``data_dir`` and SHA-256-checked.
    Files already present are read as they are (their structure is checked, not their hash).
    """
    if data_dir is None:
        raise bad_value("mnist data_dir", "a directory for the IDX files (download=True fetches them)", None)
    data_dir = Path(data_dir)
    files = _locate(data_dir, "train")
    if download and None in files:
        files = [
            path or download_file(stem + ".gz", data_dir, mirrors=mirrors, sha256=SHA256[stem + ".gz"], timeout=timeout)
            for stem, path in zip(_stems("train"), files)
        ]
    if any(files) and not all(files):
        present = next(path for path in files if path is not None)
        raise bad_value(
            f"mnist data_dir {data_dir}",
            f"a directory with both {' and '.join(_stems('train'))} (.gz or raw), or download=True",
            f"only {present.name}",
        )
    if not all(files):
        files = _locate(data_dir, "t10k")
        if not all(files):
            state = "a directory without them" if data_dir.is_dir() else "no such directory"
            raise bad_value(
                f"mnist data_dir {data_dir}",
                f"a directory with {' and '.join(_stems('train'))} (.gz or raw; or the "
                f"{' and '.join(_stems('t10k'))} test split only), or download=True to fetch them",
                state,
            )
        warnings.warn(
            f"only the MNIST test split (t10k) is in {data_dir}: train and val are both "
            "split from it, and no held-out test split remains",
            UserWarning,
            stacklevel=2,
        )
    images, labels = files
    assert images is not None and labels is not None  # all(files) above
    x, y = read_idx_pair(images, labels)
    train, val = train_val_split(LabeledData(x, y, 10, _CLASS_NAMES), val_fraction, seed)
    return DataSplit(train, val, "mnist")
