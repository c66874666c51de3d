"""Packed sparse checkpoints as artefacts: their masks as a verified Subnetwork, and :class:`PackedFile` for the
registry and the Hub.

The file format and its dense reader live in :mod:`opentrans_hub.io` (:mod:`~opentrans_hub.io.packed_spec`,
:mod:`~opentrans_hub.io.packed`), so every checkpoint reader takes a packed file; the dense content hash verifies
what they decode. Here the masks get their meaning: :class:`PackedReader` rebuilds the embedded Subnetwork and
checks it against its own sha256, which is what catches mask bits moved onto positions that hold zeros (the dense
content, and so its hash, is then unchanged). Every mask it gives is verified that way unless ``verify=False``.
From format version 2 the dense content hash also covers the embedded subnetwork's sha256, so a registry or Hub
manifest that pins ``content_sha256`` pins the masks too.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..errors import OpenTransError
from ..io.atomic import map_file, read_bytes
from ..io.packed import PackedContainer
from ..io.packed_spec import FORMAT, FORMAT_VERSION  # noqa: F401  (the format's names, re-exported)
from ..io.sniff import sniff, sniff_file
from .subnetwork import Subnetwork


class PackedReader(PackedContainer):
    """A packed file's dense tensors (:class:`~opentrans_hub.io.packed.PackedContainer`) and its masks, verified."""

    def __init__(self, data: bytes | memoryview, source: str):
        super().__init__(data, source)
        self._subnetwork: Subnetwork | None = None

    def subnetwork(self, verify: bool = True) -> Subnetwork:
        """The embedded Subnetwork, rebuilt and checked against its own sha256 (``verify=False``: unchecked)."""
        if not verify:
            return Subnetwork.from_parts(*self.embedded(), source=self.source, verify=False)
        if self._subnetwork is None:
            self._subnetwork = Subnetwork.from_parts(*self.embedded(), source=self.source)
        return self._subnetwork

    def verify_subnetwork(self) -> str | None:
        """Check the embedded subnetwork against its own sha256 without keeping its masks; returns the sha256
        (None when the file holds no masked tensor)."""
        if not self.mask_names:
            return None
        if self._subnetwork is not None:
            return self._subnetwork.sha256
        return Subnetwork.from_parts(*self.embedded(), source=self.source).sha256

    def masks(self, verify: bool = True) -> dict[str, torch.Tensor]:
        """Tensor key -> keep-mask for every masked tensor, from the (verified) embedded Subnetwork."""
        if not self.mask_names:
            return {}
        sub = self.subnetwork(verify)
        out = {}
        for key, name in self.mask_names.items():
            mask, spec = sub[name], self.specs[key]
            if tuple(mask.shape) != spec.shape:
                raise OpenTransError(f"the embedded subnetwork's mask has shape {tuple(mask.shape)}, the tensor "
                                     f"{spec.shape}", path=self.source, tensor=key)
            out[key] = mask
        return out


def open_packed(path: str | os.PathLike, required: bool = True) -> PackedReader | None:
    """A strict reader over a packed file, memory-mapped (opened once; tensors are decoded one at a time).

    With ``required=False`` a file that does not hold the packed format gives None (callers then read it as a
    plain checkpoint); a file that does is always read strictly.
    """
    data = map_file(path)
    if not required and sniff(data).format != FORMAT:
        return None
    return PackedReader(data, os.fspath(path))


def is_packed(path: str | os.PathLike) -> bool:
    """True when ``path`` holds a packed file (reads its header only)."""
    try:
        return sniff_file(path).format == FORMAT
    except OpenTransError:
        return False


class PackedFile:
    """A packed sparse checkpoint as a registry/Hub artefact: its bytes, verified on decode.

    ``sha256`` is the content hash; ``subnetwork`` the embedded mask (its own sha256); ``arch`` and
    ``provenance`` come from that mask, so model cards can name the base model (the header's own ``arch`` field
    is never read). Both hashes are checked on construction unless ``verify=False`` (for forensics on a damaged
    file).
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
        return self._subnetwork.arch if self._subnetwork is not None else "unknown"

    @property
    def provenance(self) -> dict[str, Any]:
        return dict(self._subnetwork.provenance) if self._subnetwork is not None else {}

    @property
    def sparsity(self) -> float:
        return self._subnetwork.sparsity if self._subnetwork is not None else 0.0

    def __repr__(self) -> str:
        return f"PackedFile(arch={self.arch!r}, tensors={len(self.reader.specs)}, sha256={self.sha256[:12]})"
