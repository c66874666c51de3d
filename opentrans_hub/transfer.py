"""The public apply functions, taking a subnetwork or selection as an object, a registry name, an ``hf://``
reference or a file, like every other entry point (plugins, torch.hub, the CLI).

They sit above the registry: :mod:`opentrans_hub.sparsity` and :mod:`opentrans_hub.selection` work on objects
and never import it (the import graph stays one-way).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .mapping import MappingReport, NameMap
from .registry import load_selection, load_subnetwork
from .selection import LayerSelection, SelectionReport
from .selection import apply_selection as _apply_selection
from .sparsity import apply_subnetwork as _apply_subnetwork
from .sparsity import apply_subnetwork_to_state_dict as _apply_to_state_dict
from .subnetwork import Subnetwork


def apply_subnetwork(model: nn.Module, subnetwork: Subnetwork | str | os.PathLike, name_map: NameMap | None = None,
                     strict: bool = False, allow_partial: bool = False,
                     scope: str | Sequence[str] | None = None) -> MappingReport:
    """:func:`opentrans_hub.sparsity.apply_subnetwork` for an object or reference (all-or-nothing)."""
    return _apply_subnetwork(model, load_subnetwork(subnetwork), name_map, strict=strict, allow_partial=allow_partial,
                             scope=scope)


def apply_subnetwork_to_state_dict(state_dict: Mapping[str, torch.Tensor], subnetwork: Subnetwork | str | os.PathLike,
                                   name_map: NameMap | None = None, strict: bool = False, source: str | None = None,
                                   allow_partial: bool = False, scope: str | Sequence[str] | None = None
                                   ) -> tuple[dict[str, torch.Tensor], MappingReport]:
    """:func:`opentrans_hub.sparsity.apply_subnetwork_to_state_dict` for an object or reference."""
    return _apply_to_state_dict(state_dict, load_subnetwork(subnetwork), name_map, strict=strict, source=source,
                                allow_partial=allow_partial, scope=scope)


def apply_selection(selection: LayerSelection | str | os.PathLike, model: nn.Module, name_map: NameMap | None = None,
                    **options: Any) -> SelectionReport:
    """:func:`opentrans_hub.selection.apply_selection` for an object or reference (all-or-nothing)."""
    return _apply_selection(load_selection(selection), model, name_map=name_map, **options)
