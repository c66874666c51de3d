"""What a file holds, from its bytes: the one sniffer every reader of the package asks.

Never from the file's name: a ``.pth`` may hold safetensors and a ``.safetensors`` a torch zip. The kinds:

* ``safetensors``: an 8-byte little-endian header length, then that many bytes of a JSON object;
* ``json``: text that parses as JSON (after a UTF-8 byte-order mark and blanks); ``text``: text that begins
  like JSON (``{`` or ``[``) but does not parse (a damaged manifest);
* ``zip``: ``torch.save``'s zip container; ``pickle``: a pickle stream of protocol 2 or later (torch's
  legacy format);
* ``empty`` and ``unknown``.

``format`` is what the file declares (the safetensors header's ``__metadata__["format"]``, a JSON object's
``"format"``), lower-cased: format names compare case-insensitively. The package's own formats are named here
so that readers on every floor dispatch on the same names.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field

from ..errors import OpenTransError
from .limits import JSON_EXPANSION, max_decode_bytes

SUBNETWORK_FORMAT = "opentrans-hub/subnetwork"
PACKED_FORMAT = "opentrans-hub/packed"
SELECTION_FORMAT = "opentrans-hub/layer-selection"
OURS = "opentrans-hub/"
MAX_HEADER_BYTES = 256 * 1024 * 1024
MAX_JSON_BYTES = 64 * 1024 * 1024
_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class Sniffed:
    """A file's kind, the format it declares (lower case) and, for safetensors, its header metadata."""

    kind: str
    format: str | None = None
    metadata: dict[str, str] | None = field(default=None, compare=False)

    @property
    def ours(self) -> bool:
        """Whether the file declares one of opentrans-hub's formats."""
        return self.format is not None and self.format.startswith(OURS)

    def describe(self) -> str:
        """A few words for error messages: ``an opentrans-hub/subnetwork file``, ``a JSON file``."""
        if self.format:
            return f"an {self.format} file" if self.format[0] in "aeio" else f"a {self.format} file"
        return {"safetensors": "a safetensors file", "json": "a JSON file", "text": "a text file", "zip": "a zip file",
                "pickle": "a pickle", "empty": "an empty file"}.get(self.kind, "a file of unknown kind")


def format_name(value: object) -> str | None:
    """A declared format as compared everywhere: the string lower-cased, anything else None."""
    return value.lower() if isinstance(value, str) else None


def header_length(data: bytes | memoryview) -> int | None:
    """The safetensors header length the first 8 bytes give, when it is plausible (at most 256 MiB)."""
    if len(data) < 8:
        return None
    (length,) = struct.unpack("<Q", bytes(data[:8]))
    return length if length <= MAX_HEADER_BYTES else None


def sniff(data: bytes | memoryview) -> Sniffed:
    """What ``data`` (a whole file, or at least its safetensors header) holds; never raises. JSON text is parsed
    up to 64 MiB (a manifest) and only while its objects fit the decode limit; longer text counts as ``text``
    (and its reader then refuses it, saying why)."""
    if not len(data):
        return Sniffed("empty")
    length = header_length(data)
    if length is not None and 8 + length <= len(data) and _affordable(length):
        header = _json(bytes(data[8:8 + length]), bom=False)
        if isinstance(header, dict):
            meta = header.get("__metadata__")
            meta = meta if isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values()) else None
            return Sniffed("safetensors", format_name(meta.get("format")) if meta else None, meta)
    head = bytes(data[:64]).removeprefix(_BOM).lstrip()[:1]
    if head in (b"{", b"["):
        value = _json(bytes(data), bom=True) if len(data) <= MAX_JSON_BYTES and _affordable(len(data)) else _INVALID
        if value is _INVALID:
            return Sniffed("text")
        return Sniffed("json", format_name(value.get("format")) if isinstance(value, dict) else None)
    start = bytes(data[:4])
    if start == b"PK\x03\x04":
        return Sniffed("zip")
    if start[:1] == b"\x80" and start[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return Sniffed("pickle")
    return Sniffed("unknown")


def sniff_file(path: str | os.PathLike) -> Sniffed:
    """:func:`sniff` of a file, reading no more than its header (or, for JSON text, at most 64 MiB)."""
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            data = handle.read(8)
            length = header_length(data)
            if length is not None and 8 + length <= size:
                data += handle.read(length)
                found = sniff(data)
                if found.kind == "safetensors":
                    return found
            if data.removeprefix(_BOM).lstrip()[:1] in (b"{", b"[", b"") and size <= MAX_JSON_BYTES:
                data += handle.read()
            return sniff(data)
    except OSError as exc:
        raise OpenTransError(f"cannot read ({exc.strerror or exc})", path=path) from None


_INVALID = object()


def _affordable(nbytes: int) -> bool:
    """Whether parsing ``nbytes`` of JSON stays within the decode limit (:mod:`opentrans_hub.io.limits`)."""
    try:
        return JSON_EXPANSION * nbytes <= max_decode_bytes()[0]
    except OpenTransError:  # a malformed limit: the reader that follows reports it
        return False


def _json(raw: bytes, bom: bool) -> object:
    try:
        return json.loads(raw.decode("utf-8-sig" if bom else "utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError, MemoryError):  # the readers then say why, and bounded
        return _INVALID
