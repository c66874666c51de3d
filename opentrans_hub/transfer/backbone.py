"""``load_backbone``: a CLIP image encoder with weights, a subnetwork and a selection, by any reference."""

from __future__ import annotations

import os
import re
from pathlib import Path

from torch import nn

from ..errors import OpenTransError
from ..formats.artefacts import NAME_PATTERN, kind_of
from ..formats.packed import PackedFile, PackedReader, open_packed
from ..formats.selection import LayerSelection
from ..formats.subnetwork import Subnetwork
from ..zoo.registry import Registry, default_registry
from ..zoo.remote import fetch, weights_file
from .coverage import check_same_arch


def _pretrained(pretrained: str | os.PathLike | None, registry: Registry | None
                ) -> str | os.PathLike | PackedReader | None:
    """Where ``pretrained`` weights come from: ``hf://ORG/REPO[@REV]/FILE`` is downloaded (its local path);
    ``hf://ORG/REPO[@REV]`` and registry names of packed checkpoints are fetched and verified (their reader);
    a local packed file is opened once (its reader); tags and other paths pass through."""
    if isinstance(pretrained, str) and pretrained.startswith("hf://") and re.fullmatch(
            r"hf://[^@/]+/[^@/]+(@[^/]+)?", pretrained):
        obj, _ = fetch(pretrained)
        if not isinstance(obj, PackedFile):
            raise OpenTransError(f"{pretrained} publishes a {kind_of(obj)}, not weights; pass it as "
                                 f"{'subnetwork' if kind_of(obj) == 'subnetwork' else 'selection'}=")
        return obj.reader
    if isinstance(pretrained, str) and NAME_PATTERN.fullmatch(pretrained) and not Path(pretrained).exists():
        entry = (registry or default_registry()).entry(pretrained)
        if entry is not None and entry.kind == "packed":
            obj = entry.load()  # verified (file and content hashes) before it is used
            assert isinstance(obj, PackedFile)
            return obj.reader
    weights = weights_file(pretrained) if isinstance(pretrained, str) else pretrained
    if weights is not None and Path(weights).is_file():
        return open_packed(weights, required=False) or weights
    return weights


def load_backbone(arch: str = "RN50", pretrained: str | os.PathLike | None = None,
                  subnetwork: str | os.PathLike | Subnetwork | None = None,
                  selection: str | os.PathLike | LayerSelection | None = None, exact: bool | None = None,
                  strict: bool = True, registry: Registry | None = None, allow_partial: bool = False) -> nn.Module:
    """A CLIP visual tower (canonical open_clip names) with an optional subnetwork and layer selection.

    ``arch``: ``RN50`` / ``open_clip/ViT-B-16`` / ``timm/resnet50_clip``. ``pretrained``: a tag (``openai``),
    a local weights file (a packed sparse file too), ``hf://ORG/REPO[@REV]/FILE``, or a packed backbone as
    ``hf://ORG/REPO[@REV]`` or registry name. ``subnetwork`` / ``selection``: a registry name, ``hf://``
    reference, path or object. ``exact=True`` keeps the masks so pruned weights stay exactly zero while
    training; ``exact=False`` leaves plain weights holding the zeros (inference); the default is exact for a
    packed backbone (its masks re-applied) and baked for a ``subnetwork`` on dense weights. A selection sets
    ``requires_grad`` through :meth:`LayerSelection.apply` (biases follow their weight, norms freeze).
    A subnetwork of another architecture (an RN50 one on an RN101 tower, whose extra blocks it cannot cover) is
    refused unless ``allow_partial`` (then ``tower.opentrans_subnetwork["dense"]`` lists what stays dense).
    """
    from ..io.checkpoints import state_dict_of
    from ..sparsity.masks import apply_masks, bake
    from ..towers.backbones import build_visual, load_visual_state
    from ..zoo.packing import tower_masks
    from ..zoo.registry import load_selection, load_subnetwork
    from .apply import apply_subnetwork

    weights = _pretrained(pretrained, registry)
    exact = isinstance(weights, PackedReader) if exact is None else exact
    if isinstance(weights, PackedReader):  # one open file: its masks verified, then its dense content
        sub_sha256 = weights.subnetwork().sha256 if weights.mask_names else None
        tower = build_visual(arch)
        load_visual_state(tower, state_dict_of(weights.checkpoint(), weights.source), weights.source)
        masks = tower_masks(weights, dict(tower.named_parameters()))
        if exact:
            apply_masks(tower, masks)  # exact from the first step: the zeros are in the weights already
        tower.opentrans_packed = {"content_sha256": weights.content_sha256, "masked_tensors": len(masks),
                                  "subnetwork": sub_sha256 if masks else None}
    else:
        tower = build_visual(arch, weights)  # a bare name means open_clip
    if subnetwork is not None:
        sub = load_subnetwork(subnetwork, registry)
        check_same_arch(arch, sub.arch, allow_partial)
        report = apply_subnetwork(tower, sub, strict=strict, allow_partial=allow_partial, scope="")
        if not exact:
            bake(tower)
        tower.opentrans_subnetwork = {"sha256": sub.sha256, "arch": sub.arch, "sparsity": sub.sparsity,
                                      "dense": list(report.uncovered)}
    if selection is not None:
        chosen = load_selection(selection, registry)
        check_same_arch(arch, chosen.arch, allow_partial, "selection")
        report = chosen.apply(tower, strict=strict)  # listed layers as selected; norms and the rest frozen
        tower.opentrans_selection = {"sha256": chosen.sha256, "trainable": len(report.trainable)}
    return tower
