"""Shared fixtures: small but real open_clip towers, so tests run in seconds on 2 CPU cores."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(1)


def make_tiny_resnet(seed: int = 0, width: int = 16, image_size: int = 64) -> torch.nn.Module:
    """open_clip's ModifiedResNet (the RN50 tower class, same parameter names) at reduced width/depth."""
    from open_clip.modified_resnet import ModifiedResNet

    torch.manual_seed(seed)
    return ModifiedResNet(layers=(1, 1, 1, 1), output_dim=32, heads=2, image_size=image_size, width=width)


@pytest.fixture
def tiny_resnet() -> torch.nn.Module:
    return make_tiny_resnet()


@pytest.fixture
def rn50_visual() -> torch.nn.Module:
    """The full open_clip RN50 visual tower, random init (no downloads here)."""
    from opentrans_hub.backbones import build_visual

    torch.manual_seed(0)
    return build_visual("open_clip/RN50")
