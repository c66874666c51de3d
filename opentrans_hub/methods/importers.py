"""Build Subnetworks from what the research code leaves behind.

* checkpoints written by ``torch.nn.utils.prune`` / OpenTrans (``<name>_orig`` + ``<name>_mask``, nested
  under ``backbone``/``model``, prefixed with ``module.``);
* a module whose pruned weights are zeros (a baked checkpoint);
* a live module pruned with ``torch.nn.utils.prune`` (its ``*_mask`` buffers).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..errors import OpenTransError
from ..formats.subnetwork import Subnetwork, default_provenance
from ..io.checkpoints import find_state_dict, read_checkpoint

_MASK_SUFFIX = "_mask"


def _canonical(name: str, prefix: str) -> str | None:
    """``name`` without DDP's ``module.`` and ``prefix``; None when a prefix is given and the name is outside it."""
    if name.startswith("module."):
        name = name[len("module."):]
    if prefix:
        if not name.startswith(prefix):
            return None
        name = name[len(prefix):]
    return name


def from_pruned_state_dict(state: Mapping[str, Any], arch: str = "unknown", prefix: str = "",
                           source: str | None = None) -> Subnetwork:
    """Subnetwork from ``*_mask`` entries of a torch.nn.utils.prune state dict.

    ``prefix`` (e.g. ``backbone.clip_model.visual.``) is stripped to reach canonical names and masks
    outside it (other parts of a detector) are left out; ``module.`` is always stripped. Masks may be
    float (0/1) as torch.prune writes them; anything else is refused.
    """
    masks: dict[str, torch.Tensor] = {}
    outside = 0
    # with torch.prune's ``*_orig`` present, only their ``*_mask`` partners are masks (a model may have other
    # buffers named ``*_mask``, e.g. attention masks); a masks-only file (OpenTrans extract_mask) has no _orig
    has_orig = any(k.endswith("_orig") for k in state)
    for key, value in state.items():
        if not key.endswith(_MASK_SUFFIX) or not isinstance(value, torch.Tensor):
            continue
        if has_orig and key[: -len(_MASK_SUFFIX)] + "_orig" not in state:
            continue
        name = _canonical(key[: -len(_MASK_SUFFIX)], prefix)
        if name is None:
            outside += 1
            continue
        if not name:
            raise OpenTransError(f"prefix {prefix!r} leaves an empty name", path=source, tensor=key)
        if value.dtype != torch.bool and not bool(((value == 0) | (value == 1)).all()):
            raise OpenTransError("mask holds values other than 0 and 1", path=source, tensor=key)
        orig = state.get(key[: -len(_MASK_SUFFIX)] + "_orig")
        if isinstance(orig, torch.Tensor) and orig.shape != value.shape:
            raise OpenTransError(f"mask shape {tuple(value.shape)} != weight shape {tuple(orig.shape)}",
                                 path=source, tensor=key)
        masks[name] = value.detach().to("cpu") != 0
    if not masks and outside:
        raise OpenTransError(f"{outside} '<name>_mask' tensor(s) found, none under the prefix {prefix!r}",
                             path=source)
    if not masks:
        raise OpenTransError("no '<name>_mask' tensors found: not a torch.nn.utils.prune checkpoint "
                             "(for a baked model with zeros use --from-zeros)", path=source)
    provenance = default_provenance("import", source=os.path.basename(source) if source else "state_dict",
                                    kind="torch.nn.utils.prune")
    return Subnetwork(masks, arch=arch, provenance=provenance)


def import_pruned_checkpoint(path: str | os.PathLike, arch: str = "unknown", prefix: str = "") -> Subnetwork:
    """Read an OpenTrans / torch.prune checkpoint file (weights_only) and return its Subnetwork."""
    state, _ = find_state_dict(read_checkpoint(path), path)
    return from_pruned_state_dict(state, arch=arch, prefix=prefix, source=str(path))


def from_zeros(weights: nn.Module | Mapping[str, torch.Tensor], arch: str = "unknown", include: str | None = None,
               layer_types: tuple[type[nn.Module], ...] = (nn.Conv2d,), prefix: str = "") -> Subnetwork:
    """Subnetwork from weights whose pruned entries are exactly zero.

    For a module, every weight of ``layer_types`` (default Conv2d) that has at least one zero is taken; for a
    state dict, every 4-D tensor named ``*.weight`` with a zero. ``include`` (regex) narrows either.
    """
    try:
        pattern = re.compile(include) if include else None
    except re.error as exc:
        raise OpenTransError(f"include pattern {include!r} is not a valid regular expression ({exc})") from None
    if isinstance(weights, nn.Module):
        items = [(f"{name}.weight" if name else "weight", m.weight) for name, m in weights.named_modules()
                 if isinstance(m, layer_types) and isinstance(getattr(m, "weight", None), torch.Tensor)]
    else:
        items = [(k, v) for k, v in weights.items() if isinstance(v, torch.Tensor) and k.endswith("weight")
                 and v.dim() == 4]
    masks = {}
    for name, tensor in items:
        name = _canonical(name, prefix)
        if not name or (pattern is not None and not pattern.search(name)):
            continue
        keep = tensor.detach().to("cpu") != 0
        if not bool(keep.all()):
            masks[name] = keep
    if not masks:
        raise OpenTransError("no weight with exact zeros found: nothing looks pruned")
    return Subnetwork(masks, arch=arch, provenance=default_provenance("import", kind="zeros", include=include))


def from_torch_prune(module: nn.Module, arch: str = "unknown", prefix: str = "") -> Subnetwork:
    """Subnetwork from a live module pruned with ``torch.nn.utils.prune`` (reads its ``*_mask`` buffers).

    ``prefix`` (e.g. ``backbone.clip_model.visual.``) selects and strips the tower inside a larger model.
    """
    masks = {}
    for name, buf in module.named_buffers():
        canonical = _canonical(name[: -len(_MASK_SUFFIX)], prefix) if name.endswith(_MASK_SUFFIX) else None
        if canonical:
            masks[canonical] = buf.detach().to("cpu") != 0
    if not masks:
        raise OpenTransError("module has no torch.nn.utils.prune masks (no '*_mask' buffers)")
    return Subnetwork(masks, arch=arch, provenance=default_provenance("import", kind="torch.nn.utils.prune/live"))
