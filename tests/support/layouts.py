"""Framework-like model layouts for the plugin and name-map tests.

``Box``/``place`` build attribute paths as frameworks name them; the modules and layout builders below copy
how CAT-Seg, SAN, detectron2 and HAN et al. hold the CLIP tower; ``resolved`` says where a name map sends each
canonical tensor of such a layout."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from opentrans_hub import NameMap
from opentrans_hub.transfer.inference import canonical_state


class Box(nn.Module):
    """An empty container, so attribute paths read like a framework's (``backbone.clip_model``)."""


def place(root: nn.Module, path: str, module: nn.Module) -> nn.Module:
    """Set ``module`` at the dotted ``path`` under ``root``, creating Boxes on the way; returns ``root``."""
    node = root
    parts = path.split(".")
    for part in parts[:-1]:
        if not hasattr(node, part):
            setattr(node, part, Box())
        node = getattr(node, part)
    setattr(node, parts[-1], module)
    return root


# ----------------------------------------------------------------------------- framework modules
class SplitAttention(nn.Module):
    """CAT-Seg's attention layout: separate q/k/v projection weights, one fused bias."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        q, k, v = mha.in_proj_weight.detach().chunk(3)  # torch's packed order: rows of q, then k, then v
        self.q_proj_weight = nn.Parameter(q.clone())
        self.k_proj_weight = nn.Parameter(k.clone())
        self.v_proj_weight = nn.Parameter(v.clone())
        self.in_proj_bias = nn.Parameter(mha.in_proj_bias.detach().clone())
        self.out_proj = copy.deepcopy(mha.out_proj)
        self.num_heads, self.embed_dim, self.batch_first = mha.num_heads, mha.embed_dim, mha.batch_first

    def forward(self, query, key, value, need_weights=False, attn_mask=None):
        if self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        out, _ = F.multi_head_attention_forward(
            query, key, value, self.embed_dim, self.num_heads, None, self.in_proj_bias, None, None, False, 0.0,
            self.out_proj.weight, self.out_proj.bias, training=False, need_weights=False, attn_mask=attn_mask,
            use_separate_proj_weight=True, q_proj_weight=self.q_proj_weight, k_proj_weight=self.k_proj_weight,
            v_proj_weight=self.v_proj_weight)
        return (out.transpose(0, 1) if self.batch_first else out), None


class FeatureExtractor(nn.Module):
    """SAN's first half: shares the tower's modules, blocks ``[:9]`` re-indexed from 0 (a ModuleList slice)."""

    def __init__(self, visual: nn.Module, last_layer_idx: int):
        super().__init__()
        self.conv1 = visual.conv1
        self.class_embedding = visual.class_embedding
        self.positional_embedding = visual.positional_embedding
        self.ln_pre = visual.ln_pre
        self.resblocks = visual.transformer.resblocks[:last_layer_idx]


class RecWithAttnbiasHead(nn.Module):
    """SAN's second half: blocks ``[9:]`` re-indexed from 0, then ``ln_post`` and ``proj``."""

    def __init__(self, visual: nn.Module, first_layer_idx: int):
        super().__init__()
        self.resblocks = visual.transformer.resblocks[first_layer_idx:]
        self.ln_post = visual.ln_post
        self.proj = visual.proj
        self.sos_token = nn.Parameter(torch.ones(1, 1, visual.proj.shape[0]))  # SAN's own parameter


# ----------------------------------------------------------------------------- layouts
def d2_layout(visual: nn.Module) -> nn.Module:
    """detectron2's DeepLab ResNet naming, holding copies of the tower's own modules (norms nested as ``.norm``)."""
    model, backbone, stem = Box(), Box(), Box()
    model.backbone, backbone.stem = backbone, stem
    for k in (1, 2, 3):
        conv = copy.deepcopy(getattr(visual, f"conv{k}"))
        conv.norm = copy.deepcopy(getattr(visual, f"bn{k}"))
        setattr(stem, f"conv{k}", conv)
    for stage in (1, 2, 3, 4):
        blocks = nn.Sequential()
        for block in getattr(visual, f"layer{stage}"):
            d2_block = Box()
            for k in (1, 2, 3):
                conv = copy.deepcopy(getattr(block, f"conv{k}"))
                conv.norm = copy.deepcopy(getattr(block, f"bn{k}"))
                setattr(d2_block, f"conv{k}", conv)
            if block.downsample is not None:
                shortcut = copy.deepcopy(getattr(block.downsample, "0"))
                shortcut.norm = copy.deepcopy(getattr(block.downsample, "1"))
                d2_block.shortcut = shortcut
            blocks.append(d2_block)
        setattr(backbone, f"res{stage + 1}", blocks)
    model.sem_seg_head = nn.Conv2d(8, 4, 1)
    return model


def han_layout(visual: nn.Module, res_atten: bool, kd: nn.Module | None = None) -> nn.Module:
    model = Box()
    model.backbone = copy.deepcopy(visual)
    if not res_atten:
        del model.backbone.attnpool
    model.vision_clip = copy.deepcopy(kd if kd is not None else visual).requires_grad_(False)
    model.sem_seg_head = nn.Conv2d(8, 4, 1)
    return model


# ----------------------------------------------------------------------------- name maps
def resolved(name_map: NameMap, arch: str, target: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """canonical name -> destinations, as the map resolves against the target's real names and shapes."""
    shapes = {k: tuple(v.shape) for k, v in target.items()}
    _, report = name_map.resolve(canonical_state(arch), shapes)
    assert not report.mismatched
    out: dict[str, list[str]] = {}
    for source, dest in report.mapped:
        out.setdefault(source, []).append(dest)
    return out
