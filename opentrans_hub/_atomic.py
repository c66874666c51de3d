"""File I/O of the library: atomic writes (a reader sees the old file or the new one), and reads that fail
with the library error naming the file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import OpenTransError


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``.

    A failure (no permission, disk full, a folder in the way) raises :class:`OpenTransError` naming the
    file, and leaves the old file, if any, as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OpenTransError(f"cannot write ({exc.strerror or exc})", path=path) from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError):
            raise OpenTransError(f"cannot write ({exc.strerror or exc})", path=path) from None
        raise
    return path


def read_bytes(path: str | os.PathLike) -> bytes:
    """A file's bytes; an unreadable file is an OpenTransError naming it (not an OSError traceback)."""
    from .errors import OpenTransError

    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise OpenTransError(f"cannot read ({exc.strerror or exc})", path=path) from None


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Text flavour of :func:`atomic_write_bytes` (UTF-8)."""
    return atomic_write_bytes(path, text.encode("utf-8"))
