"""LayerSelection: which layers of the CLIP image encoder to fine-tune, with the metrics that chose them.

A selection is data: per-layer metrics (alpha, D, ...) in network order, a ``trainable`` flag per layer,
the policy that set the flags, the architecture id and the sha256 of the weights it was measured on. It
is stored as a small JSON manifest; its identity (sha256) covers the layer names and their flags only, so
recomputing metrics or re-wording provenance never changes which selection it is.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ._atomic import atomic_write_text
from .errors import OpenTransError

FORMAT = "opentrans-hub/layer-selection"
FORMAT_VERSION = 1


class LayerSelection:
    """Per-layer metrics plus a ``trainable`` flag for each canonical weight name."""

    def __init__(self, layers: Iterable[Mapping[str, Any]], arch: str = "unknown",
                 policy: Mapping[str, Any] | None = None, weights_sha256: str | None = None,
                 provenance: Mapping[str, Any] | None = None):
        self.layers: list[dict[str, Any]] = []
        seen = set()
        for layer in layers:
            name = layer.get("name")
            if not isinstance(name, str) or not name:
                raise OpenTransError(f"every layer needs a non-empty 'name', got {name!r}")
            if name in seen:
                raise OpenTransError("layer listed twice", tensor=name)
            if not isinstance(layer.get("trainable"), bool):
                raise OpenTransError("layer needs a boolean 'trainable'", tensor=name)
            seen.add(name)
            self.layers.append(dict(layer))
        self.arch = arch
        self.policy: dict[str, Any] = dict(policy or {})
        self.weights_sha256 = weights_sha256
        self.provenance: dict[str, Any] = dict(provenance or {})

    @property
    def trainable(self) -> list[str]:
        return [layer["name"] for layer in self.layers if layer["trainable"]]

    @property
    def frozen(self) -> list[str]:
        return [layer["name"] for layer in self.layers if not layer["trainable"]]

    def is_trainable(self, name: str) -> bool | None:
        """True/False for a listed layer, None for a name the selection does not cover."""
        for layer in self.layers:
            if layer["name"] == name:
                return layer["trainable"]
        return None

    @property
    def sha256(self) -> str:
        canonical = json.dumps(sorted([layer["name"], layer["trainable"]] for layer in self.layers),
                               separators=(",", ":"))
        return hashlib.sha256(b"opentrans-hub/layer-selection/v1\0" + canonical.encode()).hexdigest()

    def __repr__(self) -> str:
        return (f"LayerSelection(arch={self.arch!r}, layers={len(self.layers)}, trainable={len(self.trainable)}, "
                f"policy={self.policy.get('name', '?')!r}, sha256={self.sha256[:12]})")

    # ----------------------------------------------------------------- codec
    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "arch": self.arch, "policy": self.policy,
                "weights_sha256": self.weights_sha256, "provenance": self.provenance, "sha256": self.sha256,
                "layers": self.layers}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, default=float) + "\n"

    def save(self, path: str | os.PathLike) -> Path:
        return atomic_write_text(path, self.to_json())

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>", verify: bool = True) -> LayerSelection:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise OpenTransError("not an opentrans-hub layer selection", path=source)
        version = data.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise OpenTransError(f"format version {version!r} is not one this library reads ({FORMAT_VERSION})",
                                 path=source)
        layers = data.get("layers")
        if not isinstance(layers, list) or not all(isinstance(layer, dict) for layer in layers):
            raise OpenTransError("'layers' must be a list of objects", path=source)
        try:
            selection = cls(layers, arch=str(data.get("arch") or "unknown"), policy=data.get("policy") or {},
                            weights_sha256=data.get("weights_sha256"), provenance=data.get("provenance") or {})
        except OpenTransError as exc:
            raise OpenTransError(exc.detail, path=source, tensor=exc.tensor) from None
        if verify and data.get("sha256") != selection.sha256:
            raise OpenTransError(f"content hash mismatch: file says {str(data.get('sha256'))[:16]}..., content is "
                                 f"{selection.sha256[:16]}...", path=source)
        return selection

    @classmethod
    def load(cls, path: str | os.PathLike, verify: bool = True, expected_sha256: str | None = None) -> LayerSelection:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise OpenTransError(f"cannot read ({exc.strerror or exc})", path=path) from None
        except (UnicodeDecodeError, ValueError):
            raise OpenTransError("not valid JSON", path=path) from None
        selection = cls.from_dict(data, source=str(path), verify=verify)
        if expected_sha256 is not None and selection.sha256 != expected_sha256:
            raise OpenTransError(f"sha256 {selection.sha256} is not the expected {expected_sha256}", path=path)
        return selection
