"""Output directories of runs: config.json, an incrementally appended CSV, atomic checkpoints.

Nothing is lost: an existing directory is reused only with ``resume`` (continue) or ``overwrite``
(start again), rows are appended and flushed as they are produced, and checkpoints are written to
a temporary file and renamed into place, so an interruption leaves the last complete one.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError

__all__ = ["RunDirectory", "CsvLog", "atomic_save"]


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to ``path`` through a temporary file and an atomic rename."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class CsvLog:
    """A CSV file with fixed columns, one row appended and flushed at a time."""

    def __init__(self, path: Path, columns: Sequence[str]) -> None:
        self.path = path
        self.columns = list(columns)
        if not path.exists():
            with path.open("w", newline="") as f:
                csv.writer(f).writerow(self.columns)

    def append(self, row: dict[str, Any]) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.columns, extrasaction="ignore").writerow(row)
            f.flush()

    def rows(self) -> list[dict[str, str]]:
        with self.path.open(newline="") as f:
            return list(csv.DictReader(f))

    def keep_first(self, count: int) -> None:
        """Drop every row after the first ``count`` (rows written after the last checkpoint)."""
        rows = self.rows()[:count]
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, self.columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)


class RunDirectory:
    """The ``--out`` directory of one run.

    ``overwrite``: an existing directory is emptied first. ``resume``: it must exist and hold a
    config.json. Neither: it must not exist yet (or be empty). Call :meth:`prepare` only after every
    other input has been validated, so a bad flag never destroys earlier output.
    """

    def __init__(self, path: str | Path, *, overwrite: bool = False, resume: bool = False) -> None:
        self.path = Path(path)
        self.overwrite = overwrite
        self.resume = resume
        if overwrite and resume:
            raise InputError("--overwrite and --resume must not be given together, got both")
        exists = self.path.exists() and any(self.path.iterdir()) if self.path.is_dir() else self.path.exists()
        if self.path.exists() and not self.path.is_dir():
            raise InputError(f"--out must be a directory, got the file {str(self.path)!r}")
        if resume and not (self.path / "config.json").exists():
            raise InputError(f"--resume needs an earlier run in --out, got {str(self.path)!r} without config.json")
        if exists and not (overwrite or resume):
            raise InputError(
                f"--out must be a new or empty directory (or pass --overwrite or --resume), "
                f"got the existing {str(self.path)!r}"
            )

    def prepare(self) -> None:
        """Create (or, with overwrite, empty) the directory."""
        if self.overwrite and self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)

    def file(self, name: str) -> Path:
        return self.path / name

    def write_json(self, name: str, data: dict | list) -> None:
        tmp = self.file(name + ".tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
        os.replace(tmp, self.file(name))

    def read_json(self, name: str) -> dict:
        return json.loads(self.file(name).read_text())

    def check_resumable(self, settings: dict, ignore: Iterable[str] = ()) -> None:
        """With resume: the saved settings must equal ``settings`` (except keys in ``ignore``)."""
        saved = self.read_json("config.json")["settings"]
        skip = set(ignore)
        for key, value in settings.items():
            if key in skip:
                continue
            old = saved.get(key)
            if json.loads(json.dumps(value, default=str)) != old:
                raise InputError(f"--{key.replace('_', '-')} must equal the resumed run's {old!r}, got {value!r}")
