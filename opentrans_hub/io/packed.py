"""The reader of packed sparse checkpoints (format: :mod:`opentrans_hub.io.packed_spec`): dense tensors, verified.

:class:`PackedContainer` checks the whole header up front, decodes tensors one at a time and checks the dense
content hash once the last one is decoded, so what it gives is what was packed. It sits with the other readers
in :mod:`opentrans_hub.io` because every checkpoint reader takes a packed file as it is
(:func:`opentrans_hub.io.checkpoints.read_checkpoint`). The masks as masks (the embedded Subnetwork, verified by
its own sha256) are :class:`opentrans_hub.formats.packed.PackedReader`'s.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

from ..errors import OpenTransError
from .bitmask import ENCODINGS, BitCodec
from .container import read_layout
from .packed_spec import (
    FORMAT,
    FORMAT_VERSION,
    KEPT_SUFFIX,
    MASK_SUFFIX,
    TensorSpec,
    bits,
    content_sha256,
    count,
    stored_names,
    tensor_hash,
    torch_dtype,
)
from .sniff import SUBNETWORK_FORMAT, format_name
from .tree import decode_tree


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
        if not version.isdigit() or int(version) > FORMAT_VERSION:
            raise self._error(f"format version {version!r} is not one this library reads ({FORMAT_VERSION})")
        self.meta = meta
        self.entries = layout.entries
        self.tree = self.json_field("tree", dict)
        raw_specs = self.json_field("tensors", dict)
        self.specs = {key: TensorSpec.from_json(key, value, self.source) for key, value in sorted(raw_specs.items())}
        self.mask_names: dict[str, str] = self.json_field("masks", dict)
        self.sub_meta: dict[str, str] = self.json_field("subnetwork", dict) if self.mask_names else {}
        self.content_sha256 = meta.get("content_sha256", "")
        self.state_trail = meta.get("state", "")
        self._check_header()
        self._codec = BitCodec(self.sub_meta["encoding"], source) if self.mask_names else None

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
        """The safetensors metadata the packed checkpoint had (a dense safetensors file's), else None."""
        return self.json_field("source_metadata", dict) if "source_metadata" in self.meta else None

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
        """The dense tensor ``key`` (zeros at pruned positions); every count and dtype is checked."""
        spec = self.specs.get(key)
        if spec is None:
            raise self._error("the tree names a tensor the header does not describe", tensor=key)
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
