"""Layouts of the open_clip ConvNeXt frameworks (MAFT+, Mask-Adapter, SED) for the plugin tests.

Each holds a whole open_clip CLIP model (a real ConvNeXt image tower from timm plus the text tower) where the
framework holds it, and the framework's other modules under their names at small widths: enough of each that a
transfer landing on the wrong module would show, and that the ``auto`` plugin meets the look-alikes (the adapters'
ConvNeXt-style blocks, a teacher copy) it has to tell apart from the tower.
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

import torch
from torch import nn

from support.layouts import Box, place
from support.towers import CONFIGS, nonzero_init, register

#: the tiny ConvNeXt tower (timm's ConvNeXt-atto trunk) with an MLP projection head, as convnext_large_d_320 has
CONVNEXT_MLP_TINY = "open_clip/convnext-oth-tiny-mlp"


def register_mlp() -> None:
    """Register ``convnext-oth-tiny-mlp`` with open_clip (idempotent)."""
    import open_clip

    register()
    if "convnext-oth-tiny-mlp" in open_clip.list_models():
        return
    folder = Path(tempfile.gettempdir()) / "oth-tiny-mlp-configs"
    folder.mkdir(exist_ok=True)
    config = copy.deepcopy(CONFIGS["convnext-oth-tiny"])
    config["vision_cfg"]["timm_proj"] = "mlp"
    (folder / "convnext-oth-tiny-mlp.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)


def clip_model(arch: str = "open_clip/convnext-oth-tiny", seed: int = 0) -> nn.Module:
    """A whole open_clip CLIP model (image and text towers), random values without exact zeros."""
    import logging

    import open_clip

    register_mlp()
    torch.manual_seed(seed)
    logging.disable(logging.WARNING)  # "no pretrained weights loaded": random init on purpose
    try:
        model = open_clip.create_model(arch.split("/", 1)[1])
    finally:
        logging.disable(logging.NOTSET)
    return nonzero_init(model, seed=seed)


class ConvNextStyleBlock(nn.Module):
    """The ConvNeXt block decoders write themselves (depthwise conv, norm, two Linear layers, layer scale), with
    their own names (``dwconv``, ``pwconv1``), not timm's."""

    def __init__(self, dim: int, kernel: int = 7):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.ones(dim))


class ChannelNorm(nn.Module):
    """A LayerNorm over channels of an NCHW map (weight and bias only)."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))


def _tower_width(clip: nn.Module) -> int:
    return clip.visual.trunk.num_features


def fcclip_head(model: nn.Module, clip: nn.Module) -> nn.Module:
    """FC-CLIP's ``sem_seg_head`` (pixel decoder and mask-classification predictor), a few modules of each."""
    width = _tower_width(clip)
    place(model, "sem_seg_head.pixel_decoder.input_proj.0.0", nn.Conv2d(width, 16, 1))
    place(model, "sem_seg_head.pixel_decoder.mask_features", nn.Conv2d(16, 16, 1))
    place(model, "sem_seg_head.predictor.query_feat", nn.Embedding(4, 16))
    place(model, "sem_seg_head.predictor.class_embed.layers.0", nn.Linear(16, 16))
    place(model, "sem_seg_head.predictor.mask_embed.layers.0", nn.Linear(16, 16))
    return model


def content_dependent_transfer(model: nn.Module, clip: nn.Module) -> nn.Module:
    """MAFT+'s ``cdt``: cross-attention from text to image features at the embedding width."""
    dim = clip.text_projection.shape[1]
    place(model, "cdt.cross_attn", nn.MultiheadAttention(dim, 2))
    place(model, "cdt.norm", nn.LayerNorm(dim))
    place(model, "cdt.mlp.0", nn.Linear(dim, 2 * dim))
    return model


def maftplus_layout(student: nn.Module, teacher: nn.Module | None = None) -> nn.Module:
    """MAFT+: the trained CLIP at ``backbone.clip_model``, a frozen teacher at ``backbone_t.clip_model``."""
    model = place(Box(), "backbone.clip_model", copy.deepcopy(student))
    place(model, "backbone_t.clip_model", copy.deepcopy(teacher if teacher is not None else student))
    model.backbone_t.requires_grad_(False)
    fcclip_head(model, student)
    content_dependent_transfer(model, student)
    model.void_embedding = nn.Embedding(1, student.text_projection.shape[1])
    return model


def mask_adapter_head(clip: nn.Module, channels: int = 160, maps: int = 16, mask_channels: int = 16) -> nn.Module:
    """Mask-Adapter's ``mask_adapter``: fuse, three ConvNeXt-style blocks, norm, final conv, mask down-scaler.
    ``channels`` equals a stage width of the tiny tower, as 768 does for ConvNeXt-L."""
    width = _tower_width(clip)
    head = Box()
    head.fuse = nn.Conv2d(width, channels, 1)
    for k in (1, 2, 3):
        setattr(head, f"cnext{k}", ConvNextStyleBlock(channels))
    head.norm = nn.LayerNorm(channels)
    head.final = nn.Conv2d(channels, maps, 1)
    head.mask_downscaling = nn.Sequential(
        nn.Conv2d(1, mask_channels // 4, 3, stride=2, padding=1), ChannelNorm(mask_channels // 4), nn.GELU(),
        nn.Conv2d(mask_channels // 4, mask_channels, 3, stride=2, padding=1), ChannelNorm(mask_channels), nn.GELU(),
        nn.Conv2d(mask_channels, width, 1))
    return head


def maskadapter_layout(clip: nn.Module, variant: str) -> nn.Module:
    """Mask-Adapter's three models: ``mask_adapter`` (its own, ground-truth warm-up), ``fcclip`` and ``maftp``
    (mixed-mask training on FC-CLIP / MAFT+, where MAFT+'s teacher is not built)."""
    model = place(Box(), "backbone.clip_model", copy.deepcopy(clip))
    model.mask_adapter = mask_adapter_head(clip)
    model.void_embedding = nn.Embedding(1, clip.text_projection.shape[1])
    if variant in ("fcclip", "maftp"):
        fcclip_head(model, clip)
    if variant == "maftp":
        content_dependent_transfer(model, clip)
    elif variant not in ("mask_adapter", "fcclip"):
        raise ValueError(variant)
    return model


def _sed_up(channels: int, out: int, guidance: int, kernel: int) -> nn.Module:
    up = Box()
    up.up = nn.ConvTranspose2d(channels, channels - guidance, 2, stride=2)
    up.conv = Box()
    up.conv.double_conv = nn.Sequential(nn.Conv2d(channels + guidance, out, 3, padding=1, bias=False),
                                        nn.GroupNorm(1, out), nn.ReLU(), nn.Conv2d(out, out, 3, padding=1, bias=False),
                                        nn.GroupNorm(1, out), nn.ReLU())
    up.cnext = ConvNextStyleBlock(channels, kernel)
    return up


def sed_layout(clip: nn.Module, hidden: int = 16, prompts: int = 4) -> nn.Module:
    """SED: the CLIP model at ``sem_seg_head.predictor.clip_model`` beside its aggregator (``.transformer``:
    correlation embedding, guidance projections, three up-sampling decoders with ConvNeXt-style blocks, heads)."""
    model = place(Box(), "sem_seg_head.predictor.clip_model", copy.deepcopy(clip))
    agg = Box()
    agg.conv1 = nn.Conv2d(prompts, hidden, 7, padding=3)
    widths = [clip.visual.trunk.stages[i].blocks[0].conv_dw.in_channels for i in (2, 1, 0)]
    dims, proj = [hidden, 8, 8, 8], [4, 4, 4]
    agg.decoder_guidance_projection = nn.ModuleList(
        nn.Sequential(nn.Conv2d(w, p, 3, padding=1), nn.ReLU()) for w, p in zip(widths, proj))
    for k in (1, 2, 3):
        setattr(agg, f"decoder{k}", _sed_up(dims[k - 1], dims[k], proj[k - 1], 9))
    for k, dim in enumerate(dims[:3]):
        setattr(agg, f"head{k}", nn.Conv2d(dim, 1, 3, padding=1))
    agg.head = nn.Conv2d(dims[3], 1, 3, padding=1)
    place(model, "sem_seg_head.predictor.transformer", agg)
    return model
