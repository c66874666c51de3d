"""Turn a LayerSelection into ``requires_grad`` flags on a framework's model: map, scope, then set."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..errors import OpenTransError
from ..formats.selection import LayerSelection
from ..naming.namemap import NameMap, common_module_prefix


@dataclass
class SelectionReport:
    """What :func:`select_trainable` did: mapping outcome and trainable parameter counts before/after."""

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


def bias_name(weight_name: str) -> str | None:
    """The bias beside a weight (``in_proj_bias`` for ``in_proj_weight``), None for a name not ending in weight."""
    if weight_name.endswith("in_proj_weight"):
        return weight_name[: -len("in_proj_weight")] + "in_proj_bias"
    if weight_name.endswith("weight"):
        return weight_name[: -len("weight")] + "bias"
    return None


def select_trainable(model: nn.Module, selection: LayerSelection, name_map: NameMap | None = None,
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
    norm_types = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
    norm_params = {f"{module_name}.{attr}" if module_name else attr
                   for module_name, module in model.named_modules() if isinstance(module, norm_types)
                   for attr, _ in module.named_parameters(recurse=False)}
    bias_of = {}
    for weight_name, trainable in flags.items():
        bias = bias_name(weight_name)
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
