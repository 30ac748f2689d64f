"""Checksum-verified download of one file from a list of mirrors (used by MNIST and CIFAR-10).

A file is streamed to a temporary file next to its destination, its SHA-256 compared with the
expected one, and only then renamed into place, so an interrupted or corrupted download never
leaves a file under the final name.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from ..errors import bad_value

__all__ = ["download", "sha256_of"]

_CHUNK = 1 << 20


def sha256_of(path: Path) -> str:
    """The hex SHA-256 digest of the file at ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch(url: str, target: Path, timeout: float) -> None:
    """Stream ``url`` into ``target`` with a progress bar.

    Raises OSError when the server sends fewer bytes than its Content-Length announced.
    """
    with urllib.request.urlopen(url, timeout=timeout) as response, open(target, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        received = 0
        with tqdm(
            total=total, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1], leave=False, disable=None
        ) as bar:  # disable=None: only on a terminal
            for chunk in iter(lambda: response.read(_CHUNK), b""):
                out.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
        if total is not None and received != total:
            raise OSError(f"connection closed after {received} of {total} bytes")


def download(filename: str, dest_dir: Path, *, mirrors: Sequence[str], sha256: str, timeout: float = 60.0) -> Path:
    """Download ``filename`` into ``dest_dir`` from the first mirror that serves it; its path.

    Each mirror is a base URL (``http://`` or ``https://``) to which ``filename`` is appended.
    A mirror that cannot be reached or answers with an HTTP error is skipped; a file whose SHA-256
    differs from ``sha256`` raises at once, and leaves nothing behind.
    """
    if not mirrors:
        raise bad_value(f"mirrors for {filename}", "a non-empty sequence of base URLs", mirrors)
    if timeout <= 0:
        raise bad_value("download timeout", "a positive number of seconds", timeout)
    for mirror in mirrors:
        if not mirror.startswith(("http://", "https://")):
            raise bad_value("mirror", "an http:// or https:// base URL", mirror)
    dest_dir.mkdir(parents=True, exist_ok=True)
    destination = dest_dir / filename
    failures = []
    for mirror in mirrors:
        url = mirror.rstrip("/") + "/" + filename
        handle, tmp_name = tempfile.mkstemp(dir=dest_dir, prefix=f".{filename}.", suffix=".part")
        os.close(handle)
        tmp = Path(tmp_name)
        try:
            _fetch(url, tmp, timeout)
            digest = sha256_of(tmp)
            if digest != sha256.lower():
                raise bad_value(f"SHA-256 of {url}", sha256, digest)
            os.replace(tmp, destination)
            return destination
        except (urllib.error.URLError, http.client.HTTPException, OSError) as err:  # incl. 404s, timeouts
            failures.append(f"{url} ({err})")
        finally:
            tmp.unlink(missing_ok=True)
    raise bad_value(f"download of {filename}", "served by one of the mirrors", "; ".join(failures))
