"""An apply that would do the wrong thing quietly is refused: a subnetwork of another architecture.

Towers are built on the meta device (names and shapes only): every refusal happens before any weight changes.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from opentrans_hub import OpenTransError, Subnetwork, apply_subnetwork, get_plugin, masked_parameters
from opentrans_hub.towers.backbones import canonical_tower


def rn50_subnetwork() -> Subnetwork:
    masks = {name: torch.ones(p.shape, dtype=torch.bool) for name, p in canonical_tower("open_clip/RN50")
             .named_parameters() if p.dim() == 4}
    return Subnetwork(masks, arch="open_clip/RN50")


def fcclip_layout(arch: str) -> nn.Module:
    """FC-CLIP's nesting of the open_clip tower: ``backbone.clip_model.visual``."""
    clip_model, backbone, model = nn.Module(), nn.Module(), nn.Module()
    clip_model.visual = copy.deepcopy(canonical_tower(arch))
    backbone.clip_model = clip_model
    model.backbone = backbone
    return model


@pytest.mark.parametrize("plugin", ["fcclip", "auto"])
def test_an_rn50_subnetwork_on_an_rn101_tower_is_refused_even_when_told_the_arch(plugin):
    sub, model = rn50_subnetwork(), fcclip_layout("open_clip/RN101")
    with pytest.raises(OpenTransError, match=r"for open_clip/RN50, the target is open_clip/RN101.*allow.partial"):
        get_plugin(plugin).apply(model, sub, arch="open_clip/RN101")
    assert masked_parameters(model) == {}


def test_the_generic_apply_compares_the_arch_it_is_given():
    sub = rn50_subnetwork()
    tower = copy.deepcopy(canonical_tower("open_clip/RN101"))
    with pytest.raises(OpenTransError, match="another architecture|for open_clip/RN50"):
        apply_subnetwork(tower, sub)  # coverage: RN101's extra layer3 blocks have no counterpart
    plugin = get_plugin("fcclip")
    with pytest.raises(OpenTransError, match="for open_clip/RN50, the target is open_clip/RN101"):
        plugin.apply(fcclip_layout("open_clip/RN101"), sub, arch="open_clip/RN101", allow_partial=False)
