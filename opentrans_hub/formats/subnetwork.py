"""Subnetwork: the portable mask of a pruned CLIP image encoder.

A Subnetwork maps canonical tensor names (open_clip visual-tower names, e.g. ``layer1.0.conv1.weight``)
to boolean keep-masks, plus the architecture id it was found on and its provenance. It is stored as a
safetensors file of bit-packed masks (:mod:`opentrans_hub.formats.subnetwork_codec`: the format and the content
hash, which covers the architecture id, names, shapes and bits but not the encoding or the provenance).
``Subnetwork.load`` of a packed sparse checkpoint gives the subnetwork it embeds, verified the same way.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import OpenTransError
from ..io.atomic import atomic_write_bytes, read_bytes
from ..io.packed import PackedContainer
from ..io.sniff import PACKED_FORMAT, SELECTION_FORMAT, sniff
from ..towers.archs import check_arch, check_tensor_name
from . import subnetwork_codec as codec
from .subnetwork_codec import ENCODINGS, FORMAT, FORMAT_VERSION  # noqa: F401  (the format's names, re-exported)


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
            if type(mask) is not torch.Tensor:  # a Parameter or another subclass: the plain tensor
                mask = mask.detach()
            if mask.device.type != "cpu":
                mask = mask.cpu()
            checked[name] = mask if mask.is_contiguous() else mask.contiguous()  # one call per mask when it is
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
            self._sha256 = codec.content_hash(self.arch, codec.mask_items(self._masks))
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

    # ----------------------------------------------------------------- files
    def to_bytes(self, encoding: str = "packbits") -> bytes:
        """Serialise as safetensors (uint8 tensors, one per mask; header metadata carries the rest)."""
        return codec.encode(self._masks, self.arch, self.provenance, self.sha256, encoding)

    def save(self, path: str | os.PathLike, encoding: str = "packbits") -> Path:
        """Write atomically to ``path`` (safetensors)."""
        return atomic_write_bytes(path, self.to_bytes(encoding))

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<bytes>", verify: bool = True) -> Subnetwork:
        """Decode a subnetwork file, or the subnetwork a packed checkpoint embeds, and check its content hash
        against the one recorded (``verify=False`` skips that check, for forensics); any defect raises
        :class:`OpenTransError` naming the file."""
        found = sniff(data)
        if found.kind == "json":
            what = "a layer selection manifest (JSON)" if found.format == SELECTION_FORMAT else "a JSON file"
            raise OpenTransError(f"is {what}, not a subnetwork (.safetensors)", path=source)
        if found.format == PACKED_FORMAT:
            return cls.from_parts(*PackedContainer(data, source).embedded(), source=source, verify=verify)
        return cls._from_decoded(codec.decode(data, source), source, verify)

    @classmethod
    def from_parts(cls, metadata: Mapping[str, str], blobs: Mapping[str, bytes | memoryview], source: str,
                   verify: bool = True) -> Subnetwork:
        """Decode a subnetwork from its header metadata and stored bits per mask name (what a packed checkpoint
        embeds), checked against its content hash unless ``verify=False``."""
        return cls._from_decoded(codec.decode_parts(metadata, blobs, source), source, verify)

    @classmethod
    def _from_decoded(cls, decoded: codec.Decoded, source: str, verify: bool) -> Subnetwork:
        try:
            sub = cls(decoded.masks, arch=decoded.arch, provenance=decoded.provenance)
        except OpenTransError as exc:
            raise OpenTransError(exc.detail, path=source, tensor=exc.tensor) from None
        if verify:
            codec.check_identity(decoded.sha256, sub.sha256, sub._masks, source)
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
