"""The packed sparse checkpoint format: what its header says about each tensor, its content hash, and its writer.

A packed file is one safetensors file holding a pruned checkpoint compactly. For each masked tensor it holds the
keep-mask bits (:mod:`opentrans_hub.io.bitmask`: ``packbits`` or ``zstd`` over the whole tensor, whatever its
rank) as ``KEY::mask`` and the kept values in order as ``KEY::kept``, in the tensor's dtype or a recorded cast
(``stored``); every other tensor is stored dense and unchanged. The header metadata carries:

* ``tree``: the checkpoint's nesting and its non-tensor entries (iteration, trainer state...) as JSON;
* ``tensors``: per tensor key its dtype, shape and kept count (:class:`TensorSpec`);
* ``subnetwork``: the header of the Subnetwork the masks form, so it is rebuilt and verified with its own
  sha256; ``masks``: tensor key -> the mask's name in that Subnetwork; ``state``: where the state dict sits;
* ``source_metadata``: the safetensors metadata of the packed checkpoint, which unpacking to safetensors writes;
* ``content_sha256``: sha256 over the dense content (names, dtypes, shapes, bytes of what unpacking gives, plus
  the tree) and, from format version 2, over every other field that changes meaning (:func:`bound_fields`: the
  masks' identity, ``source_metadata``, ``state``), checked whenever the file is decoded.

``arch`` and ``cast`` are written for readers of version 1 but never read: the architecture is the embedded
subnetwork's (inside its sha256) and the cast is the ``stored`` dtypes of the tensors. ``library`` and
``method`` are information. Version 1 files still read; what their hash does not cover is
:data:`UNHASHED_IN_V1`.

Bits are copied through integer views, so ``-0.0`` and NaN payloads in kept positions survive exactly. The reader
is :mod:`opentrans_hub.io.packed`; packing a checkpoint is :mod:`opentrans_hub.zoo.packing`.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
import torch

from ..errors import OpenTransError
from .sniff import PACKED_FORMAT

FORMAT = PACKED_FORMAT
FORMAT_VERSION = 2
#: the fields a version 1 file's content hash leaves out (version 2 covers them)
UNHASHED_IN_V1 = ("masks", "subnetwork.sha256", "source_metadata", "state")
MASK_SUFFIX, KEPT_SUFFIX = "::mask", "::kept"
MAX_NUMEL = 1 << 40
_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL", torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
           torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
_BY_NAME = {name: dtype for dtype, name in _DTYPES.items()}
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
CASTS = {"bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_name(dtype: torch.dtype, key: str, source: str | None = None) -> str:
    """The file's name for a torch dtype; a dtype the format cannot hold is refused, naming the tensor."""
    if dtype not in _DTYPES:
        raise OpenTransError(f"dtype {dtype} cannot be stored in a packed file", path=source, tensor=key)
    return _DTYPES[dtype]


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a file dtype name (``F32``, ``BF16``...)."""
    return _BY_NAME[name]


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as integers of the same width (exact compares and copies, NaN and -0.0 included)."""
    flat = tensor.detach().reshape(-1)
    return flat.view(_INT_VIEW[flat.element_size()]) if flat.dtype != torch.bool else flat.view(torch.uint8)


def count(mask: torch.Tensor | np.ndarray) -> int:
    """Kept weights of a bool mask (numpy counts bools many times faster than torch's sum)."""
    array = mask.reshape(-1).numpy() if isinstance(mask, torch.Tensor) else mask.reshape(-1)
    return int(np.count_nonzero(array))


# ----------------------------------------------------------------------------------------- specs and hashing
@dataclass
class TensorSpec:
    """One tensor of the checkpoint: its dense identity, and for a masked one its kept count and value dtype."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    kept: int | None = None  # masked tensors only
    stored: str | None = None  # dtype of the kept values, when cast

    @property
    def masked(self) -> bool:
        return self.kept is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def dense_bytes(self) -> int:
        return self.numel * _BY_NAME[self.dtype].itemsize

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dtype": self.dtype, "shape": list(self.shape)}
        if self.kept is not None:
            out["kept"] = self.kept
            if self.stored:
                out["stored"] = self.stored
        return out

    @classmethod
    def from_json(cls, key: str, data: Any, source: str) -> TensorSpec:
        ok = (isinstance(data, dict) and data.get("dtype") in _BY_NAME and isinstance(data.get("shape"), list)
              and len(data["shape"]) <= 16
              and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d for d in data["shape"])
              and math.prod(data["shape"]) <= MAX_NUMEL)
        kept, stored = (data.get("kept"), data.get("stored")) if isinstance(data, dict) else (None, None)
        if ok and kept is not None:
            ok = isinstance(kept, int) and not isinstance(kept, bool) and 0 <= kept <= math.prod(data["shape"])
        if ok and stored is not None:
            ok = kept is not None and stored in _BY_NAME
        if not ok:
            raise OpenTransError(f"bad tensor entry {str(data)[:80]}", path=source, tensor=key)
        return cls(key, data["dtype"], tuple(data["shape"]), kept, stored)


def stored_names(spec: TensorSpec) -> list[tuple[str, str, tuple[int, ...]]]:
    """(file tensor name, dtype, shape) of what a spec stores; a mask's shape is its encoded byte count."""
    if not spec.masked:
        return [(spec.key, spec.dtype, spec.shape)]
    return [(spec.key + KEPT_SUFFIX, spec.stored or spec.dtype, (spec.kept,)), (spec.key + MASK_SUFFIX, "U8", (-1,))]


def as_bytes(tensor: torch.Tensor) -> np.ndarray:
    """A CPU tensor's bytes in C order as a flat uint8 array (no copy when it is contiguous): through numpy where
    numpy has the dtype (one call per tensor), else through an integer view (bfloat16, float8)."""
    if tensor.requires_grad:
        tensor = tensor.detach()
    try:
        array = tensor.numpy()
    except (TypeError, RuntimeError):  # a dtype numpy lacks
        array = bits(tensor.contiguous()).numpy()
    if not array.flags.c_contiguous:
        array = np.ascontiguousarray(array)
    return array.reshape(-1).view(np.uint8)


def tensor_hash(key: str, tensor: torch.Tensor) -> bytes:
    """sha256 of one dense tensor: its name, dtype, shape and bytes."""
    return raw_hash(key, _DTYPES[tensor.dtype], tuple(tensor.shape), as_bytes(tensor) if tensor.numel() else b"")


def raw_hash(key: str, dtype: str, shape: tuple[int, ...], data: Any) -> bytes:
    """:func:`tensor_hash` of a tensor given by its file dtype name, shape and bytes in C order (a buffer)."""
    encoded = key.encode("utf-8")
    digest = hashlib.sha256(struct.pack("<Q", len(encoded)) + encoded + dtype.encode() + b"\0"
                            + struct.pack(f"<{len(shape) + 1}Q", len(shape), *shape))
    digest.update(data)
    return digest.digest()


def bound_fields(masks: Mapping[str, str], subnetwork_sha256: str | None, source_metadata: Mapping[str, str],
                 state: str) -> dict[str, Any]:
    """The header fields a version 2 content hash covers besides the dense content and the tree: tensor key ->
    mask name, the embedded subnetwork's sha256 (which covers its architecture, names, shapes and bits), the
    metadata unpacking writes, and where the state dict sits."""
    return {"masks": dict(masks), "subnetwork_sha256": subnetwork_sha256 or "",
            "source_metadata": dict(source_metadata), "state": state}


def content_sha256(hashes: Mapping[str, bytes], tree: Any, bound: Mapping[str, Any] | None = None,
                   version: int = FORMAT_VERSION) -> str:
    """The content hash: per-tensor hashes in key order, then the tree (so any write order works), then for
    version 2 the :func:`bound_fields` (required there, ignored for version 1)."""
    digest = hashlib.sha256(f"opentrans-hub/packed/v{version}\0".encode())
    for key in sorted(hashes):
        digest.update(hashes[key])
    digest.update(b"tree\0" + _canonical(tree))
    if version >= 2:
        if bound is None:
            raise OpenTransError("internal: a version 2 content hash needs the bound header fields")
        digest.update(b"\0header\0" + _canonical(bound))
    return digest.hexdigest()


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode("utf-8")


# ----------------------------------------------------------------------------------------- writing
def write_order(specs: list[TensorSpec]) -> list[TensorSpec]:
    """Widest stored dtypes first, then by key: every tensor of the file starts aligned."""
    return sorted(specs, key=lambda s: (-_BY_NAME[s.stored or s.dtype].itemsize, s.key))


def write(handle: BinaryIO, specs: list[TensorSpec], parts: Callable[[TensorSpec], Iterator[bytes]],
          sizes: Mapping[str, int], metadata: Mapping[str, str], tree: Any = None) -> int:
    """Write a safetensors file to ``handle``: header first, then each stored part as ``parts`` yields it,
    in :func:`write_order`. With ``tree`` it is a packed file (tree and tensor specs in the metadata), else
    a plain dense one. ``sizes`` gives the byte length of each stored tensor (``key``, ``key::kept``,
    ``key::mask``). Returns the bytes written.
    """
    header: dict[str, Any] = {}
    offset = 0
    order = write_order(specs)
    for spec in order:
        if spec.kept is None:  # the common case, without building its list of stored names
            size = sizes[spec.key]
            header[spec.key] = {"dtype": spec.dtype, "shape": list(spec.shape), "data_offsets": [offset, offset + size]}
            offset += size
            continue
        for name, dtype, shape in stored_names(spec):
            shape = (sizes[name],) if name.endswith(MASK_SUFFIX) else shape
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + sizes[name]]}
            offset += sizes[name]
    meta = dict(metadata)
    if tree is not None:
        meta["tree"] = json.dumps(tree, separators=(",", ":"))
        meta["tensors"] = json.dumps({s.key: s.to_json() for s in specs}, separators=(",", ":"))
    if meta:
        header["__metadata__"] = meta
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    handle.write(struct.pack("<Q", len(raw)) + raw)
    written = 0
    for spec in order:
        for chunk in parts(spec):
            handle.write(chunk)
            written += len(chunk)
    if written != offset:
        raise OpenTransError(f"internal: wrote {written} data bytes, header promised {offset}")
    return 8 + len(raw) + written
