"""How many bytes a decode of untrusted input may materialise: one limit, checked before anything is allocated.

A few kilobytes of file can claim gigabytes: a zstd frame of zeros and a large shape in a header decode to a dense
tensor a million times the file's size. Every decoder of the package adds up what it is about to allocate from the
header alone and asks :func:`check_decode` first, so a file that claims too much is refused with one clear error
instead of exhausting memory.

The limit, first found wins: a :func:`decode_limit` block (the command line's ``--max-bytes``); the environment
variable ``OPENTRANS_HUB_MAX_DECODE_BYTES``; else the smallest of 64 GiB, the machine's physical memory and the
address space this process may still take (``RLIMIT_AS`` less what it maps already). Sizes are bytes, or a number
with a binary suffix: ``512M``, ``64G``, ``1.5T``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from ..errors import OpenTransError

ENV = "OPENTRANS_HUB_MAX_DECODE_BYTES"
DEFAULT_CAP = 64 << 30
#: Python objects a byte of JSON text can become, at most about: ``{},`` is a 64-byte dict and its pointer
JSON_EXPANSION = 32
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?)\s*([KMGTP]?)(?:I?B)?\s*", re.IGNORECASE)
_OVERRIDE: ContextVar[int | None] = ContextVar("opentrans_hub_max_decode_bytes", default=None)


def parse_size(text: str | int) -> int:
    """Bytes from ``123``, ``512M``, ``64GiB``, ``1.5T`` (binary units); a positive whole number of bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        found = _SIZE.fullmatch(str(text))
        if not found:
            raise ValueError(f"{text!r} is not a size (bytes, or a number with K, M, G or T: 512M, 64G)")
        value = int(float(found.group(1)) * _UNITS[found.group(2).upper()])
    if value <= 0:
        raise ValueError(f"{text!r}: a size must be positive")
    return value


def human(nbytes: int) -> str:
    """``8.0 GiB``: a size for messages."""
    size = float(nbytes)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{nbytes:,} bytes" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _address_space_left() -> int | None:
    """What ``RLIMIT_AS`` still allows this process to map (None where it is unlimited or not known)."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft == resource.RLIM_INFINITY:
            return None
        with open("/proc/self/statm") as handle:
            mapped = int(handle.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        return max(soft - mapped, 0)
    except (ImportError, OSError, ValueError, IndexError):
        return None


def max_decode_bytes() -> tuple[int, str]:
    """(the limit in bytes, where it comes from: ``--max-bytes``, the environment variable, or the default)."""
    chosen = _OVERRIDE.get()
    if chosen is not None:
        return chosen, "set by --max-bytes or decode_limit()"
    if os.environ.get(ENV, "").strip():
        try:
            return parse_size(os.environ[ENV]), ENV
        except ValueError as exc:
            raise OpenTransError(f"{ENV}: {exc}") from None
    caps = [DEFAULT_CAP, _physical_memory(), _address_space_left()]
    return min(c for c in caps if c is not None), "default: the least of 64 GiB, memory and address space"


def check_decode(nbytes: int, what: str, source: str | os.PathLike | None = None, tensor: str | None = None) -> None:
    """Refuse, before allocating, a decode that would materialise more than :func:`max_decode_bytes`."""
    limit, origin = max_decode_bytes()
    if nbytes > limit:
        raise OpenTransError(f"{what} would materialise {human(nbytes)}, more than the decode limit of {human(limit)} "
                             f"({origin}); if you trust this file, raise it with {ENV} or --max-bytes",
                             path=source, tensor=tensor)


def check_json(nbytes: int, what: str, source: str | os.PathLike | None = None) -> None:
    """Refuse, before parsing, JSON text whose objects could exceed the limit (:data:`JSON_EXPANSION` per byte)."""
    check_decode(JSON_EXPANSION * nbytes, f"parsing {what} ({human(nbytes)} of JSON)", source)


def out_of_memory(nbytes: int, what: str, source: str | os.PathLike | None, tensor: str | None = None
                  ) -> OpenTransError:
    """The error for an allocation that failed although the limit allowed it (the memory is not there)."""
    return OpenTransError(f"out of memory while {what} ({human(nbytes)}); free memory or lower {ENV}", path=source,
                          tensor=tensor)


@contextmanager
def decode_limit(nbytes: int | str | None) -> Iterator[None]:
    """Within the block, decodes may materialise up to ``nbytes`` (``512M``, ``64G``...); None keeps the limit."""
    if nbytes is None:
        yield
        return
    try:
        value = parse_size(nbytes)
    except ValueError as exc:
        raise OpenTransError(f"decode limit: {exc}") from None
    token = _OVERRIDE.set(value)
    try:
        yield
    finally:
        _OVERRIDE.reset(token)
