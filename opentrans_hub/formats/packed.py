"""The packed sparse checkpoint format: one safetensors file holding a pruned checkpoint compactly.

For each masked tensor the file holds its keep-mask bits, encoded by the Subnetwork codec (``packbits`` or
``zstd`` over the whole tensor, whatever its rank), and its kept values in order, in the tensor's dtype or
a recorded cast (``stored``); every other tensor is stored dense and unchanged. The header metadata carries:

* ``tree``: the checkpoint's nesting and its non-tensor entries (iteration, trainer state...) as JSON;
* ``tensors``: per tensor key its dtype, shape, and where its data (and mask, kept count) lie;
* ``subnetwork``: the Subnetwork codec's own header, so the embedded mask is rebuilt and verified by
  :meth:`Subnetwork.from_bytes` (``Subnetwork.load`` of a packed file gives it, with its own sha256);
* ``masks``: tensor key -> the mask's name in that Subnetwork; ``state``: where the model state dict sits;
* ``content_sha256``: sha256 over the dense content (names, dtypes, shapes, bytes of what unpacking gives,
  plus the tree), checked whenever the file is decoded.

This module is the codec (bytes <-> tensors); :mod:`opentrans_hub.zoo.packing` reads and writes checkpoints.
Bits are copied through integer views, so ``-0.0`` and NaN payloads in kept positions survive exactly.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from ..errors import OpenTransError
from ..io.checkpoints import FORMAT_READERS
from ..io.tree import decode_tree
from .subnetwork import CONTAINERS, Subnetwork
from .subnetwork import FORMAT as SUBNETWORK_FORMAT
from .subnetwork import _declared_format as sniff

FORMAT = "opentrans-hub/packed"
FORMAT_VERSION = 1
MASK_SUFFIX, KEPT_SUFFIX = "::mask", "::kept"
_MAX_HEADER_BYTES = 256 * 1024 * 1024
_MAX_NUMEL = 1 << 40
_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL", torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
           torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
_BY_NAME = {name: dtype for dtype, name in _DTYPES.items()}
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
CASTS = {"bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_name(dtype: torch.dtype, key: str, source: str | None = None) -> str:
    if dtype not in _DTYPES:
        raise OpenTransError(f"dtype {dtype} cannot be stored in a packed file", path=source, tensor=key)
    return _DTYPES[dtype]


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as integers of the same width (exact compares and copies, NaN and -0.0 included)."""
    flat = tensor.detach().reshape(-1)
    return flat.view(_INT_VIEW[flat.element_size()]) if flat.dtype != torch.bool else flat.view(torch.uint8)


def count(mask: torch.Tensor) -> int:
    """Kept weights of a bool mask (numpy counts bools many times faster than torch's sum)."""
    return int(np.count_nonzero(mask.reshape(-1).numpy()))


# ----------------------------------------------------------------------------------------- specs and hashing
@dataclass
class TensorSpec:
    """One tensor of the checkpoint: its dense identity and where its stored parts lie in the file."""

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
        return self.numel * torch.empty((), dtype=_BY_NAME[self.dtype]).element_size()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dtype": self.dtype, "shape": list(self.shape)}
        if self.masked:
            out["kept"] = self.kept
            if self.stored:
                out["stored"] = self.stored
        return out

    @classmethod
    def from_json(cls, key: str, data: Any, source: str) -> TensorSpec:
        ok = (isinstance(data, dict) and data.get("dtype") in _BY_NAME and isinstance(data.get("shape"), list)
              and len(data["shape"]) <= 16
              and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d for d in data["shape"])
              and math.prod(data["shape"]) <= _MAX_NUMEL)
        kept, stored = (data.get("kept"), data.get("stored")) if isinstance(data, dict) else (None, None)
        if ok and kept is not None:
            ok = isinstance(kept, int) and not isinstance(kept, bool) and 0 <= kept <= math.prod(data["shape"])
        if ok and stored is not None:
            ok = kept is not None and stored in _BY_NAME
        if not ok:
            raise OpenTransError(f"bad tensor entry {str(data)[:80]}", path=source, tensor=key)
        return cls(key, data["dtype"], tuple(data["shape"]), kept, stored)


def tensor_hash(key: str, tensor: torch.Tensor) -> bytes:
    """sha256 of one dense tensor: its name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    encoded = key.encode("utf-8")
    digest.update(struct.pack("<Q", len(encoded)) + encoded + _DTYPES[tensor.dtype].encode() + b"\0")
    digest.update(struct.pack("<Q", tensor.dim()) + struct.pack(f"<{tensor.dim()}Q", *tensor.shape))
    if tensor.numel():
        digest.update(memoryview(bits(tensor.contiguous()).numpy()).cast("B"))
    return digest.digest()


def content_sha256(hashes: Mapping[str, bytes], tree: Any) -> str:
    """The dense content hash: per-tensor hashes in key order, then the tree (so any write order works)."""
    digest = hashlib.sha256(b"opentrans-hub/packed/v1\0")
    for key in sorted(hashes):
        digest.update(hashes[key])
    digest.update(b"tree\0" + json.dumps(tree, sort_keys=True, separators=(",", ":")).encode("utf-8"))
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------- writing
def write_order(specs: list[TensorSpec]) -> list[TensorSpec]:
    """Widest stored dtypes first, then by key: every tensor of the file starts aligned."""
    return sorted(specs, key=lambda s: (-_itemsize(s), s.key))


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
        for name, dtype, shape in stored_names(spec):
            shape = (sizes[name],) if name.endswith(MASK_SUFFIX) and spec.masked else shape
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


def _itemsize(spec: TensorSpec) -> int:
    return torch.empty((), dtype=_BY_NAME[spec.stored or spec.dtype]).element_size()


def stored_names(spec: TensorSpec) -> list[tuple[str, str, tuple[int, ...]]]:
    """(file tensor name, dtype, shape) of what a spec stores; a mask's shape is its encoded byte count."""
    if not spec.masked:
        return [(spec.key, spec.dtype, spec.shape)]
    return [(spec.key + KEPT_SUFFIX, spec.stored or spec.dtype, (spec.kept,)), (spec.key + MASK_SUFFIX, "U8", (-1,))]


# ----------------------------------------------------------------------------------------- reading
class PackedReader:
    """Strict reader over a packed file's bytes (``bytes`` or an ``mmap``): header checked up front,
    tensors decoded one at a time, the dense content hash checked by :meth:`verify` / :meth:`checkpoint`."""

    def __init__(self, data: bytes | memoryview, source: str):
        self.source = source
        self.data = memoryview(data)
        self.size = len(self.data)
        self._parse()

    # ------------------------------------------------------------------ header
    def _error(self, message: str, tensor: str | None = None) -> OpenTransError:
        return OpenTransError(message, path=self.source, tensor=tensor)

    def _parse(self) -> None:
        if self.size < 8:
            raise self._error(f"truncated: {self.size} bytes is too short for a safetensors file")
        (length,) = struct.unpack("<Q", bytes(self.data[:8]))
        if length > _MAX_HEADER_BYTES or 8 + length > self.size:
            raise self._error(f"truncated or not safetensors: header length {length} exceeds the file ({self.size} "
                              "bytes)")
        try:
            header = json.loads(bytes(self.data[8:8 + length]).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise self._error("safetensors header is not valid JSON") from None
        if not isinstance(header, dict):
            raise self._error("safetensors header is not a JSON object")
        meta = header.pop("__metadata__", None)
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise self._error("safetensors __metadata__ must map strings to strings")
        if meta.get("format") != FORMAT:
            raise self._error(f"not an opentrans-hub packed file (format={meta.get('format')!r})")
        version = meta.get("format_version", "")
        if not version.isdigit() or int(version) > FORMAT_VERSION:
            raise self._error(f"format version {version!r} is not one this library reads ({FORMAT_VERSION})")
        self.meta = meta
        self.body = 8 + length
        self.entries = self._entries(header)
        self.tree = self._json("tree", (dict,))
        raw_specs = self._json("tensors", (dict,))
        self.specs = {key: TensorSpec.from_json(key, value, self.source) for key, value in sorted(raw_specs.items())}
        self.mask_names: dict[str, str] = self._json("masks", (dict,))
        self.sub_meta: dict[str, str] = self._json("subnetwork", (dict,)) if self.mask_names else {}
        self.content_sha256 = meta.get("content_sha256", "")
        self.state_trail = meta.get("state", "")
        expected = set()
        for spec in self.specs.values():
            for name, dtype, shape in stored_names(spec):
                expected.add(name)
                entry = self.entries.get(name)
                if entry is None:
                    raise self._error("stored data missing from the file", tensor=name)
                if entry[0] != dtype:
                    raise self._error(f"dtype {entry[0]} disagrees with the header's {dtype}", tensor=name)
                if not (spec.masked and name.endswith(MASK_SUFFIX)) and list(entry[1]) != list(shape):
                    raise self._error(f"stored shape {entry[1]} disagrees with the header's {list(shape)} "
                                      "(value count and mask bits disagree?)", tensor=name)
            if spec.masked and self.mask_names.get(spec.key) is None:
                raise self._error("masked tensor has no mask name", tensor=spec.key)
        extra = sorted(set(self.entries) - expected)
        if extra:
            raise self._error("stored tensor not described by the header", tensor=extra[0])
        if set(self.mask_names) != {k for k, s in self.specs.items() if s.masked}:
            raise self._error("the header's mask list and masked tensors disagree")
        names = list(self.mask_names.values())
        if not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
            raise self._error("mask names must be distinct non-empty strings")
        if self.mask_names and (self.sub_meta.get("format") != SUBNETWORK_FORMAT
                                or not all(isinstance(v, str) for v in self.sub_meta.values())):
            raise self._error("embedded subnetwork header is missing or not a subnetwork's")

    def _json(self, key: str, kinds: tuple[type, ...]) -> Any:
        try:
            value = json.loads(self.meta.get(key, ""))
        except (TypeError, ValueError, RecursionError):
            raise self._error(f"header field {key!r} is not valid JSON") from None
        if not isinstance(value, kinds):
            raise self._error(f"header field {key!r} has the wrong type")
        return value

    def _entries(self, header: dict) -> dict[str, tuple[str, list[int], int, int]]:
        entries, spans = {}, []
        body_len = self.size - self.body
        for name, entry in header.items():
            if not isinstance(entry, dict):
                raise self._error("tensor entry is not an object", tensor=name)
            dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
            if (dtype not in _BY_NAME or not isinstance(shape, list) or not isinstance(offsets, list)
                    or len(offsets) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                    for v in [*offsets, *shape])):
                raise self._error("bad dtype, shape or data_offsets", tensor=name)
            start, end = offsets
            nbytes = math.prod(shape) * torch.empty((), dtype=_BY_NAME[dtype]).element_size()
            if not start <= end <= body_len or end - start != nbytes:
                raise self._error(f"data_offsets {offsets} do not fit the {body_len}-byte body (truncated?)",
                                  tensor=name)
            entries[name] = (dtype, shape, start, end)
            spans.append((start, end, name))
        position = 0
        for start, end, name in sorted(spans):
            if start != position:
                raise self._error("tensor data overlaps or leaves a gap", tensor=name)
            position = end
        if position != body_len:
            raise self._error(f"{body_len - position} trailing bytes after the last tensor")
        return entries

    # ------------------------------------------------------------------ tensors
    def raw(self, name: str) -> memoryview:
        _, _, start, end = self.entries[name]
        return self.data[self.body + start:self.body + end]

    def _stored(self, name: str, dtype: str) -> torch.Tensor:
        raw = self.raw(name)
        out = torch.empty(len(raw) // max(torch.empty((), dtype=_BY_NAME[dtype]).element_size(), 1),
                          dtype=_BY_NAME[dtype])
        if len(raw):
            bits(out).numpy().view(np.uint8)[:] = np.frombuffer(raw, dtype=np.uint8)
        return out

    def mask(self, key: str) -> torch.Tensor:
        """The keep-mask of a masked tensor, decoded by the Subnetwork codec's own strict decoder."""
        spec, name = self.specs[key], self.mask_names[key]
        from safetensors.numpy import save

        meta = {**self.sub_meta, "shapes": json.dumps({name: list(spec.shape)}), "provenance": "{}", "sha256": ""}
        blob = np.frombuffer(self.raw(key + MASK_SUFFIX), dtype=np.uint8)
        try:
            one = Subnetwork.from_bytes(save({name: blob}, metadata=meta), source=self.source, verify=False)
        except OpenTransError as exc:
            raise self._error(f"mask bits: {exc.detail}", tensor=key) from None
        return one[name]

    def tensor(self, key: str) -> torch.Tensor:
        """The dense tensor ``key`` (zeros at pruned positions); every count and dtype is checked."""
        spec = self.specs.get(key)
        if spec is None:
            raise self._error("the tree names a tensor the header does not describe", tensor=key)
        dtype = _BY_NAME[spec.dtype]
        if not spec.masked:
            return self._stored(key, spec.dtype).reshape(spec.shape)
        mask = self.mask(key).reshape(-1)
        kept = count(mask)
        if kept != spec.kept:
            raise self._error(f"mask bits keep {kept} weights but {spec.kept} values are stored", tensor=key)
        values = self._stored(key + KEPT_SUFFIX, spec.stored or spec.dtype)
        if spec.stored:
            values = values.to(dtype)
        out = torch.zeros(spec.numel, dtype=dtype)
        bits(out).masked_scatter_(mask, bits(values))  # bit copies, in order
        return out.reshape(spec.shape)

    def subnetwork(self, verify: bool = True) -> Subnetwork:
        """The embedded Subnetwork, rebuilt and verified (its own sha256) by ``Subnetwork.from_bytes``."""
        if not self.mask_names:
            raise self._error("packed file holds no masked tensor, so no subnetwork")
        from safetensors.numpy import save

        blobs = {self.mask_names[k]: np.frombuffer(self.raw(k + MASK_SUFFIX), dtype=np.uint8)
                 for k in self.mask_names}
        return Subnetwork.from_bytes(save(blobs, metadata=self.sub_meta), source=self.source, verify=verify)

    def tensors(self, verify: bool = True, order: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Every dense tensor (key order, or ``order``), one at a time; the content hash is checked after the
        last one, so a consumer commits its output only once the iteration has finished."""
        hashes = {}
        for key in order if order is not None else self.specs:
            tensor = self.tensor(key)
            hashes[key] = tensor_hash(key, tensor)
            yield key, tensor
        if set(hashes) != set(self.specs):
            raise self._error("internal: not every tensor was decoded")
        actual = content_sha256(hashes, self.tree)
        if verify and actual != self.content_sha256:
            raise self._error(f"content sha256 {actual[:16]}... is not the recorded {self.content_sha256[:16]}... "
                              "(tampered or corrupted)")

    def verify(self) -> str:
        for _ in self.tensors():
            pass
        return self.content_sha256

    def checkpoint(self, verify: bool = True) -> Any:
        """The whole checkpoint object, dense, verified before it is returned."""
        dense = dict(self.tensors(verify=verify))
        try:
            return decode_tree(self.tree, lambda key: _lookup(dense, key, self.source), self.source)
        except RecursionError:
            raise self._error("the header's tree nests too deeply") from None

    def masks(self) -> dict[str, torch.Tensor]:
        """Tensor key -> keep-mask for every masked tensor."""
        return {key: self.mask(key).reshape(self.specs[key].shape) for key in self.mask_names}

def _lookup(dense: Mapping[str, torch.Tensor], key: str, source: str) -> torch.Tensor:
    if key not in dense:
        raise OpenTransError("the tree names a tensor the header does not describe", path=source, tensor=key)
    return dense[key]


def open_packed(path: str | os.PathLike, required: bool = True) -> PackedReader | None:
    """A strict reader over a packed file (memory-mapped; tensors are decoded one at a time).

    With ``required=False`` a file that does not declare the packed format gives None (callers then read
    it as a plain checkpoint); a file that declares it is always read strictly.
    """
    path = Path(path)
    if not required and not is_packed(path):
        return None
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            data: Any = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    except OSError as exc:
        raise OpenTransError(f"cannot read ({exc.strerror or exc})", path=path) from None
    return PackedReader(data, str(path))


def is_packed(path: str | os.PathLike) -> bool:
    """True when ``path`` is a safetensors file declaring the packed format (reads the header only)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                return False
            length = int.from_bytes(head, "little")
            if length > 256 * 1024 * 1024:
                return False
            return sniff(head + handle.read(length)) == FORMAT
    except OSError:
        return False


class PackedFile:
    """A packed sparse checkpoint as a registry/Hub artefact: its bytes, verified on decode.

    ``sha256`` is the dense content hash; ``subnetwork`` the embedded mask (its own sha256); ``arch`` and
    ``provenance`` come from that mask, so model cards can name the base model.
    """

    kind = "packed"

    def __init__(self, data: bytes, source: str = "<bytes>", verify: bool = True):
        self._data = data
        self.reader = PackedReader(data, source)
        self._subnetwork = self.reader.subnetwork(verify=verify) if self.reader.mask_names else None
        if verify:
            self.reader.verify()

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<bytes>", verify: bool = True) -> PackedFile:
        return cls(data, source, verify)

    @classmethod
    def load(cls, path: str | os.PathLike, verify: bool = True) -> PackedFile:
        from ..io.atomic import read_bytes

        return cls(read_bytes(path), str(path), verify)

    def to_bytes(self) -> bytes:
        return bytes(self._data)

    @property
    def sha256(self) -> str:
        return self.reader.content_sha256

    @property
    def subnetwork(self) -> Subnetwork:
        if self._subnetwork is None:
            raise OpenTransError("packed file holds no masked tensor, so no subnetwork", path=self.reader.source)
        return self._subnetwork

    @property
    def arch(self) -> str:
        return self.reader.meta.get("arch") or "unknown"

    @property
    def provenance(self) -> dict[str, Any]:
        return dict(self._subnetwork.provenance) if self._subnetwork is not None else {}

    @property
    def sparsity(self) -> float:
        return self._subnetwork.sparsity if self._subnetwork is not None else 0.0

    def __repr__(self) -> str:
        return f"PackedFile(arch={self.arch!r}, tensors={len(self.reader.specs)}, sha256={self.sha256[:12]})"


def _embedded_subnetwork(data: bytes, source: str, verify: bool) -> Subnetwork:
    return PackedReader(data, source).subnetwork(verify=verify)


def _as_checkpoint(path: Path) -> tuple[Any, dict[str, str] | None]:
    reader = open_packed(path)
    return reader.checkpoint(), reader._json("source_metadata", (dict,)) if "source_metadata" in reader.meta else None


# ``Subnetwork.load``/``from_bytes`` on a packed file give its embedded mask, and every checkpoint reader reads it
# dense (tables in the lower modules, so no import cycle)
CONTAINERS[FORMAT] = _embedded_subnetwork
FORMAT_READERS[FORMAT] = _as_checkpoint
