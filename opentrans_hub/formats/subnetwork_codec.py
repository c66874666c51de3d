"""The subnetwork file format and its identity: keep-masks as safetensors, about one bit per weight.

A subnetwork file is a safetensors file with one uint8 tensor per mask: its bits packed (``packbits``) or zstd over
those bits (``zstd``), see :mod:`opentrans_hub.io.bitmask`. The header metadata carries the format and its version,
the encoding, the architecture id, the masks' shapes, the provenance (JSON) and the content sha256.

Identity is the sha256 over canonical content (the architecture id, sorted names, shapes and bits), so
re-encoding a mask or changing its provenance never changes its hash, and declaring the same masks for another
architecture does. This module is the codec and the hash; :class:`~opentrans_hub.formats.subnetwork.Subnetwork`
is the object built from them.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import OpenTransError
from ..io.bitmask import ENCODINGS, BitCodec, check_encoding, pack_bits
from ..io.container import read_layout
from ..io.limits import check_decode
from ..io.sniff import SUBNETWORK_FORMAT, format_name
from ..towers.archs import check_arch, check_tensor_name

FORMAT = SUBNETWORK_FORMAT
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 64 * 1024 * 1024
_MAX_NDIM = 16
_MAX_DIM = 1 << 48

__all__ = ["ENCODINGS", "FORMAT", "FORMAT_VERSION", "Decoded", "check_identity", "content_hash", "decode",
           "decode_parts", "encode", "encode_parts", "mask_items"]


def mask_items(masks: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, tuple[int, ...], bytes]]:
    """(name, shape, packed bits) of every mask, in the mapping's order: what the content hash covers."""
    return ((name, tuple(mask.shape), pack_bits(mask)) for name, mask in masks.items())


def content_hash(arch: str | None, items: Iterable[tuple[str, tuple[int, ...], bytes]]) -> str:
    """sha256 over ``arch`` and (name, shape, packed bits) items in name order; ``arch=None`` is the hash
    opentrans-hub 0.1 wrote (no architecture)."""
    if arch is None:
        digest = hashlib.sha256(b"opentrans-hub/subnetwork/v1\0")
    else:
        digest = hashlib.sha256(b"opentrans-hub/subnetwork/v2\0")
        encoded = arch.encode("utf-8")
        digest.update(struct.pack("<Q", len(encoded)) + encoded)
    for name, shape, packed in items:
        encoded = name.encode("utf-8")
        digest.update(struct.pack("<Q", len(encoded)) + encoded)
        digest.update(struct.pack("<Q", len(shape)) + struct.pack(f"<{len(shape)}Q", *shape))
        digest.update(struct.pack("<Q", len(packed)) + packed)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------- encoding
def encode_parts(masks: Mapping[str, torch.Tensor], arch: str, provenance: Mapping[str, Any], sha256: str,
                 encoding: str = "packbits") -> tuple[dict[str, str], dict[str, bytes]]:
    """(header metadata, stored bytes per mask name) of a subnetwork: what a file (or a packed checkpoint's
    embedded subnetwork) stores."""
    codec = BitCodec(encoding)
    blobs = {name: codec.encode(mask) for name, mask in masks.items()}
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "encoding": encoding,
        "arch": arch,
        "shapes": json.dumps({name: list(mask.shape) for name, mask in masks.items()}),
        "provenance": json.dumps(dict(provenance), sort_keys=True, default=str),
        "sha256": sha256,
    }
    return metadata, blobs


def encode(masks: Mapping[str, torch.Tensor], arch: str, provenance: Mapping[str, Any], sha256: str,
           encoding: str = "packbits") -> bytes:
    """A subnetwork file's bytes (safetensors: one uint8 tensor per mask, the rest in the header)."""
    from safetensors.numpy import save

    check_encoding(encoding)
    metadata, blobs = encode_parts(masks, arch, provenance, sha256, encoding)
    return save({name: np.frombuffer(blob, dtype=np.uint8) for name, blob in blobs.items()}, metadata=metadata)


# ----------------------------------------------------------------------------------------- decoding
@dataclass
class Decoded:
    """What a subnetwork file holds, checked field by field but not yet against its content hash."""

    masks: dict[str, torch.Tensor]
    arch: str
    provenance: dict[str, Any]
    sha256: str | None  # as the header records it


def decode(data: bytes | memoryview, source: str) -> Decoded:
    """Decode a subnetwork file strictly; any defect raises :class:`OpenTransError` naming the file (and tensor)."""
    layout = read_layout(data, source, dtypes={"U8": 1}, expected="U8 (packed bits)", max_header=MAX_HEADER_BYTES)
    view = memoryview(data)
    blobs = {}
    for name, entry in layout.entries.items():
        if len(entry.shape) != 1:
            raise OpenTransError("bad shape or data_offsets", path=source, tensor=name)
        blobs[name] = view[entry.start:entry.end]
    return decode_parts(layout.metadata, blobs, source)


def decode_parts(metadata: Mapping[str, str], blobs: Mapping[str, bytes | memoryview], source: str) -> Decoded:
    """Decode a subnetwork from its header metadata and stored bytes per mask name (a file's, or the ones a
    packed checkpoint embeds)."""
    if format_name(metadata.get("format")) != FORMAT:
        raise OpenTransError(f"not an opentrans-hub subnetwork (format={metadata.get('format')!r})", path=source)
    version = metadata.get("format_version", "")
    if not (version.isascii() and version.isdigit()):  # str.isdigit() also takes '¹', which int() refuses
        raise OpenTransError(f"bad format_version {version!r}", path=source)
    if int(version) > FORMAT_VERSION:
        raise OpenTransError(f"format version {version} is newer than this library reads ({FORMAT_VERSION}); "
                             "upgrade opentrans-hub", path=source)
    codec = BitCodec(metadata.get("encoding"), source)
    shapes = _json_field(metadata, "shapes", dict, source)
    provenance = _json_field(metadata, "provenance", dict, source)
    arch = metadata.get("arch") or "unknown"
    try:
        check_arch(arch)
        for name in blobs:
            check_tensor_name(name)
    except OpenTransError as exc:
        raise OpenTransError(exc.detail, path=source) from None
    if set(shapes) != set(blobs):
        missing = sorted(set(shapes) ^ set(blobs))[:3]
        raise OpenTransError(f"header shapes and stored tensors disagree (e.g. {missing})", path=source)
    total = 0
    for name in sorted(blobs):  # every shape and stored size checked before any mask is decoded
        shape = shapes[name]
        if (not isinstance(shape, list) or len(shape) > _MAX_NDIM
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= _MAX_DIM for d in shape)):
            raise OpenTransError(f"bad shape {str(shape)[:80]}", path=source, tensor=name)
        codec.check_stored(blobs[name], tuple(shape), source, name)
        total += math.prod(shape)
    check_decode(total, f"decoding {len(blobs)} mask{'s' * (len(blobs) != 1)} (a byte per weight)", source)
    masks: dict[str, torch.Tensor] = {}
    for name in sorted(blobs):
        shape = shapes[name]
        masks[name] = torch.from_numpy(codec.decode(blobs[name], tuple(shape), source, name).reshape(shape))
    declared = metadata.get("sha256")
    return Decoded(masks, arch, provenance, declared if isinstance(declared, str) else None)


def check_identity(declared: str | None, actual: str, masks: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse a subnetwork whose content hash is not the one its header records (naming the file)."""
    if not declared:
        raise OpenTransError("no sha256 in the header", path=source)
    if actual == declared:
        return
    if declared == content_hash(None, mask_items(dict(sorted(masks.items())))):
        raise OpenTransError("written by opentrans-hub 0.1, whose hash did not cover the architecture: "
                             "load it with verify=False, check its arch, and save it again", path=source)
    raise OpenTransError(f"content hash mismatch: header says {declared[:16]}..., "
                         f"content is {actual[:16]}... (masks, shapes or arch changed)", path=source)


def _json_field(metadata: Mapping[str, str], key: str, kind: type, source: str) -> Any:
    try:
        value = json.loads(metadata.get(key, ""))
    except (TypeError, ValueError, RecursionError):
        raise OpenTransError(f"header field {key!r} is not valid JSON", path=source) from None
    if not isinstance(value, kind):
        raise OpenTransError(f"header field {key!r} must be a JSON {kind.__name__}", path=source)
    return value
