"""LayerSelection: which layers of the CLIP image encoder to fine-tune, with the metrics that chose them.

A selection is data: per-layer metrics (alpha, D, ...) in network order, a ``trainable`` flag per layer,
the policy that set the flags, the architecture id and the sha256 of the weights it was measured on. It
is stored as a small JSON manifest; its identity (sha256) covers the architecture id, the layer names, their
flags and their learning-rate scales only, so recomputing metrics or re-wording provenance never changes which
selection it is.

A layer may carry ``lr_scale`` (finite, > 0): its learning rate is the optimizer's times this (a learning-rate
budget, ``oth.param_groups``). A layer without one means 1.0, and a scale of 1.0 is not part of the identity,
so a manifest written before scales existed keeps its sha256.

:func:`select_layers` derives a selection from metrics (``opentrans_hub.methods.spectral.compute_metrics``) with a
policy (``median`` as in the paper, ``fraction``, ``count``, ``budget``); :meth:`LayerSelection.apply` sets
``requires_grad`` on a framework's model through a NameMap and reports the trainable parameters.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import OpenTransError
from ..io.atomic import atomic_write_text, read_bytes
from ..io.limits import check_json, out_of_memory
from ..io.sniff import SELECTION_FORMAT, format_name, sniff
from ..towers.archs import check_arch, check_tensor_name

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from ..naming.namemap import NameMap

FORMAT = SELECTION_FORMAT
FORMAT_VERSION = 1


def check_lr_scale(value: Any, name: str | None = None) -> float:
    """``value`` as a learning-rate scale: a finite number > 0 (not a bool), else :class:`OpenTransError`."""
    try:
        scale = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    except OverflowError:  # an integer too large for a float
        scale = math.inf
    if not math.isfinite(scale) or scale <= 0:
        raise OpenTransError(f"'lr_scale' must be a finite number > 0, got {str(value)[:40]!r}", tensor=name)
    return scale


class LayerSelection:
    """Per-layer metrics plus a ``trainable`` flag for each canonical weight name."""

    def __init__(self, layers: Iterable[Mapping[str, Any]], arch: str = "unknown",
                 policy: Mapping[str, Any] | None = None, weights_sha256: str | None = None,
                 provenance: Mapping[str, Any] | None = None):
        self.layers: list[dict[str, Any]] = []
        seen = set()
        check_arch(arch)
        for layer in layers:
            name = layer.get("name")
            check_tensor_name(name, part=True)
            if layer.get("param") is not None:
                check_tensor_name(layer["param"])
            if name in seen:
                raise OpenTransError("layer listed twice", tensor=name)
            if not isinstance(layer.get("trainable"), bool):
                raise OpenTransError("layer needs a boolean 'trainable'", tensor=name)
            seen.add(name)
            layer = dict(layer)
            if "lr_scale" in layer:
                layer["lr_scale"] = check_lr_scale(layer["lr_scale"], name)
            self.layers.append(layer)
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

    def lr_scale(self, name: str) -> float | None:
        """The learning-rate scale of a listed layer (1.0 when it carries none), None for a name not listed."""
        for layer in self.layers:
            if layer["name"] == name:
                return layer.get("lr_scale", 1.0)
        return None

    @property
    def has_lr_scales(self) -> bool:
        """Whether any layer's learning-rate scale differs from 1.0."""
        return any(layer.get("lr_scale", 1.0) != 1.0 for layer in self.layers)

    @property
    def lr_scales(self) -> dict[str, float]:
        """Canonical parameter name -> learning-rate scale; a split attention weight takes the mean of its parts
        (one parameter has one learning rate)."""
        parts: dict[str, list[float]] = {}
        for layer in self.layers:
            parts.setdefault(layer.get("param") or layer["name"], []).append(layer.get("lr_scale", 1.0))
        return {param: math.fsum(values) / len(values) for param, values in parts.items()}

    def is_trainable(self, name: str) -> bool | None:
        """True/False for a listed layer, None for a name the selection does not cover."""
        for layer in self.layers:
            if layer["name"] == name:
                return layer["trainable"]
        return None

    @property
    def sha256(self) -> str:
        """sha256 over the architecture id and the layer names with their flags and learning-rate scales other
        than 1.0 (not metrics or provenance)."""
        return self._hash(self.arch)

    def _hash(self, arch: str | None) -> str:
        def entry(layer: dict[str, Any]) -> list[Any]:
            scale = layer.get("lr_scale", 1.0)
            return [layer["name"], layer["trainable"]] + ([] if scale == 1.0 else [scale])

        canonical = json.dumps(sorted(entry(layer) for layer in self.layers), separators=(",", ":"))
        if arch is None:  # opentrans-hub 0.1: the architecture was not part of the identity
            return hashlib.sha256(b"opentrans-hub/layer-selection/v1\0" + canonical.encode()).hexdigest()
        head = b"opentrans-hub/layer-selection/v2\0" + arch.encode("utf-8") + b"\0"
        return hashlib.sha256(head + canonical.encode()).hexdigest()

    def noncanonical(self, source: str | None = None, warn: bool = False) -> list[str] | None:
        """Layer names the tower of :attr:`arch` does not have; None when that tower is not known."""
        from ..towers.archs import noncanonical, warn_noncanonical

        names = [layer.get("param") or layer["name"] for layer in self.layers]
        return warn_noncanonical(names, self.arch, "layer", source) if warn else noncanonical(names, self.arch)

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

    def to_bytes(self) -> bytes:
        return self.to_json().encode("utf-8")

    def save(self, path: str | os.PathLike) -> Path:
        return atomic_write_text(path, self.to_json())

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<bytes>", verify: bool = True) -> LayerSelection:
        """Decode a manifest written by :meth:`to_bytes`; any defect raises :class:`OpenTransError`."""
        found = sniff(data)
        if found.kind not in ("json", "text"):
            raise OpenTransError(f"is {found.describe()}, not a layer selection (JSON)", path=source)
        check_json(len(data), "the manifest", source)
        try:
            payload = json.loads(data.decode("utf-8-sig"))  # a byte-order mark some editors add is harmless
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise OpenTransError("not valid JSON", path=source) from None
        except MemoryError:
            raise out_of_memory(len(data), "parsing the manifest", source) from None
        return cls.from_dict(payload, source=source, verify=verify)

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>", verify: bool = True) -> LayerSelection:
        if not isinstance(data, dict):
            raise OpenTransError(f"a JSON {type(data).__name__}, not an opentrans-hub layer selection (a JSON object "
                                 f"with format {FORMAT!r})", path=source)
        if format_name(data.get("format")) != FORMAT:
            raise OpenTransError(f"not an opentrans-hub layer selection (format={data.get('format')!r})", path=source)
        for key, kinds, what in (("policy", (dict, type(None)), "an object"), ("provenance", (dict, type(None)),
                                 "an object"), ("arch", (str, type(None)), "a string"),
                                 ("weights_sha256", (str, type(None)), "a string or null")):
            if not isinstance(data.get(key), kinds):
                raise OpenTransError(f"field {key!r} must be {what}, got the {type(data.get(key)).__name__} "
                                     f"{str(data.get(key))[:40]!r}", path=source)
        version = data.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise OpenTransError(f"format version {version!r} is not one this library reads ({FORMAT_VERSION})",
                                 path=source)
        layers = data.get("layers")
        if not isinstance(layers, list) or not all(isinstance(layer, dict) for layer in layers):
            raise OpenTransError("'layers' must be a list of objects", path=source)
        try:
            selection = cls(layers, arch=data.get("arch") or "unknown", policy=data.get("policy") or {},
                            weights_sha256=data.get("weights_sha256"), provenance=data.get("provenance") or {})
        except OpenTransError as exc:
            raise OpenTransError(exc.detail, path=source, tensor=exc.tensor) from None
        if verify and data.get("sha256") != selection.sha256:
            if data.get("sha256") == selection._hash(None):
                raise OpenTransError("written by opentrans-hub 0.1, whose hash did not cover the architecture: "
                                     "load it with verify=False, check its arch, and save it again", path=source)
            raise OpenTransError(f"content hash mismatch: file says {str(data.get('sha256'))[:16]}..., content is "
                                 f"{selection.sha256[:16]}...", path=source)
        return selection

    @classmethod
    def load(cls, path: str | os.PathLike, verify: bool = True, expected_sha256: str | None = None) -> LayerSelection:
        path = Path(path)
        selection = cls.from_bytes(read_bytes(path), source=str(path), verify=verify)
        if expected_sha256 is not None and selection.sha256 != expected_sha256:
            raise OpenTransError(f"sha256 {selection.sha256} is not the expected {expected_sha256}", path=path)
        selection.noncanonical(source=str(path), warn=True)
        return selection

    # ----------------------------------------------------------------- policies and apply
    @property
    def params(self) -> dict[str, bool]:
        """Canonical parameter name -> trainable; a split attention weight trains if any of its parts does."""
        out: dict[str, bool] = {}
        for layer in self.layers:
            param = layer.get("param") or layer["name"]
            out[param] = out.get(param, False) or layer["trainable"]
        return out

    def reselect(self, policy: str = "median", **policy_args: Any) -> LayerSelection:
        """The same layers and metrics under another policy (metrics are not recomputed)."""
        from ..methods.select import select_layers  # a convenience door upward: policies live in methods

        return select_layers(self.layers, policy, arch=self.arch, weights_sha256=self.weights_sha256,
                             provenance=self.provenance, **policy_args)

    def apply(self, model: nn.Module, name_map: NameMap | None = None, biases: str = "follow",
              norms: str = "freeze", others: str = "freeze", scope: str | None = None,
              strict: bool = False) -> Any:
        """Set ``requires_grad`` on ``model``'s parameters from this selection (``oth.apply_selection(model,
        selection, ...)``; returns its SelectionReport)."""
        from ..transfer.selection import select_trainable  # a convenience door upward: applying lives in transfer

        return select_trainable(model, self, name_map=name_map, biases=biases, norms=norms, others=others,
                               scope=scope, strict=strict)
