"""Reader for the IDX files MNIST ships in, gzip-compressed or raw.

The format (http://yann.lecun.com/exdb/mnist/): a big-endian int32 magic number (2051 for
images, 2049 for labels), one big-endian int32 per dimension (count, then rows and columns for
images), then the unsigned bytes. Every check raises :class:`InputError` naming the file.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import bad_value

__all__ = ["IMAGES_MAGIC", "LABELS_MAGIC", "read_idx", "read_idx_pair"]

IMAGES_MAGIC = 2051  # uint8 data, 3 dimensions
LABELS_MAGIC = 2049  # uint8 data, 1 dimension


def _read_bytes(path: Path) -> bytes:
    """The content of ``path``, decompressed when its name ends in ``.gz``."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as stream:
                return stream.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        raise bad_value(f"IDX file {path}", "a readable, complete (gzip) file", str(err)) from err


def read_idx(path: Path, magic: int, item_shape: tuple[int, ...] = ()) -> np.ndarray:
    """The uint8 array of shape (count, *item_shape) stored in the IDX file ``path``.

    Checks the magic number, the item shape in the header and that the file holds exactly
    the bytes the header announces.
    """
    raw = _read_bytes(path)
    header_size = 4 * (2 + len(item_shape))
    if len(raw) < header_size:
        raise bad_value(f"size of IDX file {path}", f"at least the {header_size}-byte header", f"{len(raw)} bytes")
    found_magic, count, *dims = np.frombuffer(raw, dtype=">i4", count=header_size // 4).tolist()
    if found_magic != magic:
        raise bad_value(f"magic number of {path}", str(magic), found_magic)
    if tuple(dims) != item_shape:
        raise bad_value(f"item shape in the header of {path}", str(item_shape), tuple(dims))
    expected = header_size + count * int(np.prod(item_shape))
    if len(raw) != expected:
        raise bad_value(
            f"size of IDX file {path}", f"{expected} bytes (header + {count} items of shape {item_shape})", len(raw)
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(count, *item_shape)


def read_idx_pair(images_path: Path, labels_path: Path, size: tuple[int, int] = (28, 28)) -> tuple[Tensor, Tensor]:
    """Images (n, 1, *size) float32 in [0, 1] (pixels / 255) and labels (n,) int64 from two IDX files."""
    images = read_idx(images_path, IMAGES_MAGIC, size)
    labels = read_idx(labels_path, LABELS_MAGIC)
    if len(labels) != len(images):
        raise bad_value(
            f"label count in {labels_path}", f"{len(images)}, the image count in {images_path}", len(labels)
        )
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)  # (n, 1, h, w)
    return x, torch.from_numpy(labels.astype(np.int64))
