"""opentrans-hub: portable OpenTrans subnetworks and layer selections for open-vocabulary segmentation.

The public API is kept small; everything here is documented in the README.
"""

__version__ = "0.1.0"

from .errors import OpenTransError  # noqa: E402
from .importers import from_torch_prune, from_zeros, import_pruned_checkpoint  # noqa: E402
from .mapping import MappingReport, NameMap, Rule  # noqa: E402
from .selection import LayerSelection  # noqa: E402
from .sparsity import (  # noqa: E402
    apply_masks,
    apply_subnetwork,
    apply_subnetwork_to_state_dict,
    bake,
    enforce,
    masked_parameters,
    model_sparsity,
    remove,
)
from .subnetwork import Subnetwork  # noqa: E402

__all__ = [
    "LayerSelection",
    "MappingReport",
    "NameMap",
    "OpenTransError",
    "Rule",
    "Subnetwork",
    "__version__",
    "apply_masks",
    "apply_subnetwork",
    "apply_subnetwork_to_state_dict",
    "bake",
    "enforce",
    "from_torch_prune",
    "from_zeros",
    "import_pruned_checkpoint",
    "masked_parameters",
    "model_sparsity",
    "remove",
]
