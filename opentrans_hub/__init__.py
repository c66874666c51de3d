"""opentrans-hub: portable OpenTrans subnetworks and layer selections for open-vocabulary segmentation.

The public API is this module's names, loaded on first use (``import opentrans_hub`` imports no torch):
``oth.Subnetwork``, ``oth.apply_subnetwork(model, sub, ...)``, ``oth.load_backbone(...)``... Each name lives in
the layer that owns it (see ``docs/design.md``); this table only says where.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .version import __version__ as __version__

#: public name -> the module (below this package) that defines it
_PUBLIC = {
    "OpenTransError": "errors", "OpenTransWarning": "errors", "decode_limit": "io.limits",
    "NameMap": "naming.namemap", "Rule": "naming.namemap", "MappingReport": "naming.namemap",
    "TIMM_CLIP_RESNET_RULES": "towers.timm_names",
    "Subnetwork": "formats.subnetwork", "LayerSelection": "formats.selection",
    "apply_masks": "sparsity.masks", "bake": "sparsity.masks", "enforce": "sparsity.masks",
    "masked_parameters": "sparsity.masks", "remove": "sparsity.masks",
    "count_zeros": "sparsity.stats", "model_sparsity": "sparsity.stats",
    "export_subnetwork": "sparsity.verify", "verify_exact": "sparsity.verify",
    "IMPRunner": "methods.imp", "PruneScope": "methods.prune", "magnitude_prune": "methods.prune",
    "prune_round": "methods.prune", "magnitude_masks": "methods.magnitude",
    "LayerMetrics": "methods.spectral", "compute_metrics": "methods.spectral",
    "select_layers": "methods.select",
    "from_torch_prune": "methods.importers", "from_zeros": "methods.importers",
    "import_pruned_checkpoint": "methods.importers",
    "count_flops": "methods.costs", "parameter_counts": "methods.costs", "sparse_inference_flops": "methods.costs",
    "plot_alpha": "methods.plots", "plot_sparsity": "methods.plots",
    "Registry": "zoo.registry", "load_selection": "zoo.registry", "load_subnetwork": "zoo.registry",
    "load_sparse": "zoo.packing", "pack_checkpoint": "zoo.packing", "unpack": "zoo.packing",
    "push": "zoo.hub", "pull": "zoo.hub", "load_backbone": "transfer.backbone",
    "apply_subnetwork": "transfer.apply", "apply_subnetwork_to_state_dict": "transfer.apply",
    "apply_selection": "transfer.apply", "SelectionReport": "transfer.selection",
    "param_groups": "transfer.lr_groups",
    # Plugin is defined in transfer.plugins; loading it through discovery also wires the installed-plugin hints
    "Plugin": "transfer.discovery", "get_plugin": "transfer.discovery", "list_plugins": "transfer.discovery",
    "InferenceReport": "transfer.inference", "infer_name_map": "transfer.inference",
    "OpenTransSchedule": "integrations.training",
}

__all__ = sorted([*_PUBLIC, "__version__"])


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'opentrans_hub' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from .errors import OpenTransError, OpenTransWarning  # noqa: F401
    from .formats.selection import LayerSelection  # noqa: F401
    from .formats.subnetwork import Subnetwork  # noqa: F401
    from .naming.namemap import MappingReport, NameMap, Rule  # noqa: F401
