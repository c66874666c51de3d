"""Small but real open_clip towers, so tests run in seconds on 2 CPU cores.

``make_tiny_resnet``: open_clip's ModifiedResNet (RN50 names) at reduced width and depth. ``tower``: towers with the
real block structure (RN50: 3-4-6-3; ViT-B/16: 12 blocks) at reduced width, for the name-map inference tests. Those
architectures are registered with open_clip as ordinary model configs (``RN50-oth-tiny``,
``ViT-B-16-oth-tiny``, ``convnext-oth-tiny``: timm's ConvNeXt-atto trunk), so ``open_clip/RN50-oth-tiny`` builds
through the same code as ``open_clip/RN50``: the towers are open_clip's own ModifiedResNet, VisionTransformer and
TimmModel classes, at reduced width.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from torch import nn


def make_tiny_resnet(seed: int = 0, width: int = 16, image_size: int = 64) -> nn.Module:
    """open_clip's ModifiedResNet (the RN50 tower class, same parameter names) at reduced width/depth."""
    from open_clip.modified_resnet import ModifiedResNet

    torch.manual_seed(seed)
    return ModifiedResNet(layers=(1, 1, 1, 1), output_dim=32, heads=2, image_size=image_size, width=width)


RN_TINY = "open_clip/RN50-oth-tiny"
VIT_TINY = "open_clip/ViT-B-16-oth-tiny"
CONVNEXT_TINY = "open_clip/convnext-oth-tiny"
_TEXT = {"context_length": 77, "vocab_size": 64, "width": 64, "heads": 2, "layers": 1}
CONFIGS = {
    "RN50-oth-tiny": {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": [3, 4, 6, 3], "width": 16,
                                                      "patch_size": None}, "text_cfg": _TEXT},
    "ViT-B-16-oth-tiny": {"embed_dim": 48, "vision_cfg": {"image_size": 32, "layers": 12, "width": 64,
                                                          "patch_size": 16, "head_width": 32, "mlp_ratio": 2.0},
                          "text_cfg": _TEXT},
    "convnext-oth-tiny": {"embed_dim": 32, "vision_cfg": {"timm_model_name": "convnext_atto", "timm_pool": "",
                                                          "timm_model_pretrained": False, "timm_proj": "linear",
                                                          "image_size": 64}, "text_cfg": _TEXT},
    "ViT-B-16-oth-square": {"embed_dim": 64, "vision_cfg": {"image_size": 32, "layers": 12, "width": 64,
                                                            "patch_size": 16, "head_width": 32, "mlp_ratio": 2.0},
                            "text_cfg": _TEXT},
}


def register() -> Path:
    """Write the configs to a folder and register it with open_clip (idempotent); returns the folder."""
    import open_clip

    folder = Path(tempfile.gettempdir()) / "oth-tiny-configs"
    folder.mkdir(exist_ok=True)
    for name, config in CONFIGS.items():
        (folder / f"{name}.json").write_text(json.dumps(config))
    if not set(CONFIGS) <= set(open_clip.list_models()):
        open_clip.add_model_config(folder)
    return folder


def nonzero_init(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and buffers without exact zeros or constants (every tensor is distinguishable by values)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if t.is_floating_point():
                t.copy_((torch.rand(t.shape, generator=gen) + 0.5) * torch.where(
                    torch.rand(t.shape, generator=gen) < 0.5, -1.0, 1.0))
                if name.endswith("running_var"):
                    t.abs_()
    return module


def tower(arch: str, seed: int = 0) -> nn.Module:
    from opentrans_hub.towers.backbones import build_visual

    register()
    torch.manual_seed(seed)
    return nonzero_init(build_visual(arch), seed=seed)




def finetuned(model: nn.Module, seed: int = 5, scale: float = 0.05) -> nn.Module:
    """A copy whose weights moved a little from the start, as after fine-tuning."""
    import copy

    model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=gen))
    return model


def use_tiny_family(monkeypatch, family: str = "tinytest", seed: int = 99) -> str:
    """Make ``build_visual("<family>/resnet")`` build ``make_tiny_resnet(seed)`` (random init; weights come from
    files) for one test; returns the arch id."""
    from opentrans_hub.towers.backbones import BUILDERS

    monkeypatch.setitem(BUILDERS, family, lambda name, pretrained: make_tiny_resnet(seed=seed))
    return f"{family}/resnet"
