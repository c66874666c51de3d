"""File I/O of the library: safe, atomic writes (a reader sees the old file or the new one), and reads that
fail with the library error naming the file.

Every writer of the package goes through :func:`atomic_write_bytes`, which never replaces anything but a
regular file: a symbolic link, a FIFO, a device node or a socket given as the output is refused (``os.replace``
would swap it for a regular file, e.g. turn ``/dev/full`` into a file). The new file gets the mode ``open()``
would give it (``0o666`` less the umask, or the mode of the regular file it replaces), not ``mkstemp``'s 0600.
Command-line writers also call :func:`check_output` before any work, to refuse an existing output without
``--overwrite`` and an output that is one of the command's inputs. An output checked as new stays new: its
write commits with a no-replace link, so of two writers racing to create one file exactly one succeeds and the
other fails naming the file (``overwrite=False`` asks the same of any single write).
"""

from __future__ import annotations

import mmap
import os
import stat
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import OpenTransError

_UMASK_LOCK = threading.Lock()
#: outputs checked as new (``check_output(..., overwrite=False)`` on a missing file): their writes never replace
_MUST_STAY_NEW: set[str] = set()


def _umask() -> int:
    with _UMASK_LOCK:  # reading the umask means setting it; the lock keeps threads of this library consistent
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def check_output(path: str | os.PathLike, *, overwrite: bool = True,
                 inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Refuse an output that must not be written: not a regular file (link, FIFO, device, folder), one of
    ``inputs`` (compared after resolving links), or an existing file when ``overwrite`` is false."""
    path = Path(path)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        info = None
    except OSError as exc:
        raise OpenTransError(f"cannot write ({exc.strerror or exc})", path=path) from None
    if info is not None and not stat.S_ISREG(info.st_mode):
        raise OpenTransError(f"output is {_kind(info.st_mode)}; refusing to replace it with a regular file",
                             path=path)
    resolved = path.resolve()
    for source in inputs:
        if source is not None and str(source) and Path(source).resolve() == resolved:
            raise OpenTransError("output is also an input; write to another file", path=path)
    if info is not None and not overwrite:
        raise OpenTransError("output exists; pass --overwrite to replace it", path=path)
    if info is None and not overwrite:
        _MUST_STAY_NEW.add(os.path.abspath(path))
    return path


def _commit(tmp: str, path: Path, exclusive: bool) -> None:
    """Put the finished temporary file at ``path``: replacing what is there, or, ``exclusive``, only where
    nothing is (a hard link fails on an existing name, so one of two racing writers wins)."""
    if not exclusive:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise OpenTransError("output was created by another writer meanwhile; nothing was written (pass "
                             "--overwrite to replace it)", path=path) from None
    os.unlink(tmp)
    _MUST_STAY_NEW.discard(os.path.abspath(path))


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, overwrite: bool = True) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder, then rename it into place.

    Without ``overwrite`` (or when ``path`` was checked as a new output) an existing file is never replaced: the
    write fails naming it. A failure (no permission, disk full, a folder in the way, a target that is not a
    regular file) raises :class:`OpenTransError` naming the file, and leaves the old file, if any, as it was.
    """
    path = check_output(path)
    try:
        old_mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        old_mode = None
    with new_folders(path.parent):
        _write_new(path, data, old_mode, overwrite)
    return path


def _write_new(path: Path, data: bytes, old_mode: int | None, overwrite: bool) -> None:
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OpenTransError(f"cannot write ({exc.strerror or exc})", path=path) from None
    try:
        os.fchmod(fd, old_mode if old_mode is not None else 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        check_output(path)  # still not a link or device (it may have been made meanwhile)
        _commit(tmp, path, exclusive=not overwrite or os.path.abspath(path) in _MUST_STAY_NEW)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError):
            raise OpenTransError(f"cannot write ({exc.strerror or exc})", path=path) from None
        raise


@contextmanager
def new_folders(folder: str | os.PathLike) -> Iterator[Path]:
    """Create ``folder`` and its missing parents; if the block fails, remove again those it created (when still
    empty), so a refused write leaves no trace."""
    folder = Path(folder)
    missing = []
    probe = folder
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OpenTransError(f"cannot write ({exc.strerror or exc})", path=folder) from None
    try:
        yield folder
    except BaseException:
        for made in missing:  # deepest first
            try:
                made.rmdir()
            except OSError:
                break
        raise


def read_bytes(path: str | os.PathLike) -> bytes:
    """A file's bytes; an unreadable file is an OpenTransError naming it (not an OSError traceback)."""
    path = Path(path)
    if path.is_dir():
        raise OpenTransError("is a directory, expected a file", path=path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise OpenTransError("no such file", path=path) from None
    except OSError as exc:
        raise OpenTransError(f"cannot read ({exc.strerror or exc})", path=path) from None


def map_file(path: str | os.PathLike) -> bytes | mmap.mmap:
    """A file's bytes, memory-mapped (read-only; an empty file gives ``b""``): readers that decode a large file
    one tensor at a time open it once and read only what they touch."""
    path = Path(path)
    if path.is_dir():
        raise OpenTransError("is a directory, expected a file", path=path)
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    except FileNotFoundError:
        raise OpenTransError("no such file", path=path) from None
    except OSError as exc:
        raise OpenTransError(f"cannot read ({exc.strerror or exc})", path=path) from None


def atomic_write_text(path: str | os.PathLike, text: str, *, overwrite: bool = True) -> Path:
    """Text flavour of :func:`atomic_write_bytes` (UTF-8)."""
    return atomic_write_bytes(path, text.encode("utf-8"), overwrite=overwrite)
