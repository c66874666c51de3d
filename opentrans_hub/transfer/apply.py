"""The one apply pipeline: plan (map names), check (shapes, mapped share, coverage), zero (masks or a copy).

Every way a subnetwork reaches a framework goes through :func:`plan_masks`: the public functions here, each
plugin's ``apply`` and ``apply_checkpoint``, the auto plugin, torch.hub and the CLI. Nothing is changed until
the plan has passed every check, so an apply is all-or-nothing. The public functions take a subnetwork or
selection as an object, a registry name, an ``hf://`` reference or a file.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..formats.selection import LayerSelection
from ..formats.subnetwork import Subnetwork
from ..naming.namemap import MappingReport, NameMap
from ..sparsity.masks import apply_masks, check_mask_target, zeroed
from ..zoo.registry import load_selection, load_subnetwork
from .coverage import check_coverage, check_same_arch, require_mapped
from .selection import SelectionReport, select_trainable


def plan_masks(subnetwork: Subnetwork, name_map: NameMap, shapes: Mapping[str, tuple[int, ...]], *,
               arch: str | None = None, strict: bool = False, allow_partial: bool = False,
               scope: str | Sequence[str] | None = None, source: str | None = None, promised: int | None = None,
               hint: str | Callable[[], str] = "") -> tuple[dict[str, torch.Tensor], MappingReport]:
    """Masks keyed by the target's names, after every check an apply makes; raises before anything changes.

    ``shapes`` are the target's tensor shapes by name. Refused: a shape mismatch; nothing mapped, or fewer
    than half of the ``promised`` names; with ``strict``, any unmapped name; and, unless ``allow_partial``, a
    target ``arch`` other than the subnetwork's or Conv/Linear weights in the tower (``scope``) that ``arch``
    (default: the subnetwork's) has no counterpart for.
    """
    check_same_arch(arch or subnetwork.arch, subnetwork.arch, allow_partial)
    masks, report = name_map.resolve(subnetwork.masks, shapes)
    report.check(strict=strict, source=source)
    require_mapped(report, len(subnetwork), promised=promised, source=source, hint=hint)
    check_coverage(arch or subnetwork.arch, name_map, shapes, report, scope=scope, allow_partial=allow_partial,
                   source=source)
    return masks, report


def zero_state(state: Mapping[str, Any], masks: Mapping[str, torch.Tensor], source: str | None = None
               ) -> dict[str, Any]:
    """A copy of ``state`` with the masked tensors' pruned positions zeroed (others are the same objects);
    every target is checked before any tensor is copied."""
    for name in masks:
        check_mask_target(state[name], name, source)
    out = dict(state)
    for name, mask in masks.items():
        out[name] = zeroed(state[name], mask, name)
    return out


def parameter_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False)}


def apply_subnetwork(model: nn.Module, subnetwork: Subnetwork | str | os.PathLike, name_map: NameMap | None = None,
                     strict: bool = False, allow_partial: bool = False,
                     scope: str | Sequence[str] | None = None) -> MappingReport:
    """Map ``subnetwork`` onto ``model`` through ``name_map`` and keep its zeros exact while training.

    Every destination is resolved by name and shape-checked first; nothing is changed and
    :class:`OpenTransError` is raised on any mismatch, when no name is mapped (or, with ``strict``, any name is
    unmapped), and when the tower (``scope``: a name prefix, by default where the mapped names sit) holds
    Conv/Linear weights the subnetwork's architecture has no counterpart for, unless ``allow_partial``; those
    are then listed in ``report.uncovered`` (they stay dense).
    """
    masks, report = plan_masks(load_subnetwork(subnetwork), name_map or NameMap(), parameter_shapes(model),
                               strict=strict, allow_partial=allow_partial, scope=scope)
    apply_masks(model, masks)
    return report


def apply_subnetwork_to_state_dict(state_dict: Mapping[str, torch.Tensor], subnetwork: Subnetwork | str | os.PathLike,
                                   name_map: NameMap | None = None, strict: bool = False, source: str | None = None,
                                   allow_partial: bool = False, scope: str | Sequence[str] | None = None
                                   ) -> tuple[dict[str, torch.Tensor], MappingReport]:
    """A new state dict with pruned weights zeroed (other tensors are the same objects); refuses what
    :func:`apply_subnetwork` refuses."""
    shapes = {name: tuple(t.shape) for name, t in state_dict.items() if isinstance(t, torch.Tensor)}
    masks, report = plan_masks(load_subnetwork(subnetwork), name_map or NameMap(), shapes, strict=strict,
                               allow_partial=allow_partial, scope=scope, source=source)
    return zero_state(state_dict, masks, source), report


def apply_selection(model: nn.Module, selection: LayerSelection | str | os.PathLike,
                    name_map: NameMap | None = None, **options: Any) -> SelectionReport:
    """Set ``requires_grad`` of ``model``'s parameters from ``selection`` (all-or-nothing); ``options`` are
    those of :func:`~opentrans_hub.transfer.selection.select_trainable` (``biases``, ``norms``, ``others``,
    ``scope``, ``strict``). The 0.2 argument order ``(selection, model)`` still works, with a warning."""
    if isinstance(selection, nn.Module) and not isinstance(model, nn.Module):
        warnings.warn("apply_selection(selection, model) is the 0.2 argument order; call "
                      "apply_selection(model, selection)", DeprecationWarning, stacklevel=2)
        model, selection = selection, model
    return select_trainable(model, load_selection(selection), name_map=name_map, **options)
