"""The safetensors container read strictly: one parser for the files the package writes (subnetworks, packed
checkpoints).

Parsing the small header here, rather than through the safetensors library, gives one error type naming the file
and the tensor for every defect (truncation, overlaps, gaps, wrong dtypes, sizes that do not add up), and every
size is checked against the file before anything is allocated. Framework checkpoints in safetensors are read
with the library itself (:mod:`opentrans_hub.io.checkpoints`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import OpenTransError
from .limits import check_json, out_of_memory
from .sniff import MAX_HEADER_BYTES

#: safetensors dtype name -> bytes per element
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass(frozen=True)
class Entry:
    """One stored tensor: its dtype and shape, and where its bytes lie in the file (absolute offsets)."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Layout:
    """A checked safetensors file: its header metadata and its tensors, in the order of their data."""

    metadata: dict[str, str]
    entries: dict[str, Entry]
    size: int


def read_layout(data: bytes | memoryview, source: str, *, dtypes: Mapping[str, int] = DTYPE_SIZES,
                expected: str = "a safetensors dtype", max_header: int = MAX_HEADER_BYTES) -> Layout:
    """Parse and check ``data``'s header: the metadata maps strings to strings, every tensor has a dtype among
    ``dtypes`` (else the error says ``expected``), and the data of all tensors tiles the body exactly."""
    size = len(data)
    if size < 8:
        raise OpenTransError(f"truncated: {size} bytes is too short for a safetensors file", path=source)
    length = int.from_bytes(bytes(data[:8]), "little")
    if length > max_header or 8 + length > size:
        raise OpenTransError(f"truncated or not safetensors: header length {length} exceeds the file ({size} bytes)",
                             path=source)
    check_json(length, "the header", source)
    try:
        header = json.loads(bytes(data[8:8 + length]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise OpenTransError("safetensors header is not valid JSON", path=source) from None
    except MemoryError:
        raise out_of_memory(length, "parsing the header", source) from None
    if not isinstance(header, dict):
        raise OpenTransError("safetensors header is not a JSON object", path=source)
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise OpenTransError("safetensors __metadata__ must map strings to strings", path=source)
    body, body_len = 8 + length, size - 8 - length
    entries: dict[str, Entry] = {}
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise OpenTransError("tensor entry is not an object", path=source, tensor=name)
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in dtypes:
            raise OpenTransError(f"dtype {dtype!r}, expected {expected}", path=source, tensor=name)
        if (not isinstance(shape, list) or not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in [*offsets, *shape])):
            raise OpenTransError("bad shape or data_offsets", path=source, tensor=name)
        start, end = offsets
        if not start <= end <= body_len or end - start != math.prod(shape) * dtypes[dtype]:
            raise OpenTransError(f"data_offsets {offsets} do not fit the {body_len}-byte body (truncated?)",
                                 path=source, tensor=name)
        entries[name] = Entry(dtype, tuple(shape), body + start, body + end)
    position = body
    ordered = dict(sorted(entries.items(), key=lambda item: (item[1].start, item[1].end)))
    for name, entry in ordered.items():
        if entry.start != position:
            raise OpenTransError("tensor data overlaps or leaves a gap", path=source, tensor=name)
        position = entry.end
    if position != size:
        raise OpenTransError(f"{size - position} trailing bytes after the last tensor", path=source)
    return Layout(metadata, ordered, size)
