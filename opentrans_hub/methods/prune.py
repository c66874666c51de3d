"""One-shot magnitude pruning of a CLIP image encoder, and the scope that says what may be pruned.

* :class:`PruneScope` says which tensors may be pruned (default: every Conv2d weight of the tower but the
  first conv, as in OpenTrans), how they are ranked (one global ranking or per layer) and how dense each
  layer must stay.
* :func:`magnitude_prune` prunes a live model (masks narrow any mask already there) and returns the
  :class:`~opentrans_hub.formats.subnetwork.Subnetwork` in canonical names; one IMP round
  (:class:`~opentrans_hub.methods.imp.IMPRunner`) is such a prune at a rate of the live weights.

The pure core, keep-masks for given weights at a target sparsity, is
:func:`~opentrans_hub.methods.magnitude.magnitude_masks`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..errors import OpenTransError
from ..formats.subnetwork import Subnetwork, default_provenance
from ..sparsity.masks import apply_masks, masked_parameters, unwrap
from ..sparsity.sharding import full_mask
from .magnitude import RANKINGS, magnitude_masks

LAYER_TYPES = ("conv", "linear")


# ------------------------------------------------------------------------------------------------ scope
@dataclass(frozen=True)
class PruneScope:
    """Which weights of a CLIP tower are prunable, and how they are ranked.

    ``layer_types``: ``"conv"`` (Conv2d weights) and/or ``"linear"`` (Linear weights and the fused
    attention ``in_proj_weight``, for ViT and ConvNeXt towers). ``exclude_first`` leaves out the first
    Conv2d (the stem / patch embedding). ``include`` / ``exclude`` are regexes searched in canonical names.
    ``ranking`` is ``"global"`` (one threshold over the scope, the paper) or ``"layerwise"``;
    ``min_density`` is the fraction of every layer that always stays (so global pruning cannot empty one).
    """

    layer_types: tuple[str, ...] = ("conv",)
    exclude_first: bool = True
    include: str | None = None
    exclude: str | None = None
    ranking: str = "global"
    min_density: float = 0.0

    def __post_init__(self):
        types = (self.layer_types,) if isinstance(self.layer_types, str) else tuple(self.layer_types)
        object.__setattr__(self, "layer_types", types)
        if not types or any(t not in LAYER_TYPES for t in types):
            raise OpenTransError(f"layer_types must be a non-empty subset of {LAYER_TYPES}, got {types!r}")
        if self.ranking not in RANKINGS:
            raise OpenTransError(f"ranking must be one of {RANKINGS}, got {self.ranking!r}")
        if not 0.0 <= float(self.min_density) <= 1.0:
            raise OpenTransError(f"min_density must lie in [0, 1], got {self.min_density!r}")
        for pattern in (self.include, self.exclude):
            if pattern:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise OpenTransError(f"bad regex {pattern!r} in the prune scope: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["layer_types"] = list(self.layer_types)
        return data

    def select(self, model: nn.Module, prefix: str = "") -> dict[str, tuple[str, nn.Parameter]]:
        """Canonical name -> (full parameter name in ``model``, parameter), in module order.

        ``prefix`` is where the tower sits in ``model`` (``backbone.clip_model.visual.``); canonical names
        are the full names with it stripped.
        """
        model = unwrap(model)
        include = re.compile(self.include) if self.include else None
        exclude = re.compile(self.exclude) if self.exclude else None
        out: dict[str, tuple[str, nn.Parameter]] = {}
        first_conv_seen = False
        in_tower = False
        for module_name, module in model.named_modules():
            full_module = f"{module_name}." if module_name else ""
            if prefix and not full_module.startswith(prefix):
                continue
            in_tower = True
            canonical_module = full_module[len(prefix):]
            attrs: list[str] = []
            if isinstance(module, nn.Conv2d):
                if not first_conv_seen:
                    first_conv_seen = True
                    if self.exclude_first:
                        continue
                if "conv" in self.layer_types:
                    attrs = ["weight"]
            elif "linear" in self.layer_types:
                if isinstance(module, nn.Linear):
                    attrs = ["weight"]
                elif isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
                    attrs = ["in_proj_weight"]
            for attr in attrs:
                param = module._parameters.get(attr)
                if not isinstance(param, nn.Parameter):
                    continue
                canonical = canonical_module + attr
                if include is not None and not include.search(canonical):
                    continue
                if exclude is not None and exclude.search(canonical):
                    continue
                out[canonical] = (full_module + attr, param)
        if prefix and not in_tower:
            raise OpenTransError(f"the model has no module under prefix {prefix!r}")
        if not out:
            raise OpenTransError(f"the prune scope selects no tensor (layer_types={list(self.layer_types)}, "
                                 f"include={self.include!r}, exclude={self.exclude!r}, prefix={prefix!r})")
        return out


# ------------------------------------------------------------------------------------------ live models
def current_masks(scope_params: Mapping[str, tuple[str, nn.Parameter]], model: nn.Module) -> dict[str, torch.Tensor]:
    """The masks already on ``model`` for the selected parameters, by canonical name (new masks narrow them)."""
    existing = masked_parameters(unwrap(model))
    return {canonical: existing[full] for canonical, (full, _) in scope_params.items() if full in existing}


def magnitude_prune(model: nn.Module, *, sparsity: float | None = None, rate: float | None = None,
                    scope: PruneScope | None = None, prefix: str = "", arch: str = "unknown", apply: bool = True,
                    provenance: Mapping[str, Any] | None = None) -> Subnetwork:
    """Prune ``model``'s tower by magnitude (one shot) and return the Subnetwork in canonical names.

    Masks already on the model are respected (the result is nested in them). With ``apply`` the masks go
    onto the model through :func:`~opentrans_hub.sparsity.masks.apply_masks` and stay exact while training.
    On a model sharded by ``fully_shard`` this is collective (call it on every rank); each rank keeps its
    own mask rows, and the returned Subnetwork holds the whole masks (gathered as bool). Layers pruned away
    entirely (global ranking of untrained weights empties some) are warned about
    (:class:`~opentrans_hub.errors.OpenTransWarning`), as the CLI does.
    """
    scope = scope or PruneScope()
    selected = scope.select(model, prefix)
    weights = {canonical: param for canonical, (_, param) in selected.items()}
    current = current_masks(selected, model)
    masks = magnitude_masks(weights, current, sparsity=sparsity, rate=rate, ranking=scope.ranking,
                            min_density=scope.min_density)
    if apply:
        apply_masks(unwrap(model), {selected[c][0]: m for c, m in masks.items()})
    masks = {c: full_mask(m) for c, m in masks.items()}  # sharded: bool masks gathered, never weights
    settings = {"scope": scope.to_dict(), "prefix": prefix}
    settings.update({"sparsity": sparsity} if sparsity is not None else {"rate": rate})
    prov = default_provenance("magnitude", **settings)
    prov.update(provenance or {})
    empty = [name for name, mask in masks.items() if not bool(mask.any())]
    if empty:
        import warnings

        from ..errors import OpenTransWarning

        warnings.warn(f"{len(empty)} of {len(masks)} layer(s) pruned away entirely (e.g. {empty[0]}); the tower "
                      "cannot pass a signal through them: consider PruneScope(min_density=...) or layer-wise ranking",
                      OpenTransWarning, stacklevel=2)
    return Subnetwork(masks, arch=arch, provenance=prov)


prune_round = magnitude_prune  # one IMP round is a magnitude prune at ``rate`` of the live weights
