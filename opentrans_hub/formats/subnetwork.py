"""Subnetwork: the portable mask of a pruned CLIP image encoder.

A Subnetwork maps canonical tensor names (open_clip visual-tower names, e.g. ``layer1.0.conv1.weight``)
to boolean keep-masks, plus the architecture id it was found on and its provenance. It is stored as a
safetensors file whose tensors are the bit-packed masks (``packbits``: 1 bit per weight) or zstd over
those bits (``zstd``), with shapes and provenance in the header metadata.

Identity is the sha256 over canonical content (the architecture id, sorted names, shapes and bits), so
re-encoding a mask or changing its provenance never changes its hash, and declaring the same masks for another
architecture does.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import OpenTransError
from ..io.atomic import atomic_write_bytes, read_bytes
from ..towers.archs import check_arch, check_tensor_name

FORMAT = "opentrans-hub/subnetwork"
FORMAT_VERSION = 1
ENCODINGS = ("packbits", "zstd")
_MAX_HEADER_BYTES = 64 * 1024 * 1024
_ZSTD_LEVEL = 19
_MAX_NDIM = 16
_MAX_DIM = 1 << 48
_MAX_WEIGHTS = 1 << 34  # per tensor: 17G weights, 2 GiB of bits; far beyond any CLIP layer
#: other file formats that embed a subnetwork: header ``format`` -> reader(data, source, verify) (packed files)
CONTAINERS: dict[str, Any] = {}


@dataclass(frozen=True)
class LayerStats:
    """Counts for one masked tensor."""

    name: str
    shape: tuple[int, ...]
    numel: int
    kept: int

    @property
    def masked(self) -> int:
        return self.numel - self.kept

    @property
    def sparsity(self) -> float:
        return self.masked / self.numel if self.numel else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "numel": self.numel, "kept": self.kept,
                "masked": self.masked, "sparsity": self.sparsity}


def _library_version() -> str:
    from ..version import __version__

    return __version__


def default_provenance(method: str, *, base_sha256: str | None = None, **settings: Any) -> dict[str, Any]:
    """Provenance every new Subnetwork should carry: method, its settings, version and creation time.

    ``base_sha256`` (the sha256 of the weights the mask was found on, see ``backbones.weights_sha256``) is
    recorded as ``base_weights_sha256`` when known, so a user can tell whether a mask fits their weights.
    """
    provenance = {
        "method": method,
        "settings": settings,
        "library": f"opentrans-hub {_library_version()}",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if base_sha256 is not None:
        provenance["base_weights_sha256"] = base_sha256
    return provenance


class Subnetwork:
    """Canonical name -> boolean keep-mask (True = weight kept), an architecture id and provenance."""

    def __init__(self, masks: Mapping[str, torch.Tensor | np.ndarray], arch: str = "unknown",
                 provenance: Mapping[str, Any] | None = None):
        check_arch(arch)
        checked: dict[str, torch.Tensor] = {}
        for name, mask in masks.items():
            check_tensor_name(name)
            if isinstance(mask, np.ndarray):
                if mask.dtype != np.bool_:
                    raise OpenTransError(f"mask must have dtype bool, got numpy {mask.dtype}", tensor=name)
                mask = torch.from_numpy(np.ascontiguousarray(mask))
            if not isinstance(mask, torch.Tensor):
                raise OpenTransError(f"mask must be a tensor, got {type(mask).__name__}", tensor=name)
            if mask.dtype != torch.bool:
                raise OpenTransError(f"mask must have dtype bool, got {mask.dtype}", tensor=name)
            if mask.dim() < 2 or mask.numel() == 0:
                raise OpenTransError(f"mask of shape {tuple(mask.shape)}: masks cover Conv/Linear weights, which are "
                                     "non-empty and at least 2-D (not biases, norms or scalars)", tensor=name)
            checked[name] = mask.detach().to("cpu").contiguous()
        self._masks = dict(sorted(checked.items()))
        self.arch = arch
        self.provenance: dict[str, Any] = dict(provenance or {})
        self._sha256: str | None = None

    # ----------------------------------------------------------------- content
    @property
    def masks(self) -> Mapping[str, torch.Tensor]:
        """Read-only view of the masks, sorted by name."""
        return _ReadOnly(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    def __contains__(self, name: object) -> bool:
        return name in self._masks

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._masks[name]

    @property
    def sha256(self) -> str:
        """sha256 over the architecture id and the sorted names, shapes and packed bits: the same for any
        encoding or provenance, different for the same masks declared for another architecture."""
        if self._sha256 is None:
            self._sha256 = _content_hash(self.arch, ((n, tuple(m.shape), _pack(m)) for n, m in self._masks.items()))
        return self._sha256

    def layers(self) -> list[LayerStats]:
        return [LayerStats(name, tuple(m.shape), m.numel(), int(m.sum())) for name, m in self._masks.items()]

    @property
    def base_sha256(self) -> str | None:
        """sha256 of the weights the mask was found on, when the provenance records it."""
        value = self.provenance.get("base_weights_sha256", self.provenance.get("base_sha256"))
        return value if isinstance(value, str) else None

    @property
    def numel(self) -> int:
        return sum(m.numel() for m in self._masks.values())

    @property
    def kept(self) -> int:
        return sum(int(m.sum()) for m in self._masks.values())

    @property
    def masked(self) -> int:
        return self.numel - self.kept

    @property
    def sparsity(self) -> float:
        """Fraction of masked weights over all masked tensors."""
        total = self.numel
        return self.masked / total if total else 0.0

    def stats(self) -> dict[str, Any]:
        """Overall and per-layer statistics as plain data (what ``inspect --json`` prints)."""
        layers = self.layers()
        numel = sum(layer.numel for layer in layers)
        kept = sum(layer.kept for layer in layers)
        return {"arch": self.arch, "sha256": self.sha256, "sparsity": (numel - kept) / numel if numel else 0.0,
                "masked_params": numel - kept, "kept_params": kept, "total_params": numel,
                "num_layers": len(layers), "layers": [layer.to_dict() for layer in layers]}

    def same_masks(self, other: Subnetwork) -> bool:
        return self.sha256 == other.sha256

    def nested_in(self, other: Subnetwork) -> bool:
        """True when every weight this subnetwork keeps is also kept by ``other`` (IMP rounds are nested)."""
        if set(self._masks) != set(other._masks):
            return False
        return all(not (mask & ~other._masks[name]).any() for name, mask in self._masks.items())

    def with_provenance(self, **updates: Any) -> Subnetwork:
        """A copy sharing the masks, with provenance entries replaced."""
        copy = Subnetwork.__new__(Subnetwork)
        copy._masks, copy.arch, copy._sha256 = self._masks, self.arch, self._sha256
        copy.provenance = {**self.provenance, **updates}
        return copy

    def __repr__(self) -> str:
        return (f"Subnetwork(arch={self.arch!r}, layers={len(self)}, sparsity={self.sparsity:.4f}, "
                f"sha256={self.sha256[:12]})")

    # ----------------------------------------------------------------- codec
    def to_bytes(self, encoding: str = "packbits") -> bytes:
        """Serialise as safetensors (uint8 tensors, one per mask; header metadata carries the rest)."""
        if encoding not in ENCODINGS:
            raise OpenTransError(f"unknown encoding {encoding!r}; choose one of {', '.join(ENCODINGS)}")
        from safetensors.numpy import save

        if encoding == "zstd":
            import zstandard

            compressor = zstandard.ZstdCompressor(level=_ZSTD_LEVEL, write_content_size=True)
        tensors: dict[str, np.ndarray] = {}
        for name, mask in self._masks.items():
            packed = _pack(mask)
            if encoding == "zstd":
                packed = compressor.compress(packed)
            tensors[name] = np.frombuffer(packed, dtype=np.uint8)
        metadata = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "encoding": encoding,
            "arch": self.arch,
            "shapes": json.dumps({name: list(mask.shape) for name, mask in self._masks.items()}),
            "provenance": json.dumps(self.provenance, sort_keys=True, default=str),
            "sha256": self.sha256,
        }
        return save(tensors, metadata=metadata)

    def save(self, path: str | os.PathLike, encoding: str = "packbits") -> Path:
        """Write atomically to ``path`` (safetensors)."""
        return atomic_write_bytes(path, self.to_bytes(encoding))

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<bytes>", verify: bool = True) -> Subnetwork:
        """Decode a file written by :meth:`to_bytes` (or one embedding it, see ``CONTAINERS``); any defect
        raises :class:`OpenTransError`."""
        container = CONTAINERS.get(_declared_format(data))
        if container is not None:
            return container(data, source, verify)
        metadata, tensors = _read_safetensors_u8(data, source)
        if metadata.get("format") != FORMAT:
            raise OpenTransError(f"not an opentrans-hub subnetwork (format={metadata.get('format')!r})", path=source)
        version = metadata.get("format_version", "")
        if not version.isdigit():
            raise OpenTransError(f"bad format_version {version!r}", path=source)
        if int(version) > FORMAT_VERSION:
            raise OpenTransError(f"format version {version} is newer than this library reads ({FORMAT_VERSION}); "
                                 "upgrade opentrans-hub", path=source)
        encoding = metadata.get("encoding")
        if encoding not in ENCODINGS:
            raise OpenTransError(f"unknown encoding {encoding!r}", path=source)
        shapes = _json_field(metadata, "shapes", dict, source)
        provenance = _json_field(metadata, "provenance", dict, source)
        arch = metadata.get("arch") or "unknown"
        try:
            check_arch(arch)
            for name in tensors:
                check_tensor_name(name)
        except OpenTransError as exc:
            raise OpenTransError(exc.detail, path=source) from None
        if set(shapes) != set(tensors):
            missing = sorted(set(shapes) ^ set(tensors))[:3]
            raise OpenTransError(f"header shapes and stored tensors disagree (e.g. {missing})", path=source)
        if encoding == "zstd":
            import zstandard

            decompressor = zstandard.ZstdDecompressor()
        masks: dict[str, torch.Tensor] = {}
        for name in sorted(tensors):
            shape = shapes[name]
            if (not isinstance(shape, list) or len(shape) > _MAX_NDIM
                    or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= _MAX_DIM for d in shape)):
                raise OpenTransError(f"bad shape {str(shape)[:80]}", path=source, tensor=name)
            numel = math.prod(shape)
            if numel > _MAX_WEIGHTS:
                raise OpenTransError(f"shape {shape} holds {numel} weights, more than any real layer",
                                     path=source, tensor=name)
            nbytes = (numel + 7) // 8
            raw = tensors[name]
            if encoding == "zstd":
                try:
                    declared = zstandard.frame_content_size(raw)
                    if declared >= 0 and declared != nbytes:  # refuse before allocating what the frame claims
                        raise OpenTransError(f"zstd frame holds {declared} bytes, shape {shape} needs {nbytes}",
                                             path=source, tensor=name)
                    raw = _inflate(decompressor, raw, nbytes, source, name)
                except zstandard.ZstdError as exc:
                    raise OpenTransError(f"corrupted zstd stream ({exc})", path=source, tensor=name) from None
            if len(raw) != nbytes:
                raise OpenTransError(f"{len(raw)} bytes of bits for shape {shape} ({numel} weights need {nbytes})",
                                     path=source, tensor=name)
            bits = np.frombuffer(raw, dtype=np.uint8)
            if numel % 8 and nbytes and bits[-1] & ((1 << (8 - numel % 8)) - 1):
                raise OpenTransError("padding bits are not zero (corrupted or not canonical)", path=source,
                                     tensor=name)
            unpacked = np.unpackbits(bits, count=numel).astype(bool, copy=False)
            masks[name] = torch.from_numpy(unpacked.reshape(shape))
        try:
            sub = cls(masks, arch=arch, provenance=provenance)
        except OpenTransError as exc:
            raise OpenTransError(exc.detail, path=source, tensor=exc.tensor) from None
        expected = metadata.get("sha256")
        if verify:
            if not expected:
                raise OpenTransError("no sha256 in the header", path=source)
            if sub.sha256 != expected:
                if expected == _content_hash(None, ((n, tuple(m.shape), _pack(m)) for n, m in sub._masks.items())):
                    raise OpenTransError("written by opentrans-hub 0.1, whose hash did not cover the architecture: "
                                         "load it with verify=False, check its arch, and save it again", path=source)
                raise OpenTransError(f"content hash mismatch: header says {expected[:16]}..., "
                                     f"content is {sub.sha256[:16]}... (masks, shapes or arch changed)", path=source)
        return sub

    @classmethod
    def load(cls, path: str | os.PathLike, verify: bool = True, expected_sha256: str | None = None) -> Subnetwork:
        """Read a subnetwork file; ``expected_sha256`` additionally pins its identity (registries, Hub)."""
        path = Path(path)
        sub = cls.from_bytes(read_bytes(path), source=str(path), verify=verify)
        if expected_sha256 is not None and sub.sha256 != expected_sha256:
            raise OpenTransError(f"sha256 {sub.sha256} is not the expected {expected_sha256}", path=path)
        sub.noncanonical(source=str(path), warn=True)
        return sub

    def noncanonical(self, source: str | None = None, warn: bool = False) -> list[str] | None:
        """Mask names (or shapes) the tower of :attr:`arch` does not have; None when that tower is not known.

        A subnetwork whose names are not those of its architecture (a prefix left on, another model's masks)
        fails only later, at apply time; ``warn`` says so now (what ``load`` and ``inspect`` do).
        """
        from ..towers.archs import noncanonical, warn_noncanonical

        shapes = {name: tuple(mask.shape) for name, mask in self._masks.items()}
        if warn:
            return warn_noncanonical(shapes, self.arch, "mask", source)
        return noncanonical(shapes, self.arch)


# --------------------------------------------------------------------- helpers
class _ReadOnly(Mapping):
    def __init__(self, data: dict):
        self._data = data

    def __getitem__(self, key):
        return self._data[key]

    def __iter__(self):
        return iter(self._data)

    def __len__(self):
        return len(self._data)


def _pack(mask: torch.Tensor) -> bytes:
    return np.packbits(mask.reshape(-1).numpy()).tobytes()


def _content_hash(arch: str | None, items) -> str:
    """sha256 over ``arch`` and (name, shape, packed bits) items; ``arch=None`` is the 0.1 hash (no arch)."""
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


def _inflate(decompressor, raw: bytes, nbytes: int, source: str, name: str) -> bytes:
    """Decompress one zstd frame, never holding more than ``nbytes + 1`` bytes (bombs, lying frames)."""
    reader = decompressor.stream_reader(raw)
    chunks, total = [], 0
    while True:
        chunk = reader.read(min(1 << 20, nbytes + 1 - total))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > nbytes:
            raise OpenTransError(f"zstd stream inflates beyond the {nbytes} bytes its shape needs",
                                 path=source, tensor=name)


def _declared_format(data: bytes) -> str | None:
    """The ``format`` a safetensors header declares, or None; never raises (the strict reader reports)."""
    try:
        (length,) = struct.unpack("<Q", bytes(data[:8]))
        if length > _MAX_HEADER_BYTES or len(data) < 8 + length:
            return None
        value = json.loads(bytes(data[8:8 + length])).get("__metadata__", {}).get("format")
        return value if isinstance(value, str) else None
    except (ValueError, struct.error, AttributeError, UnicodeDecodeError, RecursionError):
        return None


def _json_field(metadata: Mapping[str, str], key: str, kind: type, source: str):
    try:
        value = json.loads(metadata.get(key, ""))
    except (TypeError, ValueError, RecursionError):
        raise OpenTransError(f"header field {key!r} is not valid JSON", path=source) from None
    if not isinstance(value, kind):
        raise OpenTransError(f"header field {key!r} must be a JSON {kind.__name__}", path=source)
    return value


def _read_safetensors_u8(data: bytes, source: str) -> tuple[dict[str, str], dict[str, bytes]]:
    """Strict reader for safetensors files whose tensors are all uint8 (our masks).

    Parsing the small header ourselves gives one error type with the file and tensor named for every
    defect (truncation, overlaps, wrong dtypes) instead of whatever the backend raises.
    """
    head = data[:64].removeprefix(b"\xef\xbb\xbf").lstrip()[:1]
    if head in (b"{", b"["):
        try:
            json.loads(data.decode("utf-8-sig"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            pass
        else:
            what = ("a layer selection manifest (JSON)" if b'"opentrans-hub/layer-selection"' in data
                    else "a JSON file")
            raise OpenTransError(f"is {what}, not a subnetwork (.safetensors)", path=source)
    if len(data) < 8:
        raise OpenTransError(f"truncated: {len(data)} bytes is too short for a safetensors file", path=source)
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > _MAX_HEADER_BYTES or 8 + header_len > len(data):
        raise OpenTransError(f"truncated or not safetensors: header length {header_len} exceeds the file "
                             f"({len(data)} bytes)", path=source)
    try:
        header = json.loads(data[8:8 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise OpenTransError("safetensors header is not valid JSON", path=source) from None
    if not isinstance(header, dict):
        raise OpenTransError("safetensors header is not a JSON object", path=source)
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise OpenTransError("safetensors __metadata__ must map strings to strings", path=source)
    body = memoryview(data)[8 + header_len:]
    tensors: dict[str, bytes] = {}
    spans = []
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise OpenTransError("tensor entry is not an object", path=source, tensor=name)
        if entry.get("dtype") != "U8":
            raise OpenTransError(f"dtype {entry.get('dtype')!r}, expected U8 (packed bits)", path=source, tensor=name)
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if (not isinstance(shape, list) or len(shape) != 1 or not isinstance(shape[0], int)
                or not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise OpenTransError("bad shape or data_offsets", path=source, tensor=name)
        start, end = offsets
        if not 0 <= start <= end <= len(body) or end - start != shape[0]:
            raise OpenTransError(f"data_offsets {offsets} do not fit the {len(body)}-byte body (truncated?)",
                                 path=source, tensor=name)
        spans.append((start, end, name))
        tensors[name] = bytes(body[start:end])
    spans.sort()
    position = 0
    for start, end, name in spans:
        if start != position:
            raise OpenTransError("tensor data overlaps or leaves a gap", path=source, tensor=name)
        position = end
    if position != len(body):
        raise OpenTransError(f"{len(body) - position} trailing bytes after the last tensor", path=source)
    return metadata, tensors
