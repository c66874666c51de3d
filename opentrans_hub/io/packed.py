"""The reader of packed sparse checkpoints (format: :mod:`opentrans_hub.io.packed_spec`): dense tensors, verified.

:class:`PackedContainer` checks the whole header up front, decodes tensors one at a time and checks the dense
content hash once the last one is decoded, so what it gives is what was packed. Opening reads the header alone
(every size it claims checked against the file, masks' stored sizes against their shapes); decoding first checks
what it will materialise against the decode limit (:mod:`opentrans_hub.io.limits`). It sits with the other readers
in :mod:`opentrans_hub.io` because every checkpoint reader takes a packed file as it is
(:func:`opentrans_hub.io.checkpoints.read_checkpoint`). The masks as masks (the embedded Subnetwork, verified by
its own sha256) are :class:`opentrans_hub.formats.packed.PackedReader`'s.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

from ..errors import OpenTransError, OpenTransWarning
from .bitmask import ENCODINGS, BitCodec
from .container import read_layout
from .limits import check_decode, out_of_memory
from .packed_spec import (
    FORMAT,
    FORMAT_VERSION,
    KEPT_SUFFIX,
    MASK_SUFFIX,
    UNHASHED_IN_V1,
    TensorSpec,
    bits,
    bound_fields,
    content_sha256,
    count,
    stored_names,
    tensor_hash,
    torch_dtype,
)
from .sniff import OURS, SUBNETWORK_FORMAT, format_name
from .tree import decode_tree

_SHA256 = re.compile(r"[0-9a-f]{64}")
_CASTS = {"BF16": "bf16", "F16": "fp16"}


class PackedContainer:
    """Strict reader over a packed file's bytes (``bytes`` or an ``mmap``): header checked up front, tensors
    decoded one at a time, the dense content hash checked by :meth:`verify` / :meth:`checkpoint`."""

    def __init__(self, data: bytes | memoryview, source: str):
        self.source = source
        self.data = memoryview(data)
        self.size = len(self.data)
        layout = read_layout(self.data, source)
        meta = layout.metadata
        if format_name(meta.get("format")) != FORMAT:
            raise self._error(f"not an opentrans-hub packed file (format={meta.get('format')!r})")
        version = meta.get("format_version", "")
        if not (version.isascii() and version.isdigit() and 1 <= int(version) <= FORMAT_VERSION):
            raise self._error(f"format version {version!r} is not one this library reads (1 to {FORMAT_VERSION})")
        self.version = int(version)
        self.meta = meta
        self.entries = layout.entries
        self.tree = self.json_field("tree", dict)
        raw_specs = self.json_field("tensors", dict)
        self.specs = {key: TensorSpec.from_json(key, value, self.source) for key, value in sorted(raw_specs.items())}
        self.mask_names: dict[str, str] = self.json_field("masks", dict)
        self.sub_meta: dict[str, str] = self.json_field("subnetwork", dict) if self.mask_names else {}
        self.content_sha256 = meta.get("content_sha256", "")
        self.state_trail = meta.get("state", "")
        self._source_meta: dict[str, str] = (self.json_field("source_metadata", dict) if "source_metadata" in meta
                                             else {})
        self._check_header()
        self._codec = BitCodec(self.sub_meta["encoding"], source) if self.mask_names else None
        self._check_sizes()

    def _error(self, message: str, tensor: str | None = None) -> OpenTransError:
        return OpenTransError(message, path=self.source, tensor=tensor)

    def _check_header(self) -> None:
        """Every stored tensor described, every description stored, masks named once, the subnetwork header ours."""
        expected = set()
        for spec in self.specs.values():
            for name, dtype, shape in stored_names(spec):
                expected.add(name)
                entry = self.entries.get(name)
                if entry is None:
                    raise self._error("stored data missing from the file", tensor=name)
                if entry.dtype != dtype:
                    raise self._error(f"dtype {entry.dtype} disagrees with the header's {dtype}", tensor=name)
                if not (spec.masked and name.endswith(MASK_SUFFIX)) and entry.shape != tuple(shape):
                    raise self._error(f"stored shape {list(entry.shape)} disagrees with the header's {list(shape)} "
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
        if self.mask_names and (format_name(self.sub_meta.get("format")) != SUBNETWORK_FORMAT
                                or not all(isinstance(v, str) for v in self.sub_meta.values())):
            raise self._error("embedded subnetwork header is missing or not a subnetwork's")
        if self.mask_names and self.sub_meta.get("encoding") not in ENCODINGS:
            raise self._error(f"embedded subnetwork has an unknown encoding {self.sub_meta.get('encoding')!r}")
        if not _SHA256.fullmatch(self.content_sha256):
            raise self._error("header has no content_sha256 (64 hex digits), so its content cannot be verified")
        if self.mask_names and not _SHA256.fullmatch(self.sub_meta.get("sha256", "")):
            raise self._error("embedded subnetwork has no sha256 (64 hex digits), so its masks cannot be verified")
        if self.mask_names and (self.meta.get("arch") or "unknown") != self.arch:
            raise self._error(f"header arch {self.meta.get('arch')!r} is not the embedded subnetwork's {self.arch!r}")
        if not all(isinstance(v, str) for v in self._source_meta.values()):
            raise self._error("header field 'source_metadata' must map strings to strings")
        if (format_name(self._source_meta.get("format")) or "").startswith(OURS):
            raise self._error("header field 'source_metadata' declares an opentrans-hub format; a dense checkpoint's "
                              "metadata cannot")

    def _check_sizes(self) -> None:
        """Every mask's stored bytes can hold the bits its tensor's shape needs (without decoding any): so the
        dense sizes the header claims are bounded by the file (:meth:`BitCodec.check_stored`)."""
        assert self._codec is not None or not self.mask_names
        for key in self.mask_names:
            try:
                self._codec.check_stored(self.raw(key + MASK_SUFFIX), self.specs[key].shape, self.source, key)
            except OpenTransError as exc:
                raise self._error(f"mask bits: {exc.detail}", tensor=key) from None

    # ------------------------------------------------------------------ header facts (not yet verified)
    @property
    def arch(self) -> str:
        """The architecture: the embedded subnetwork's (covered by its sha256), ``unknown`` without masks."""
        return (self.sub_meta.get("arch") or "unknown") if self.mask_names else "unknown"

    @property
    def cast(self) -> str | None:
        """The dtype kept values are stored in when cast (``bf16``, ``fp16``), from the tensors' specs."""
        casts = sorted({_CASTS.get(s.stored, s.stored.lower()) for s in self.specs.values() if s.stored})
        return ",".join(casts) or None

    @property
    def dense_bytes(self) -> int:
        """What decoding the whole checkpoint materialises."""
        return sum(spec.dense_bytes for spec in self.specs.values())

    @property
    def unverified_fields(self) -> tuple[str, ...]:
        """Header fields that change meaning but this file's content hash does not cover (version 1 files)."""
        return UNHASHED_IN_V1 if self.version < 2 else ()

    def bound(self) -> dict[str, Any]:
        """The header fields a version 2 content hash covers, as this file records them."""
        return bound_fields(self.mask_names, self.sub_meta.get("sha256") if self.mask_names else None,
                            self._source_meta, self.state_trail)

    def json_field(self, key: str, kind: type) -> Any:
        """A JSON field of the header metadata, checked to be a ``kind``."""
        try:
            value = json.loads(self.meta.get(key, ""))
        except (TypeError, ValueError, RecursionError):
            raise self._error(f"header field {key!r} is not valid JSON") from None
        if not isinstance(value, kind):
            raise self._error(f"header field {key!r} has the wrong type")
        return value

    def source_metadata(self) -> dict[str, str] | None:
        """The safetensors metadata the packed checkpoint had (a dense safetensors file's), else None. Covered by
        the content hash from version 2; a version 1 file's is given with a warning that it is unverified."""
        if "source_metadata" not in self.meta:
            return None
        if self._source_meta and self.version < 2:
            warnings.warn(f"{self.source}: format version 1, whose content sha256 does not cover source_metadata: "
                          "it is carried over unverified (pack the file again to cover it)", OpenTransWarning,
                          stacklevel=2)
        return dict(self._source_meta)

    # ------------------------------------------------------------------ tensors
    def raw(self, name: str) -> memoryview:
        """The stored bytes of one file tensor (``key``, ``key::kept`` or ``key::mask``)."""
        entry = self.entries[name]
        return self.data[entry.start:entry.end]

    def stored_bytes(self, spec: TensorSpec) -> int:
        """What a tensor takes in the file (values and mask bits for a masked one)."""
        return sum(self.entries[name].nbytes for name, _, _ in stored_names(spec))

    def embedded(self) -> tuple[dict[str, str], dict[str, memoryview]]:
        """The embedded subnetwork's header and its masks' stored bits by mask name, as stored (unverified:
        :class:`opentrans_hub.formats.packed.PackedReader` rebuilds and verifies it)."""
        if not self.mask_names:
            raise self._error("packed file holds no masked tensor, so no subnetwork")
        return dict(self.sub_meta), {self.mask_names[k]: self.raw(k + MASK_SUFFIX) for k in self.mask_names}

    def _stored(self, name: str, dtype: str) -> torch.Tensor:
        raw = self.raw(name)
        out = torch.empty(len(raw) // max(torch_dtype(dtype).itemsize, 1), dtype=torch_dtype(dtype))
        if len(raw):
            bits(out).numpy().view(np.uint8)[:] = np.frombuffer(raw, dtype=np.uint8)
        return out

    def _mask_bits(self, key: str) -> torch.Tensor:
        """The flat keep-mask of a masked tensor as stored, for decoding its dense values (not verified as a mask)."""
        assert self._codec is not None
        try:
            keep = self._codec.decode(self.raw(key + MASK_SUFFIX), self.specs[key].shape, self.source, key)
        except OpenTransError as exc:
            raise self._error(f"mask bits: {exc.detail}", tensor=key) from None
        return torch.from_numpy(keep)

    def tensor(self, key: str) -> torch.Tensor:
        """The dense tensor ``key`` (zeros at pruned positions); every count and dtype is checked, and its size
        against the decode limit before anything is allocated."""
        spec = self.specs.get(key)
        if spec is None:
            raise self._error("the tree names a tensor the header does not describe", tensor=key)
        need = spec.dense_bytes + (spec.numel if spec.masked else 0)  # a masked one holds its bool mask too
        check_decode(need, "decoding this tensor", self.source, key)
        try:
            return self._decode(spec)
        except MemoryError:
            raise out_of_memory(need, "decoding this tensor", self.source, key) from None

    def _decode(self, spec: TensorSpec) -> torch.Tensor:
        key = spec.key
        if not spec.masked:
            return self._stored(key, spec.dtype).reshape(spec.shape)
        mask = self._mask_bits(key)
        kept = count(mask)
        if kept != spec.kept:
            raise self._error(f"mask bits keep {kept} weights but {spec.kept} values are stored", tensor=key)
        values = self._stored(key + KEPT_SUFFIX, spec.stored or spec.dtype)
        if spec.stored:
            values = values.to(torch_dtype(spec.dtype))
        out = torch.zeros(spec.numel, dtype=torch_dtype(spec.dtype))
        bits(out).masked_scatter_(mask, bits(values))  # bit copies, in order
        return out.reshape(spec.shape)

    def tensors(self, verify: bool = True, order: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Every dense tensor (key order, or ``order``), one at a time; the content hash is checked after the
        last one, so a consumer commits its output only once the iteration has finished. ``verify=False``
        skips that check (for forensics on a damaged file)."""
        keys = list(order if order is not None else self.specs)
        check_decode(sum(self.specs[k].dense_bytes for k in keys if k in self.specs),
                     f"decoding {len(keys)} tensors dense", self.source)
        hashes = {}
        for key in keys:
            tensor = self.tensor(key)
            hashes[key] = tensor_hash(key, tensor)
            yield key, tensor
        if set(hashes) != set(self.specs):
            raise self._error("internal: not every tensor was decoded")
        actual = content_sha256(hashes, self.tree, self.bound(), self.version)
        if verify and actual != self.content_sha256:
            raise self._error(f"content sha256 {actual[:16]}... is not the recorded {self.content_sha256[:16]}... "
                              "(tampered or corrupted)")

    def verify(self) -> str:
        """Decode everything and check the content hash; returns it."""
        for _ in self.tensors():
            pass
        return self.content_sha256

    def checkpoint(self, verify: bool = True) -> Any:
        """The whole checkpoint object, dense, verified before it is returned (``verify=False``: unchecked)."""
        dense = dict(self.tensors(verify=verify))
        try:
            return decode_tree(self.tree, lambda key: _lookup(dense, key, self.source), self.source)
        except RecursionError:
            raise self._error("the header's tree nests too deeply") from None


def _lookup(dense: Mapping[str, torch.Tensor], key: str, source: str) -> torch.Tensor:
    if key not in dense:
        raise OpenTransError("the tree names a tensor the header does not describe", path=source, tensor=key)
    return dense[key]
