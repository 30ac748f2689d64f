"""Tests of quasistatic.data: loaders, the IDX reader, CIFAR-10 batches, class subsets, downloads.

Every fixture file is written by the test in the real format; downloads go to an HTTP server on
127.0.0.1 that the test starts. The real MNIST test split is read from ../shared when present.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import os
import pickle
import re
import tarfile
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import quasistatic.data
from quasistatic.data import (DataSplit, LabeledData, available_datasets, load_dataset, parse_classes,
                              register_dataset)
from quasistatic.data import cifar10, mnist
from quasistatic.data.cifar10 import ARCHIVE, BATCH_DIR, load_cifar10, read_batches
from quasistatic.data.download import download
from quasistatic.data.idx import IMAGES_MAGIC, LABELS_MAGIC, read_idx, read_idx_pair
from quasistatic.data.mnist import load_mnist
from quasistatic.data.subsets import CIFAR10_CLASSES, select_classes
from quasistatic.errors import InputError

MNIST_T10K = Path(__file__).resolve().parents[2] / "shared/data/mnist-t10k"
MNIST_T10K_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
MNIST_T10K_FIRST_LABELS = [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]


# ---------------------------------------------------------------- fixture writers

def idx_bytes(array: np.ndarray, magic: int, count: int | None = None) -> bytes:
    """An IDX file: big-endian magic, dims (the first one overridable), then the uint8 data."""
    dims = [len(array) if count is None else count, *array.shape[1:]]
    return np.array([magic, *dims], dtype=">i4").tobytes() + array.astype(np.uint8).tobytes()


def write_file(path: Path, payload: bytes) -> Path:
    """Write ``payload``, gzip-compressed when the name ends in .gz."""
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)
    return path


def write_mnist(root: Path, split: str, n: int, *, gz: bool = True, pixel: int | None = None,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Write an MNIST-format split of n images (labels cycle 0..9); random pixels < 200 unless given."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 10).astype(np.uint8)
    images = (np.full((n, 28, 28), pixel, np.uint8) if pixel is not None
              else rng.integers(0, 200, size=(n, 28, 28), dtype=np.uint8))
    suffix = ".gz" if gz else ""
    root.mkdir(parents=True, exist_ok=True)
    write_file(root / f"{split}-images-idx3-ubyte{suffix}", idx_bytes(images, IMAGES_MAGIC))
    write_file(root / f"{split}-labels-idx1-ubyte{suffix}", idx_bytes(labels, LABELS_MAGIC))
    return images, labels


def cifar_batches(per_batch: int = 10, seed: int = 0) -> list[dict]:
    """Five tiny training batches in the CIFAR-10 python format, each label once per batch."""
    rng = np.random.default_rng(seed)
    return [{b"batch_label": f"training batch {i} of 5".encode(),
             b"data": rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8),
             b"labels": rng.permutation(per_batch).tolist()} for i in range(1, 6)]


def write_batches(directory: Path, batches: list[dict]) -> Path:
    """Pickle ``batches`` as data_batch_1..5 (protocol 2, like the originals) plus a test batch."""
    directory.mkdir(parents=True, exist_ok=True)
    for i, batch in enumerate(batches, start=1):
        (directory / f"data_batch_{i}").write_bytes(pickle.dumps(batch, protocol=2))
    (directory / "test_batch").write_bytes(pickle.dumps(batches[0], protocol=2))
    return directory


def write_tar(archive: Path, files: dict[str, bytes], symlink: str | None = None) -> Path:
    """A tar.gz with ``files`` (member name -> content) and optionally one symlink member."""
    with tarfile.open(archive, "w:gz") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
        if symlink is not None:
            info = tarfile.TarInfo(symlink)
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
    return archive


def cifar_tar(archive: Path, batches: list[dict]) -> Path:
    """The batches packed like cifar-10-python.tar.gz."""
    return write_tar(archive, {f"{BATCH_DIR}/data_batch_{i}": pickle.dumps(b, protocol=2)
                               for i, b in enumerate(batches, start=1)})


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder without logging; under /cut/ it drops the connection mid-file."""

    def do_GET(self) -> None:
        if not self.path.startswith("/cut/"):
            return super().do_GET()
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b"x" * 10)
        self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_root(tmp_path: Path):
    """(folder served, base URL) of a ThreadingHTTPServer on 127.0.0.1 and a free port."""
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- public API and registry

def test_public_names_import():
    for name in quasistatic.data.__all__:
        assert getattr(quasistatic.data, name) is not None
    assert {"cifar10", "digits", "mnist"} <= set(available_datasets())


def test_unknown_dataset_lists_the_names():
    with pytest.raises(InputError, match=r"dataset must be one of \{.*cifar10, digits, mnist.*\}, got 'nope'"):
        load_dataset("nope")


@pytest.mark.parametrize("value", [0, 1, 1.5, -0.1, "0.2", True])
def test_bad_val_fraction(value):
    with pytest.raises(InputError, match="val_fraction must be a number strictly between 0 and 1"):
        load_dataset("digits", val_fraction=value)


@pytest.mark.parametrize("value", [-1, 2**32, 1.5, True, "0"])
def test_bad_seed(value):
    with pytest.raises(InputError, match=r"seed must be an int in 0\.\.2\*\*32 - 1"):
        load_dataset("digits", seed=value)


def test_val_fraction_too_small_to_stratify():
    with pytest.raises(InputError, match="val_fraction must be such that each class"):
        load_dataset("digits", val_fraction=0.001)


def test_register_dataset(restored_registries):
    y = torch.arange(40) % 4
    pool = LabeledData(y.float().reshape(40, 1, 1, 1), y, 4, ("a", "b", "c", "d"))

    def tiny(data_dir, *, download, seed, val_fraction):
        return DataSplit(pool, pool, "tiny")

    register_dataset("tiny", tiny)
    assert "tiny" in available_datasets()
    split = load_dataset("tiny", classes=[3, 1], relabel=True)
    assert split.train.class_names == ("d", "b") and set(split.train.y.tolist()) == {0, 1}
    with pytest.raises(InputError, match=r"dataset name must be new \(taken: .*tiny.*\), got 'tiny'; pass replace"):
        register_dataset("tiny", tiny)
    with pytest.raises(InputError, match="dataset name must be a non-empty string"):
        register_dataset(" ", tiny)
    with pytest.raises(InputError, match="factory of dataset 'other' must be a callable"):
        register_dataset("other", 3)


def test_relabel_without_classes_warns():
    with pytest.warns(UserWarning, match="relabel=True without classes changes nothing"):
        load_dataset("digits", relabel=True)


# ---------------------------------------------------------------- digits

def test_digits_shapes_and_range():
    split = load_dataset("digits")
    assert split.name == "digits" and len(split.train) + len(split.val) == 1797
    assert len(split.val) == 360  # ceil(0.2 * 1797)
    for part in (split.train, split.val):
        assert part.x.shape[1:] == (1, 8, 8) and part.x.dtype == torch.float32
        assert part.y.dtype == torch.int64 and part.num_classes == 10
        assert 0.0 <= part.x.min() and part.x.max() <= 1.0
    assert split.train.x.max() == 1.0  # 16 / 16
    assert split.train.class_names == tuple("0123456789")


def test_digits_split_is_seeded():
    first, again, other = (load_dataset("digits", seed=s) for s in (0, 0, 1))
    assert torch.equal(first.train.x, again.train.x) and torch.equal(first.val.y, again.val.y)
    assert not torch.equal(first.val.x, other.val.x)


def test_digits_split_is_stratified():
    split = load_dataset("digits", val_fraction=0.25)
    total = torch.bincount(torch.cat([split.train.y, split.val.y]), minlength=10)
    val = torch.bincount(split.val.y, minlength=10)
    assert torch.all((val - 0.25 * total).abs() <= 1)


@pytest.mark.parametrize("options", [{"data_dir": "somewhere"}, {"download": True}])
def test_digits_warns_about_unused_options(options):
    with pytest.warns(UserWarning, match="data_dir and download are unused"):
        load_dataset("digits", **options)


# ---------------------------------------------------------------- class subsets

@pytest.mark.parametrize("spec, dataset, expected", [
    (None, "mnist", tuple(range(10))),
    ("0-4", "mnist", (0, 1, 2, 3, 4)),
    ("5-9", "digits", (5, 6, 7, 8, 9)),
    ("0,2,7", "mnist", (0, 2, 7)),
    ("7,2", "mnist", (7, 2)),
    ("3", "mnist", (3,)),
    (" 1 , 3 - 4 ", "mnist", (1, 3, 4)),
    ([2, 0], "mnist", (2, 0)),
    ((np.int64(4),), "mnist", (4,)),
    ("vehicles", "cifar10", (0, 1, 8, 9)),
    ("animals", "cifar10", (2, 3, 4, 5)),
    ("cat", "cifar10", (3,)),
    ("Truck", "cifar10", (9,)),
    ("cat,dog,0", "cifar10", (3, 5, 0)),
])
def test_parse_classes(spec, dataset, expected):
    assert parse_classes(spec, dataset, 10) == expected


@pytest.mark.parametrize("spec, dataset, problem", [
    ("", "mnist", ""),
    ("   ", "mnist", ""),
    ("4-0", "mnist", "a range must go up, got '4-0'"),
    ("a-b", "mnist", "cannot read 'a-b'"),
    ("1-", "mnist", "cannot read '1-'"),
    ("1,,2", "mnist", "cannot read ''"),
    ("-1", "mnist", "cannot read '-1'"),
    ("1,1", "mnist", "duplicate class"),
    ("0-4,3", "mnist", "duplicate class"),
    ("10", "mnist", "out of range"),
    ("0-10", "mnist", "out of range"),
    ("cat", "mnist", "cannot read 'cat'"),
    ("fish", "cifar10", "cannot read 'fish'"),
    ([], "mnist", "at least one class"),
    ([1, 1], "mnist", "duplicate class"),
    ([10], "mnist", "out of range"),
    ([True], "mnist", "a sequence must hold ints"),
    ([1.0], "mnist", "a sequence must hold ints"),
])
def test_parse_classes_errors(spec, dataset, problem):
    with pytest.raises(InputError, match=r"^classes must be a range like '0-4'") as err:
        parse_classes(spec, dataset, 10)
    message = str(err.value)
    assert "a list like '0,2,7', a single class like '3'" in message and "classes in 0..9" in message
    assert problem in message and message.endswith(f"got {spec!r}")
    assert ("vehicles" in message) == (dataset == "cifar10")


def _ten_of_each() -> LabeledData:
    y = torch.arange(30) % 10
    return LabeledData(torch.arange(30, dtype=torch.float32).reshape(30, 1, 1, 1), y, 10, tuple("0123456789"))


def test_select_classes_relabel():
    data = _ten_of_each()
    chosen = select_classes(data, (7, 2), relabel=True)
    assert chosen.num_classes == 2 and chosen.class_names == ("7", "2")
    assert chosen.x.flatten().tolist() == [2, 7, 12, 17, 22, 27]  # original order kept
    assert chosen.y.tolist() == [1, 0, 1, 0, 1, 0]


def test_select_classes_keep_labels():
    chosen = select_classes(_ten_of_each(), (7, 2), relabel=False)
    assert chosen.num_classes == 10 and chosen.class_names == tuple("0123456789")
    assert chosen.y.tolist() == [2, 7, 2, 7, 2, 7]


def test_select_classes_rejects_bad_classes():
    with pytest.raises(InputError, match="classes must be .*out of range"):
        select_classes(_ten_of_each(), (3, 12), relabel=False)


def test_load_dataset_class_subsets_share_one_partition():
    full = load_dataset("digits", seed=3)
    low = load_dataset("digits", seed=3, classes="0-4")
    high = load_dataset("digits", seed=3, classes="5-9", relabel=True)
    assert low.train.num_classes == 10 and set(low.val.y.tolist()) == {0, 1, 2, 3, 4}
    assert torch.equal(low.val.x, full.val.x[full.val.y < 5])
    assert high.train.num_classes == 5 and high.train.class_names == tuple("56789")
    assert torch.equal(high.train.y, full.train.y[full.train.y >= 5] - 5)


# ---------------------------------------------------------------- IDX reader

@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
    images, labels = write_mnist(tmp_path, "train", 20, gz=gz)
    suffix = ".gz" if gz else ""
    x, y = read_idx_pair(tmp_path / f"train-images-idx3-ubyte{suffix}", tmp_path / f"train-labels-idx1-ubyte{suffix}")
    assert x.shape == (20, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.allclose(x[:, 0], torch.from_numpy(images / 255.0).float())
    assert y.tolist() == labels.tolist()


def _corrupt(tmp_path: Path, case: str) -> tuple[Path, Path]:
    """An image and a label file, one of them broken as ``case`` says."""
    rng = np.random.default_rng(1)
    images, labels = rng.integers(0, 256, (20, 28, 28)), np.arange(20) % 10
    img, lab = tmp_path / "train-images-idx3-ubyte.gz", tmp_path / "train-labels-idx1-ubyte"
    write_file(img, idx_bytes(images, IMAGES_MAGIC))
    write_file(lab, idx_bytes(labels, LABELS_MAGIC))
    if case == "bad image magic":
        write_file(img, idx_bytes(images, LABELS_MAGIC))
    elif case == "bad label magic":
        write_file(lab, idx_bytes(labels, IMAGES_MAGIC))
    elif case == "truncated gzip":
        img.write_bytes(gzip.compress(idx_bytes(images, IMAGES_MAGIC))[:5000])
    elif case == "not gzip":
        img.write_bytes(b"this is not gzip data")
    elif case == "wrong counts":
        write_file(lab, idx_bytes(labels[:19], LABELS_MAGIC))
    elif case == "byte size mismatch":
        write_file(img, idx_bytes(images[:19], IMAGES_MAGIC, count=20))
    elif case == "wrong image size":
        write_file(img, idx_bytes(images[:, :27], IMAGES_MAGIC))
    elif case == "short header":
        lab.write_bytes(b"\x00\x00\x08")
    return img, lab


@pytest.mark.parametrize("case, message", [
    ("bad image magic", r"magic number of .*train-images-idx3-ubyte\.gz must be 2051, got 2049"),
    ("bad label magic", r"magic number of .*train-labels-idx1-ubyte must be 2049, got 2051"),
    ("truncated gzip", r"IDX file .*train-images-idx3-ubyte\.gz must be a readable, complete \(gzip\) file, "
                       r"got 'Compressed file ended"),
    ("not gzip", r"IDX file .*train-images-idx3-ubyte\.gz must be a readable, complete \(gzip\) file, "
                 r"got .Not a gzipped file"),
    ("wrong counts", r"label count in .*train-labels-idx1-ubyte must be 20, the image count in "
                     r".*train-images-idx3-ubyte\.gz, got 19"),
    ("byte size mismatch", r"size of IDX file .*train-images-idx3-ubyte\.gz must be 15696 bytes "
                           r"\(header \+ 20 items of shape \(28, 28\)\), got 14912"),
    ("wrong image size", r"item shape in the header of .*train-images-idx3-ubyte\.gz must be \(28, 28\), "
                         r"got \(27, 28\)"),
    ("short header", r"size of IDX file .*train-labels-idx1-ubyte must be at least the 8-byte header, "
                     r"got '3 bytes'"),
])
def test_idx_corruption(tmp_path, case, message):
    img, lab = _corrupt(tmp_path, case)
    with pytest.raises(InputError, match=message):
        read_idx_pair(img, lab)


def test_idx_labels_alone(tmp_path):
    path = write_file(tmp_path / "labels", idx_bytes(np.array([3, 1, 4]), LABELS_MAGIC))
    assert read_idx(path, LABELS_MAGIC).tolist() == [3, 1, 4]


# ---------------------------------------------------------------- MNIST loader

@pytest.mark.parametrize("gz", [True, False])
def test_mnist_uses_train_and_keeps_t10k_out(tmp_path, gz):
    write_mnist(tmp_path, "train", 60, gz=gz)
    write_mnist(tmp_path, "t10k", 50, pixel=255)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        split = load_dataset("mnist", data_dir=tmp_path, seed=1)
    assert split.name == "mnist" and (len(split.train), len(split.val)) == (48, 12)
    assert split.train.x.shape[1:] == (1, 28, 28)
    assert max(split.train.x.max(), split.val.x.max()) < 200 / 255 + 1e-6  # no t10k image (all 255)
    assert set(torch.bincount(split.val.y, minlength=10).tolist()) <= {1, 2}  # stratified: 12 over 10 classes


def test_mnist_t10k_only_warns_and_splits_it(tmp_path):
    write_mnist(tmp_path, "t10k", 50)
    with pytest.warns(UserWarning, match=r"only the MNIST test split \(t10k\) is in .*: train and val"):
        split = load_mnist(tmp_path)
    assert (len(split.train), len(split.val)) == (40, 10)
    assert sorted(split.val.y.tolist()) == list(range(10))  # stratified: one of each


def test_mnist_missing_directory(tmp_path):
    absent = tmp_path / "absent"
    expected = (rf"mnist data_dir {re.escape(str(absent))} must be a directory with train-images-idx3-ubyte and "
                r"train-labels-idx1-ubyte \(\.gz or raw; or the t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte "
                r"test split only\), or download=True to fetch them, got 'no such directory'")
    with pytest.raises(InputError, match=expected):
        load_dataset("mnist", data_dir=absent)
    with pytest.raises(InputError, match="got 'a directory without them'"):
        load_dataset("mnist", data_dir=tmp_path)


def test_mnist_incomplete_train_split(tmp_path):
    write_mnist(tmp_path, "train", 60)
    (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
    write_mnist(tmp_path, "t10k", 50)  # present, but a half train split is an error, not a fallback
    with pytest.raises(InputError, match="must be a directory with both .* got 'only train-images-idx3-ubyte.gz'"):
        load_mnist(tmp_path)


def test_loader_checks_split_arguments(tmp_path):
    write_mnist(tmp_path, "train", 60)
    with pytest.raises(InputError, match=r"seed must be an int in 0\.\.2\*\*32 - 1, got -3"):
        load_mnist(tmp_path, seed=-3)


def test_mnist_needs_a_directory():
    with pytest.raises(InputError, match=r"mnist data_dir must be a directory .*download=True.*got None"):
        load_dataset("mnist")


# ---------------------------------------------------------------- CIFAR-10

def test_read_batches_layout(tmp_path):
    batches = cifar_batches()
    pixels, labels = read_batches(write_batches(tmp_path, batches))
    raw = np.concatenate([b[b"data"] for b in batches])
    assert pixels.shape == (50, 3, 32, 32) and labels.dtype == np.int64
    assert pixels[7, 2, 5, 9] == raw[7, 2 * 1024 + 5 * 32 + 9]  # channel-major, then row-major
    assert labels.tolist() == sum((b[b"labels"] for b in batches), [])


@pytest.mark.parametrize("subdir", [BATCH_DIR, ""])
def test_cifar_loads_standardized(tmp_path, subdir):
    write_batches(tmp_path / subdir, cifar_batches())
    split = load_dataset("cifar10", data_dir=tmp_path)
    assert split.name == "cifar10" and (len(split.train), len(split.val)) == (40, 10)
    assert split.train.x.shape[1:] == (3, 32, 32) and split.train.class_names == CIFAR10_CLASSES
    mean, std = split.train.x.mean(dim=(0, 2, 3)), split.train.x.std(dim=(0, 2, 3))
    assert torch.allclose(mean, torch.zeros(3), atol=1e-5) and torch.allclose(std, torch.ones(3), atol=1e-5)
    assert sorted(split.val.y.tolist()) == list(range(10))


def test_cifar_class_groups(tmp_path):
    write_batches(tmp_path, cifar_batches())
    split = load_dataset("cifar10", data_dir=tmp_path, classes="vehicles", relabel=True)
    assert split.train.class_names == ("airplane", "automobile", "ship", "truck")
    assert len(split.train) + len(split.val) == 20


def test_cifar_archive_round_trip(tmp_path):
    batches = cifar_batches()
    from_batches = load_cifar10(write_batches(tmp_path / "plain", batches))
    archive_dir = tmp_path / "archive"
    archive_dir.mkdir()
    cifar_tar(archive_dir / ARCHIVE, batches)
    from_archive = load_cifar10(archive_dir)
    assert torch.equal(from_archive.train.x, from_batches.train.x)
    assert torch.equal(from_archive.val.y, from_batches.val.y)
    assert sorted(p.name for p in archive_dir.iterdir()) == sorted([ARCHIVE, BATCH_DIR])
    assert torch.equal(load_cifar10(archive_dir).val.x, from_batches.val.x)  # now from the unpacked batches


@pytest.mark.parametrize("member, symlink", [
    ("../evil", None),
    (f"{BATCH_DIR}/../../evil", None),
    ("/tmp/quasistatic-test-evil", None),
    (None, f"{BATCH_DIR}/link"),
])
def test_cifar_archive_rejects_unsafe_members(tmp_path, member, symlink):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    files = {f"{BATCH_DIR}/data_batch_1": b"x"}
    if member is not None:
        files[member] = b"evil"
    write_tar(data_dir / ARCHIVE, files, symlink=symlink)
    bad = member if member is not None else symlink
    with pytest.raises(InputError, match=rf"member of .*{ARCHIVE} must be a file or directory with a relative path "
                                         rf"inside the archive, got {re.escape(repr(bad))}"):
        load_cifar10(data_dir)
    assert [p.name for p in data_dir.iterdir()] == [ARCHIVE]
    assert not (tmp_path / "evil").exists() and not Path("/tmp/quasistatic-test-evil").exists()


def test_cifar_archive_unreadable(tmp_path):
    (tmp_path / ARCHIVE).write_bytes(b"not a tar.gz")
    with pytest.raises(InputError, match=rf"archive .*{ARCHIVE} must be a readable tar.gz"):
        load_cifar10(tmp_path)


def test_cifar_archive_without_batch_dir(tmp_path):
    write_tar(tmp_path / ARCHIVE, {"other/data_batch_1": b"x"})
    with pytest.raises(InputError, match=rf"must be a tar.gz holding {BATCH_DIR}/, got \['other'\]"):
        load_cifar10(tmp_path)


class _Evil:
    def __reduce__(self):
        return (os.getcwd, ())


@pytest.mark.parametrize("change, problem", [
    (lambda b: b.pop(b"labels"), r"keys \[b'batch_label', b'data'\]"),
    (lambda b: b.__setitem__(b"data", b[b"data"][:, :3071]), r"data uint8 of shape \(10, 3071\)"),
    (lambda b: b.__setitem__(b"data", b[b"data"].astype(np.float32)), r"data float32 of shape \(10, 3072\)"),
    (lambda b: b.__setitem__(b"labels", b[b"labels"][:9]), r"10 images but labels int64 of shape \(9,\)"),
    (lambda b: b.__setitem__(b"labels", [10] * 10), r"labels in 10..10"),
    (lambda b: b.__setitem__(b"evil", _Evil()), r"UnpicklingError: global posix.getcwd is not allowed"),
])
def test_cifar_bad_batch(tmp_path, change, problem):
    batches = cifar_batches()
    change(batches[2])
    write_batches(tmp_path, batches)
    with pytest.raises(InputError, match=rf"CIFAR-10 batch .*data_batch_3 must be a pickled dict with b'data' "
                                         rf"\(N x 3072 uint8\) and b'labels' \(N labels in 0..9\), got .*{problem}"):
        load_cifar10(tmp_path)


def test_cifar_truncated_and_missing_batches(tmp_path):
    write_batches(tmp_path, cifar_batches())
    (tmp_path / "data_batch_4").write_bytes((tmp_path / "data_batch_4").read_bytes()[:100])
    with pytest.raises(InputError, match=r"CIFAR-10 batch .*data_batch_4 must be .*got '.*Error"):
        load_cifar10(tmp_path)
    (tmp_path / "data_batch_5").unlink()
    with pytest.raises(InputError, match=r"CIFAR-10 batch .*data_batch_4"):
        load_cifar10(tmp_path)


def test_cifar_missing_directory(tmp_path):
    with pytest.raises(InputError, match=rf"cifar10 data_dir .*absent must be a directory with data_batch_1, .*"
                                         rf"{ARCHIVE}, or download=True to fetch it, got 'no such directory'"):
        load_dataset("cifar10", data_dir=tmp_path / "absent")


# ---------------------------------------------------------------- downloads

def test_download_skips_a_404_mirror(http_root, tmp_path):
    root, base = http_root
    (root / "good").mkdir()
    (root / "good" / "file.bin").write_bytes(b"payload" * 1000)
    dest = tmp_path / "dest"
    path = download("file.bin", dest, mirrors=(f"{base}/missing/", f"{base}/good"),
                    sha256=sha256(b"payload" * 1000), timeout=5)
    assert path == dest / "file.bin" and path.read_bytes() == b"payload" * 1000
    assert [p.name for p in dest.iterdir()] == ["file.bin"]


def test_download_skips_a_mirror_that_breaks_off(http_root, tmp_path):
    root, base = http_root
    (root / "file.bin").write_bytes(b"payload")
    dest = tmp_path / "dest"
    path = download("file.bin", dest, mirrors=(f"{base}/cut/", base), sha256=sha256(b"payload"), timeout=5)
    assert [p.name for p in dest.iterdir()] == ["file.bin"] and path.read_bytes() == b"payload"
    with pytest.raises(InputError, match=r"download of other.bin must be served by one of the mirrors, got "
                                         rf"'{base}/cut/other.bin \(connection closed after 10 of 1000 bytes\)'"):
        download("other.bin", dest, mirrors=(f"{base}/cut/",), sha256="0" * 64, timeout=5)
    assert [p.name for p in dest.iterdir()] == ["file.bin"]


def test_download_checksum_mismatch_leaves_nothing(http_root, tmp_path):
    root, base = http_root
    (root / "file.bin").write_bytes(b"tampered")
    dest = tmp_path / "dest"
    with pytest.raises(InputError, match=rf"SHA-256 of {base}/file.bin must be {'0' * 64}, "
                                         rf"got '{sha256(b'tampered')}'"):
        download("file.bin", dest, mirrors=(base,), sha256="0" * 64, timeout=5)
    assert list(dest.iterdir()) == []


def test_download_all_mirrors_fail(http_root, tmp_path):
    _, base = http_root
    dest = tmp_path / "dest"
    with pytest.raises(InputError, match=r"download of file.bin must be served by one of the mirrors, got ") as err:
        download("file.bin", dest, mirrors=(f"{base}/a/", f"{base}/b/"), sha256="0" * 64, timeout=5)
    assert f"{base}/a/file.bin (HTTP Error 404" in str(err.value) and f"{base}/b/file.bin" in str(err.value)
    assert list(dest.iterdir()) == []


@pytest.mark.parametrize("mirrors, timeout, message", [
    ((), 5, r"mirrors for f must be a non-empty sequence of base URLs, got \(\)"),
    (("ftp://example.org/",), 5, r"mirror must be an http:// or https:// base URL, got 'ftp://example.org/'"),
    (("http://127.0.0.1/",), 0, r"download timeout must be a positive number of seconds, got 0"),
])
def test_download_bad_arguments(tmp_path, mirrors, timeout, message):
    with pytest.raises(InputError, match=message):
        download("f", tmp_path, mirrors=mirrors, sha256="0" * 64, timeout=timeout)


def test_mnist_download(http_root, tmp_path, monkeypatch):
    root, base = http_root
    write_mnist(root / "mnist", "train", 60)
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        monkeypatch.setitem(mnist.SHA256, name, sha256((root / "mnist" / name).read_bytes()))
    data_dir = tmp_path / "data"
    split = load_mnist(data_dir, download=True, mirrors=(f"{base}/none/", f"{base}/mnist/"), timeout=5)
    assert len(split.train) + len(split.val) == 60
    assert sorted(p.name for p in data_dir.iterdir()) == ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]


def test_mnist_download_mismatch(http_root, tmp_path):
    root, base = http_root
    write_mnist(root, "train", 60)  # not the official files: the official hashes must reject them
    with pytest.raises(InputError, match=rf"SHA-256 of {base}/train-images-idx3-ubyte.gz must be "
                                         rf"{mnist.SHA256['train-images-idx3-ubyte.gz']}"):
        load_mnist(tmp_path / "data", download=True, mirrors=(base,), timeout=5)
    assert list((tmp_path / "data").iterdir()) == []


def test_cifar_download(http_root, tmp_path, monkeypatch):
    root, base = http_root
    cifar_tar(root / ARCHIVE, cifar_batches())
    monkeypatch.setattr(cifar10, "ARCHIVE_SHA256", sha256((root / ARCHIVE).read_bytes()))
    data_dir = tmp_path / "data"
    split = load_cifar10(data_dir, download=True, mirrors=(f"{base}/",), timeout=5)
    assert (len(split.train), len(split.val)) == (40, 10)
    assert sorted(p.name for p in data_dir.iterdir()) == sorted([ARCHIVE, BATCH_DIR])


# ---------------------------------------------------------------- the real MNIST test split

def test_real_mnist_t10k():
    if not (MNIST_T10K / "t10k-labels-idx1-ubyte.gz").is_file():
        pytest.skip(f"real MNIST test split not found at {MNIST_T10K}")
    with pytest.warns(UserWarning, match=r"only the MNIST test split \(t10k\)"):
        split = load_dataset("mnist", data_dir=MNIST_T10K)
    assert (len(split.train), len(split.val)) == (8000, 2000)
    assert split.train.x.shape[1:] == (1, 28, 28) and 0 <= split.train.x.min() and split.train.x.max() <= 1
    counts = torch.bincount(torch.cat([split.train.y, split.val.y]), minlength=10)
    assert counts.tolist() == MNIST_T10K_COUNTS
    assert torch.all((torch.bincount(split.val.y, minlength=10) - 0.2 * counts).abs() <= 1)
    labels = read_idx(MNIST_T10K / "t10k-labels-idx1-ubyte.gz", LABELS_MAGIC)
    assert labels[:10].tolist() == MNIST_T10K_FIRST_LABELS


def test_data_config_examples_keeps_the_first_of_each_split():
    import quasistatic as qs

    whole = qs.DataConfig().load(seed=3)
    cut = qs.DataConfig(examples=50).load(seed=3)
    assert (len(cut.train), len(cut.val)) == (50, 50)
    assert torch.equal(cut.train.x, whole.train.x[:50]) and torch.equal(cut.val.y, whole.val.y[:50])
    assert len(qs.DataConfig(examples=10**6).load(seed=3).train) == len(whole.train)
