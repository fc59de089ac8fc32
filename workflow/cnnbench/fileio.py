"""Atomic file writes and hashing: a killed job never leaves a file that looks finished."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import tempfile
import urllib.request
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    The temporary name keeps the final suffix so that libraries choosing a format by
    extension (numpy, h5py, keras) write the right one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.fchmod(fd, plain_file_mode())  # mkstemp's 0600 would make the outputs unreadable by others
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def plain_file_mode() -> int:
    """The mode open() gives a new file: 0666 less the process's umask."""
    umask = os.umask(0o077)  # reading the umask means setting it; put it straight back
    os.umask(umask)
    return 0o666 & ~umask


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def stream_to_file(url: str, path: str | os.PathLike, algorithm: str, timeout: float = 60.0) -> str:
    """Download ``url`` into ``path`` in 1 MiB blocks; return the hex digest of what was written.

    A body shorter than its Content-Length raises ConnectionError (an OSError, as network failures are).
    """
    digest = hashlib.new(algorithm)
    written = 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(path, "wb") as out:
            for block in iter(lambda: response.read(1 << 20), b""):
                digest.update(block)
                out.write(block)
                written += len(block)
            # read(n) returns b"" when the server closes early instead of raising IncompleteRead;
            # an HTTP response's `length` is what its Content-Length announced and never came (file: URLs have none).
            missing = getattr(response, "length", None)
            if missing:
                raise ConnectionError(f"the connection closed after {written} bytes, {missing} short of "
                                      "the announced Content-Length: the download is truncated")
    except http.client.HTTPException as err:
        raise ConnectionError(f"{err!r}: the download is broken off or malformed") from err
    return digest.hexdigest()


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
