"""LayerSelection: which layers of the CLIP image encoder to fine-tune, with the metrics that chose them.

A selection is data: per-layer metrics (alpha, D, ...) in network order, a ``trainable`` flag per layer,
the policy that set the flags, the architecture id and the sha256 of the weights it was measured on. It
is stored as a small JSON manifest; its identity (sha256) covers the architecture id, the layer names and their
flags only, so recomputing metrics or re-wording provenance never changes which selection it is.

:func:`select_layers` derives a selection from metrics (``opentrans_hub.spectral.compute_metrics``) with a
policy (``median`` as in the paper, ``fraction``, ``count``, ``budget``); :meth:`LayerSelection.apply` sets
``requires_grad`` on a framework's model through a NameMap and reports the trainable parameters.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._atomic import atomic_write_text, read_bytes
from .archs import check_arch, check_tensor_name
from .errors import OpenTransError

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from .mapping import NameMap

FORMAT = "opentrans-hub/layer-selection"
FORMAT_VERSION = 1


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
        """sha256 over the architecture id and the layer names with their flags (not metrics or provenance)."""
        return self._hash(self.arch)

    def _hash(self, arch: str | None) -> str:
        canonical = json.dumps(sorted([layer["name"], layer["trainable"]] for layer in self.layers),
                               separators=(",", ":"))
        if arch is None:  # opentrans-hub 0.1: the architecture was not part of the identity
            return hashlib.sha256(b"opentrans-hub/layer-selection/v1\0" + canonical.encode()).hexdigest()
        head = b"opentrans-hub/layer-selection/v2\0" + arch.encode("utf-8") + b"\0"
        return hashlib.sha256(head + canonical.encode()).hexdigest()

    def noncanonical(self, source: str | None = None, warn: bool = False) -> list[str] | None:
        """Layer names the tower of :attr:`arch` does not have; None when that tower is not known."""
        from .archs import noncanonical, warn_noncanonical

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
        try:
            payload = json.loads(data.decode("utf-8-sig"))  # a byte-order mark some editors add is harmless
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise OpenTransError("not valid JSON", path=source) from None
        return cls.from_dict(payload, source=source, verify=verify)

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>", verify: bool = True) -> LayerSelection:
        if not isinstance(data, dict):
            raise OpenTransError(f"a JSON {type(data).__name__}, not an opentrans-hub layer selection (a JSON object "
                                 f"with format {FORMAT!r})", path=source)
        if data.get("format") != FORMAT:
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
        return select_layers(self.layers, policy, arch=self.arch, weights_sha256=self.weights_sha256,
                             provenance=self.provenance, **policy_args)

    def apply(self, model: nn.Module, name_map: NameMap | None = None, biases: str = "follow",
              norms: str = "freeze", others: str = "freeze", scope: str | None = None,
              strict: bool = False) -> SelectionReport:
        """Set ``requires_grad`` on ``model``'s parameters from this selection; see :func:`apply_selection`."""
        return apply_selection(self, model, name_map=name_map, biases=biases, norms=norms, others=others,
                               scope=scope, strict=strict)


# --------------------------------------------------------------------------------------------- policies
POLICIES = ("median", "fraction", "count", "budget")


def _number(value: Any) -> float | None:
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def _layer_dict(metric: Any) -> dict[str, Any]:
    data = metric.to_dict() if hasattr(metric, "to_dict") else dict(metric)
    for key, value in list(data.items()):  # JSON has no NaN: unknown metrics are null
        if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
            data[key] = None
    return data


def select_layers(metrics: Sequence[Any], policy: str = "median", *, arch: str = "unknown",
                  weights_sha256: str | None = None, provenance: Mapping[str, Any] | None = None,
                  fraction: float | None = None, count: int | None = None,
                  max_params: int | None = None) -> LayerSelection:
    """A LayerSelection from per-layer metrics (``LayerMetrics`` or dicts with ``name``/``alpha``).

    Policies (layers with a higher alpha, the lighter tail, are the ones fine-tuned):

    * ``median`` (the paper): freeze layers with ``alpha < median(alpha)``; the others train, so with an
      odd number of layers the median layer trains (numpy's median: the mean of the middle two otherwise);
    * ``fraction``: train ``round(fraction * layers)`` layers with the highest alpha;
    * ``count``: train the ``count`` layers with the highest alpha;
    * ``budget``: walk layers from the highest alpha down, train each that still fits in ``max_params``
      trainable weights (a layer too large is skipped, smaller ones after it may still fit).

    Ties keep network order. Layers without an alpha (fewer than two eigenvalues) train under every
    policy and do not count towards the median, fraction, count or budget.
    """
    if policy not in POLICIES:
        raise OpenTransError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    layers = [_layer_dict(m) for m in metrics]
    for layer in layers:
        layer.pop("trainable", None)
    known = [i for i, layer in enumerate(layers) if _number(layer.get("alpha")) is not None]
    ranked = sorted(known, key=lambda i: -_number(layers[i]["alpha"]))  # stable: ties in network order
    chosen: set[int] = set()
    record: dict[str, Any] = {"name": policy}
    if policy == "median":
        if known:
            alphas = sorted(_number(layers[i]["alpha"]) for i in known)
            mid = len(alphas) // 2
            median = alphas[mid] if len(alphas) % 2 else (alphas[mid - 1] + alphas[mid]) / 2
            chosen = {i for i in known if _number(layers[i]["alpha"]) >= median}
            record["median"] = median
    elif policy == "fraction":
        if fraction is None or not 0 <= fraction <= 1:
            raise OpenTransError(f"policy 'fraction' needs 0 <= fraction <= 1, got {fraction!r}")
        take = int(round(fraction * len(known)))
        chosen = set(ranked[:take])
        record["fraction"] = fraction
    elif policy == "count":
        if count is None or count < 0:
            raise OpenTransError(f"policy 'count' needs count >= 0, got {count!r}")
        chosen = set(ranked[:count])
        record["count"] = int(count)
    else:
        if max_params is None or max_params < 0:
            raise OpenTransError(f"policy 'budget' needs max_params >= 0, got {max_params!r}")
        used = 0
        for i in ranked:
            size = int(layers[i].get("num_params") or 0)
            if used + size <= max_params:
                chosen.add(i)
                used += size
        record["max_params"] = int(max_params)
        record["used_params"] = used
    for i, layer in enumerate(layers):
        layer["trainable"] = i in chosen or i not in known
    record["trainable_layers"] = sum(layer["trainable"] for layer in layers)
    record["trainable_params"] = sum(int(layer.get("num_params") or 0) for layer in layers if layer["trainable"])
    return LayerSelection(layers, arch=arch, policy=record, weights_sha256=weights_sha256, provenance=provenance)


# --------------------------------------------------------------------------------------------- apply
@dataclass
class SelectionReport:
    """What :func:`apply_selection` did: mapping outcome and trainable parameter counts before/after."""

    mapped: list[tuple[str, str]] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)
    unmapped: list[tuple[str, str]] = field(default_factory=list)
    scope: str = ""
    total_params: int = 0
    trainable_before: int = 0
    trainable_after: int = 0
    trainable: list[str] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"mapped": [{"source": s, "target": t} for s, t in self.mapped],
                "dropped": [{"source": s, "reason": r} for s, r in self.dropped],
                "unmapped": [{"source": s, "reason": r} for s, r in self.unmapped],
                "scope": self.scope, "total_params": self.total_params, "trainable_before": self.trainable_before,
                "trainable_after": self.trainable_after, "trainable": self.trainable, "frozen": self.frozen}

    def summary(self) -> str:
        share = self.trainable_after / self.total_params if self.total_params else 0.0
        return (f"mapped {len(self.mapped)}, dropped {len(self.dropped)}, unmapped {len(self.unmapped)}; "
                f"trainable parameters {self.trainable_before:,} -> {self.trainable_after:,} of "
                f"{self.total_params:,} ({share:.1%}) in scope {self.scope or '<model>'!r}")


_CHOICES = {"biases": ("follow", "freeze", "train"), "norms": ("freeze", "train", "keep"), "others": ("freeze", "keep")}


def _bias_name(weight_name: str) -> str | None:
    if weight_name.endswith("in_proj_weight"):
        return weight_name[: -len("in_proj_weight")] + "in_proj_bias"
    if weight_name.endswith("weight"):
        return weight_name[: -len("weight")] + "bias"
    return None


def apply_selection(selection: LayerSelection, model: nn.Module, name_map: NameMap | None = None,
                    biases: str = "follow", norms: str = "freeze", others: str = "freeze",
                    scope: str | None = None, strict: bool = False) -> SelectionReport:
    """Set ``requires_grad`` of ``model``'s parameters from ``selection`` (all-or-nothing).

    Each selected weight is mapped through ``name_map`` (identity by default) onto ``model``'s parameter
    names and trains or freezes as the selection says. Within ``scope`` (a parameter-name prefix; by
    default the deepest module holding every mapped weight, e.g. ``backbone.visual.``): ``biases`` of
    selected layers ``follow`` their weight (or ``freeze``/``train``), parameters of normalisation layers
    ``freeze``/``train``/``keep``, and every other parameter ``freeze``s or is kept as it is. Parameters
    outside the scope (a decoder, a text tower) are never touched. ``strict`` refuses unmapped names.
    """
    from torch import nn as _nn

    from .mapping import NameMap, common_module_prefix

    for option, value in (("biases", biases), ("norms", norms), ("others", others)):
        if value not in _CHOICES[option]:
            raise OpenTransError(f"{option}={value!r}: choose one of {', '.join(_CHOICES[option])}")
    name_map = name_map or NameMap()
    params = dict(model.named_parameters())
    report = SelectionReport()
    flags: dict[str, bool] = {}
    wanted = selection.params
    mapping = name_map.resolve_names(wanted, params)
    report.mapped, report.dropped, report.unmapped = mapping.mapped, mapping.dropped, mapping.unmapped
    for source, dest in mapping.mapped:
        flags[dest] = flags.get(dest, False) or wanted[source]
    if strict and report.unmapped:
        source, reason = report.unmapped[0]
        raise OpenTransError(f"strict: {len(report.unmapped)} layer(s) found no parameter, first {source} ({reason}); "
                             "nothing was changed", tensor=source)
    if not flags:
        raise OpenTransError("no layer of the selection matched a parameter of the model; nothing was changed "
                             f"({len(report.unmapped)} unmapped, {len(report.dropped)} dropped)")
    report.scope = common_module_prefix(flags) if scope is None else scope
    norm_types = (_nn.modules.batchnorm._NormBase, _nn.LayerNorm, _nn.GroupNorm, _nn.LocalResponseNorm)
    norm_params = {f"{module_name}.{attr}" if module_name else attr
                   for module_name, module in model.named_modules() if isinstance(module, norm_types)
                   for attr, _ in module.named_parameters(recurse=False)}
    bias_of = {}
    for weight_name, trainable in flags.items():
        bias = _bias_name(weight_name)
        if bias in params and bias not in flags:
            bias_of[bias] = trainable
    plan: dict[str, bool] = {}
    for name in params:
        if name in flags:
            plan[name] = flags[name]
        elif not name.startswith(report.scope):
            continue
        elif name in bias_of:
            plan[name] = bias_of[name] if biases == "follow" else biases == "train"
        elif name in norm_params or type(_module_of(model, name)).__name__.startswith("FrozenBatchNorm"):
            if norms != "keep":
                plan[name] = norms == "train"
        elif others == "freeze":
            plan[name] = False
    report.total_params = sum(p.numel() for p in params.values())
    report.trainable_before = sum(p.numel() for p in params.values() if p.requires_grad)
    for name, trainable in plan.items():
        params[name].requires_grad_(trainable)
    report.trainable_after = sum(p.numel() for p in params.values() if p.requires_grad)
    report.trainable = [name for name, p in params.items() if p.requires_grad and name.startswith(report.scope)]
    report.frozen = [name for name, p in params.items() if not p.requires_grad and name.startswith(report.scope)]
    return report


def _module_of(model: nn.Module, param_name: str) -> nn.Module | None:
    module_name = param_name.rpartition(".")[0]
    try:
        return model.get_submodule(module_name) if module_name else model
    except AttributeError:
        return None
