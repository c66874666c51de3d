"""Hand-made hostile files for the decoders' tests: edit a real file's safetensors header in place.

A safetensors file is an 8-byte little-endian header length, the header JSON, then the tensors' bytes at offsets
relative to the body. These helpers split a file, let a test change the header (metadata strings, JSON fields
inside them, tensor entries) or swap one stored tensor's bytes, and join it again with the header re-padded to a
multiple of 8 bytes and the offsets recomputed, so the result is a well-formed container that lies only where the
test makes it lie.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from typing import Any


def split(data: bytes) -> tuple[dict[str, Any], bytes]:
    """(the header as a dict, the body bytes)."""
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length]), data[8 + length:]


def join(header: dict[str, Any], body: bytes) -> bytes:
    """A safetensors file of ``header`` and ``body``, the header padded with blanks to a multiple of 8."""
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def edit_meta(data: bytes, **fields: str | None) -> bytes:
    """Set (or, with None, delete) header metadata strings."""
    header, body = split(data)
    meta = header.setdefault("__metadata__", {})
    for key, value in fields.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    return join(header, body)


def edit_json(data: bytes, field: str, change: Callable[[Any], Any]) -> bytes:
    """Replace the JSON held in the metadata string ``field`` by ``change(parsed)`` (which may edit in place)."""
    header, body = split(data)
    meta = header["__metadata__"]
    value = json.loads(meta[field])
    result = change(value)
    meta[field] = json.dumps(value if result is None else result, sort_keys=True)
    return join(header, body)


def edit_subnetwork(data: bytes, **fields: str) -> bytes:
    """Set fields of the subnetwork header a packed file embeds (its ``arch``, ``sha256``, ``shapes``...)."""
    return edit_json(data, "subnetwork", lambda sub: sub.update(fields))


def replace_tensors(data: bytes, blobs: dict[str, bytes], shapes: dict[str, list[int]] | None = None) -> bytes:
    """Swap the stored bytes of some tensors (and, when given, their entry shapes); every offset is recomputed in
    the file's order, so the container stays exact."""
    header, body = split(data)
    entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"])
    parts, offset = [], 0
    for name, entry in entries:
        start, end = entry["data_offsets"]
        chunk = blobs.get(name, body[start:end])
        if shapes and name in shapes:
            entry["shape"] = shapes[name]
        entry["data_offsets"] = [offset, offset + len(chunk)]
        offset += len(chunk)
        parts.append(chunk)
    return join(header, b"".join(parts))


def zeros_frame(nbytes: int) -> bytes:
    """A zstd frame of ``nbytes`` zero bytes, its content size in the frame (about nbytes / 32768 bytes long)."""
    import zstandard

    compressor = zstandard.ZstdCompressor(level=1).compressobj(size=nbytes)
    chunk = bytes(min(nbytes, 1 << 20))
    out, left = [], nbytes
    while left:
        out.append(compressor.compress(chunk[:min(left, len(chunk))]))
        left -= min(left, len(chunk))
    return b"".join(out) + compressor.flush()


def mask_bomb(packed: bytes, key: str, name: str, shape: list[int]) -> bytes:
    """A zstd-encoded packed file made to claim that its masked tensor ``key`` (mask ``name`` in the embedded
    subnetwork) has ``shape`` and keeps nothing: its mask is a frame of zeros of exactly the size that shape needs,
    so every count in the header agrees and only the sizes are absurd (a few KB that decode to gigabytes)."""
    numel = 1
    for dim in shape:
        numel *= dim
    data = replace_tensors(packed, {f"{key}::mask": zeros_frame((numel + 7) // 8), f"{key}::kept": b""},
                           shapes={f"{key}::kept": [0]})
    header, body = split(data)
    header[f"{key}::mask"]["shape"] = [header[f"{key}::mask"]["data_offsets"][1]
                                       - header[f"{key}::mask"]["data_offsets"][0]]
    data = join(header, body)
    data = edit_json(data, "tensors", lambda specs: specs[key].update(shape=shape, kept=0))

    def widen(sub: dict) -> None:
        shapes = json.loads(sub["shapes"])
        shapes[name] = shape
        sub["shapes"] = json.dumps(shapes)

    return edit_json(data, "subnetwork", widen)
