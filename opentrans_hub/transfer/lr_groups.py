"""A selection's learning-rate budget as an optimizer's parameter groups, mapped onto a framework's names.

:func:`param_groups` is the door from a LayerSelection with ``lr_scale``s (``select --policy alpha-lr``) to any
``torch.optim`` optimizer; :func:`parameter_scales` is the mapping under it (framework parameter name -> scale),
which framework integrations use to rescale an optimizer they build themselves (detectron2).
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

from torch import nn

from ..errors import OpenTransError, OpenTransWarning
from ..formats.selection import LayerSelection
from ..naming.namemap import MappingReport, NameMap
from ..sparsity.masks import unwrap
from ..zoo.registry import load_selection
from .coverage import require_mapped
from .selection import bias_name


def _plugin(plugin: Any) -> Any:
    if isinstance(plugin, str):
        from .discovery import get_plugin

        return get_plugin(plugin)
    return plugin


def parameter_scales(model: nn.Module, selection: LayerSelection | str | os.PathLike, *,
                     name_map: NameMap | None = None, plugin: Any = None
                     ) -> tuple[dict[str, float], MappingReport]:
    """(``model``'s parameter name -> learning-rate scale, the mapping report) for the selection's layers.

    Each selected weight is mapped through ``name_map`` (identity by default) or a plugin's NameMap
    (``plugin``: a Plugin or its name, as ``plugin.apply_selection`` maps it); the bias of a mapped weight that
    the selection does not list itself takes its weight's scale (a layer learns at one rate). Names of a
    DDP-wrapped model are those inside the wrapper. Parameters not listed have no entry (scale 1.0). Nothing
    mapped (or, through a plugin, far fewer names than its layout maps) is an :class:`OpenTransError`.
    """
    if name_map is not None and plugin is not None:
        raise OpenTransError("pass name_map= or plugin=, not both: the plugin brings its own name map")
    selection = load_selection(selection)
    model = unwrap(model)
    params = dict(model.named_parameters())
    scales_of = selection.lr_scales
    if plugin is not None:
        _, report = _plugin(plugin).map_selection(selection, params)
    else:
        report = (name_map or NameMap()).resolve_names(scales_of, params)
        require_mapped(report, len(scales_of), what="selection")
    parts: dict[str, list[float]] = {}
    for source, dest in report.mapped:
        parts.setdefault(dest, []).append(scales_of[source])
    scales = {dest: math.fsum(values) / len(values) for dest, values in parts.items()}
    for weight in list(scales):
        bias = bias_name(weight)
        if bias in params and bias not in scales:
            scales[bias] = scales[weight]
    return scales, report


def param_groups(model: nn.Module, selection: LayerSelection | str | os.PathLike, lr: float, *,
                 name_map: NameMap | None = None, plugin: Any = None, **optimizer_kwargs: Any) -> list[dict[str, Any]]:
    """``torch.optim`` parameter groups: each trainable parameter of ``model`` once, at ``lr * lr_scale``.

    Parameters the selection reaches (see :func:`parameter_scales`) learn at ``lr`` times their layer's scale;
    every other parameter (a decoder, a layer without a scale) keeps ``lr``. Parameters that do not require a
    gradient are left out, as detectron2 leaves them out: call this after ``oth.apply_selection`` (a layer the
    selection freezes but that still requires a gradient is kept at its scale, with an
    :class:`~opentrans_hub.errors.OpenTransWarning`). One group per distinct scale, in the order the model
    first holds one; each carries ``lr``, its ``lr_scale`` (kept in the optimizer's groups, so schedulers that
    multiply ``initial_lr`` keep the ratio) and ``optimizer_kwargs`` (``weight_decay=``, ``betas=``...)::

        opt = torch.optim.AdamW(oth.param_groups(model, "budget.json", 1e-4, weight_decay=0.05))
    """
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
        raise OpenTransError(f"lr must be a finite number >= 0, got {lr!r}")
    clash = sorted({"params", "lr", "lr_scale"} & set(optimizer_kwargs))
    if clash:
        raise OpenTransError(f"{', '.join(clash)} cannot be an optimizer option here: param_groups sets it")
    selection = load_selection(selection)
    scales, report = parameter_scales(model, selection, name_map=name_map, plugin=plugin)
    flags = selection.params
    still = sorted({dest for source, dest in report.mapped if not flags[source]}
                   & {name for name, p in unwrap(model).named_parameters() if p.requires_grad})
    if still:
        warnings.warn(f"{len(still)} parameter(s) the selection freezes still require a gradient (first {still[0]}); "
                      "they are grouped at their lr scale: call oth.apply_selection(model, selection) first to "
                      "freeze them", OpenTransWarning, stacklevel=2)
    groups: dict[float, dict[str, Any]] = {}
    for name, param in unwrap(model).named_parameters():
        if not param.requires_grad:
            continue
        scale = scales.get(name, 1.0)
        if scale not in groups:
            groups[scale] = {"params": [], "lr": lr * scale, "lr_scale": scale, **optimizer_kwargs}
        groups[scale]["params"].append(param)
    if not groups:
        raise OpenTransError("no parameter of the model requires a gradient: nothing to optimize")
    return list(groups.values())
