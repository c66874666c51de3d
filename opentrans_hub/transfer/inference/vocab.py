"""Vocabulary tables for name-map inference: how the CLIP-tower ecosystems spell the same parts.

A tensor name becomes a set of normalised tokens (``res3.0.conv2.norm.weight`` -> {conv, #2, NORM, weight...}),
so names from open_clip, OpenAI clip, timm (byobnet/vit/convnext), detectron2, mmseg/MaskCLIP and Hugging Face
transformers compare by overlap. The tables are evidence, not rules: a vocabulary they do not list still maps
by shapes, block structure and values (see :mod:`opentrans_hub.transfer.inference`).
"""

from __future__ import annotations

import re
from functools import lru_cache

#: whole path segments that mean one thing (checked before a segment is split into words)
SEGMENT_SYNONYMS = {
    # MLP input / output projections
    "c_fc": "FCIN", "fc1": "FCIN", "lin1": "FCIN", "w1": "FCIN", "dense_h_to_4h": "FCIN", "intermediate": "FCIN",
    "fc2": "FCOUT", "lin2": "FCOUT", "w2": "FCOUT", "dense_4h_to_h": "FCOUT",
    # attention
    "in_proj": "QKV", "qkv": "QKV", "in_proj_weight": "QKV weight", "in_proj_bias": "QKV bias",
    "out_proj": "OUT", "o_proj": "OUT", "out": "OUT",
    "q_proj": "Q", "k_proj": "K", "v_proj": "V", "query": "Q", "key": "K", "value": "V",
    "q_proj_weight": "Q weight", "k_proj_weight": "K weight", "v_proj_weight": "V weight",
    "self_attn": "ATTN", "self_attention": "ATTN", "attention": "ATTN", "attn": "ATTN",
    "attnpool": "ATTN POOL", "attention_pool": "ATTN POOL",
    # norms (HF writes "pre_layrnorm")
    "layer_norm": "NORM", "layernorm": "NORM", "layrnorm": "NORM", "batchnorm": "NORM",
    # embeddings
    "patch_embedding": "PATCH EMBED", "patch_embed": "PATCH EMBED", "cls_token": "CLS EMBED",
    "class_embedding": "CLS EMBED", "positional_embedding": "POS EMBED", "position_embedding": "POS EMBED",
    "pos_embed": "POS EMBED", "pos_embedding": "POS EMBED",
    # residual branches
    "downsample": "SHORTCUT", "shortcut": "SHORTCUT", "skip": "SHORTCUT",
}

#: single words after splitting a segment at ``_`` and digits
WORD_SYNONYMS = {
    "bn": "NORM", "ln": "NORM", "norm": "NORM", "gn": "NORM", "layernorm": "NORM", "layrnorm": "NORM",
    "conv": "CONV", "cv": "CONV", "mlp": "MLP", "ffn": "MLP", "ff": "MLP", "feedforward": "MLP",
    "attn": "ATTN", "attention": "ATTN", "q": "Q", "k": "K", "v": "V", "proj": "PROJ", "projection": "PROJ",
    "pos": "POS", "position": "POS", "positional": "POS", "cls": "CLS", "class": "CLS", "embed": "EMBED",
    "embedding": "EMBED", "embeddings": "EMBED", "pre": "PRE", "post": "POST", "final": "POST",
}

#: words that carry no meaning for matching (kernel-size tags, wrappers)
NOISE = {"1x1", "3x3", "kxk", "x", "model", "module", "layer", "layers", "blocks", "block", "trunk"}

#: leaf names -> role; anything else is a bare parameter ("param")
LEAF_ROLES = {
    "weight": "weight", "bias": "bias", "running_mean": "running_mean", "running_var": "running_var",
    "num_batches_tracked": "num_batches_tracked", "gamma": "weight", "beta": "bias",
    "in_proj_weight": "weight", "in_proj_bias": "bias", "q_proj_weight": "weight", "k_proj_weight": "weight",
    "v_proj_weight": "weight",
}

#: words that mark the three parts of a split attention projection, in q, k, v order
QKV_WORDS = (("q", "query", "q_proj", "q_proj_weight"), ("k", "key", "k_proj", "k_proj_weight"),
             ("v", "value", "v_proj", "v_proj_weight"))

_WORDS = re.compile(r"[A-Za-z]+|\d+")


def leaf_role(name: str) -> str:
    return LEAF_ROLES.get(name.rsplit(".", 1)[-1], "param")


@lru_cache(maxsize=65536)
def name_tokens(name: str) -> frozenset[str]:
    """Normalised tokens of a (relative) tensor name; numbers become ``#N``."""
    out: set[str] = set()
    segments = name.split(".")
    previous = ""
    for index, segment in enumerate(segments):
        lowered = segment.lower()
        if lowered.isdigit():
            out.add(f"#{int(lowered)}")
            continue
        if lowered == "c_proj":  # OpenAI/open_clip: the MLP's output, or attention pooling's output
            out.add("FCOUT" if previous in {"mlp", "ffn"} else "OUT")
            previous = lowered
            continue
        if lowered in SEGMENT_SYNONYMS:
            out.update(SEGMENT_SYNONYMS[lowered].split())
            previous = lowered
            continue
        for word in _WORDS.findall(lowered.replace("1x1", "").replace("3x3", "").replace("kxk", "")):
            if word.isdigit():
                out.add(f"#{int(word)}")
            elif word not in NOISE or (word == "layer" and index == len(segments) - 1):
                out.add(WORD_SYNONYMS.get(word, word))
        previous = lowered
    out.discard("")
    return frozenset(out)


def qkv_part(segment: str) -> int | None:
    """0/1/2 when a path segment names the q/k/v part of a split projection, else None."""
    lowered = segment.lower()
    for part, words in enumerate(QKV_WORDS):
        if lowered in words:
            return part
    return None


def dice(a: frozenset[str], b: frozenset[str]) -> float:
    if not a or not b:
        return 0.0
    return 2 * len(a & b) / (len(a) + len(b))
