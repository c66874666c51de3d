"""opentrans-hub: portable OpenTrans subnetworks and layer selections for open-vocabulary segmentation.

The public API is kept small; everything here is documented in the README.
"""

__version__ = "0.2.0"

from .errors import OpenTransError, OpenTransWarning  # noqa: E402
from .hub import load_backbone, pull, push  # noqa: E402
from .imp import IMPRunner, PruneScope, magnitude_masks, magnitude_prune, prune_round  # noqa: E402
from .importers import from_torch_prune, from_zeros, import_pruned_checkpoint  # noqa: E402
from .inference import InferenceReport, infer_name_map  # noqa: E402
from .mapping import MappingReport, NameMap, Rule  # noqa: E402
from .packing import load_sparse, pack_checkpoint, unpack  # noqa: E402
from .plugins import Plugin, get_plugin, list_plugins  # noqa: E402
from .registry import Registry, load_selection, load_subnetwork  # noqa: E402
from .report import count_flops, parameter_counts, plot_alpha, plot_sparsity, sparse_inference_flops  # noqa: E402
from .selection import LayerSelection, SelectionReport, select_layers  # noqa: E402
from .sparsity import (  # noqa: E402
    apply_masks,
    bake,
    count_zeros,
    enforce,
    masked_parameters,
    model_sparsity,
    remove,
)
from .spectral import LayerMetrics, compute_metrics  # noqa: E402
from .subnetwork import Subnetwork  # noqa: E402
from .training import OpenTransSchedule  # noqa: E402
from .transfer import apply_selection, apply_subnetwork, apply_subnetwork_to_state_dict  # noqa: E402
from .verify import export_subnetwork, verify_exact  # noqa: E402

__all__ = [
    "IMPRunner",
    "InferenceReport",
    "LayerMetrics",
    "LayerSelection",
    "MappingReport",
    "NameMap",
    "OpenTransError",
    "OpenTransWarning",
    "OpenTransSchedule",
    "Plugin",
    "PruneScope",
    "Registry",
    "Rule",
    "SelectionReport",
    "Subnetwork",
    "__version__",
    "apply_masks",
    "apply_selection",
    "apply_subnetwork",
    "apply_subnetwork_to_state_dict",
    "bake",
    "compute_metrics",
    "count_flops",
    "count_zeros",
    "enforce",
    "export_subnetwork",
    "from_torch_prune",
    "from_zeros",
    "get_plugin",
    "import_pruned_checkpoint",
    "infer_name_map",
    "list_plugins",
    "load_backbone",
    "load_selection",
    "load_sparse",
    "load_subnetwork",
    "magnitude_masks",
    "magnitude_prune",
    "masked_parameters",
    "model_sparsity",
    "pack_checkpoint",
    "parameter_counts",
    "plot_alpha",
    "plot_sparsity",
    "prune_round",
    "pull",
    "push",
    "remove",
    "select_layers",
    "sparse_inference_flops",
    "unpack",
    "verify_exact",
]
