"""Model cards (README.md) for published artefacts: YAML front matter the Hub indexes, then what it is.

Front matter: ``library_name: opentrans-hub``, ``license``, tags (``arxiv:2404.07448`` links the paper),
``base_model`` when known and ``base_model_relation`` per the Hub's model-card spec: a packed backbone is a
``finetune`` of its base weights, a mask-only subnetwork an ``adapter`` of them.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..formats.packed import PackedFile

if TYPE_CHECKING:
    from ..formats.artefacts import Artefact

PAPER_TAG = "arxiv:2404.07448"
#: open_clip weights tags -> the model id model cards name as ``base_model``
BASE_MODELS = {("open_clip/RN50", "openai"): "timm/resnet50_clip.openai",
               ("open_clip/RN101", "openai"): "timm/resnet101_clip.openai"}
RELATIONS = {"packed": "finetune", "subnetwork": "adapter"}


def _yaml_list(items: list[str]) -> str:
    return "".join(f"\n- {item}" for item in items)


def base_model(obj: Artefact) -> str | None:
    """The Hub model id of the weights ``obj`` was made from, when its provenance says."""
    base = obj.provenance.get("base_model") or obj.provenance.get("base_weights")
    if isinstance(base, str):
        return base
    if isinstance(base, Mapping):
        return BASE_MODELS.get((obj.arch, base.get("pretrained")))
    return None


def _layer_table(layers: list[dict[str, Any]], sizes: bool = False) -> list[str]:
    head = "| tensor | shape | kept | sparsity |" + (" dense bytes | packed bytes |" if sizes else "")
    rule = "|---|---|---:|---:|" + ("---:|---:|" if sizes else "")
    rows = [f"| `{x['name']}` | {'x'.join(map(str, x['shape']))} | {x['kept']:,} | {x['sparsity']:.2%} |"
            + (f" {x['dense_bytes']:,} | {x['packed_bytes']:,} |" if sizes else "") for x in layers]
    return ["<details><summary>Per-layer sparsity</summary>", "", head, rule, *rows, "", "</details>", ""]


def _body(obj: Artefact, kind: str) -> list[str]:
    if kind == "packed":
        from .packing import packed_stats

        stats = packed_stats(obj.reader)
        kept = sum(x["kept"] for x in stats["layers"])
        numel = sum(x["numel"] for x in stats["layers"])
        return [f"A fine-tuned, pruned CLIP image encoder `{obj.arch}` as a packed sparse checkpoint: each pruned "
                "tensor is stored as its keep-mask bits plus its kept values, every other tensor dense. "
                "opentrans-hub loads it as a backbone with the masks re-applied (pruned weights stay exactly zero "
                "while training) or unpacks it to the dense checkpoint, bit-identical.", "",
                "| masked tensors | weights | kept | sparsity | dense size | packed size | packed / dense |",
                "|---:|---:|---:|---:|---:|---:|---:|",
                f"| {stats['masked_tensors']} | {numel:,} | {kept:,} | {stats['masked_sparsity']:.2%} | "
                f"{stats['dense_bytes']:,} B | {stats['file_bytes']:,} B | {stats['ratio']:.1%} |", "",
                f"Kept values stored as {stats['cast'] or 'their own dtype'}; mask bits `{stats['encoding']}`.", "",
                *_layer_table(stats["layers"], sizes=True)]
    if kind == "subnetwork":
        stats = obj.stats()
        return [f"A pruned subnetwork (boolean keep-masks) of the CLIP image encoder `{obj.arch}`, stored in "
                "opentrans-hub's bit-packed safetensors format, keyed by open_clip's canonical tensor names.", "",
                "| masked tensors | weights | kept | sparsity |", "|---:|---:|---:|---:|",
                f"| {stats['num_layers']} | {stats['total_params']:,} | {stats['kept_params']:,} | "
                f"{stats['sparsity']:.2%} |", "", *_layer_table(stats["layers"])]
    lines = [f"A layer selection for the CLIP image encoder `{obj.arch}`: {len(obj.trainable)} of "
             f"{len(obj.layers)} layers are fine-tuned, the rest stay frozen.", ""]
    if obj.has_lr_scales:
        from ..methods.lr_budget import budget_summary

        lines += ["It carries a learning-rate budget: each layer's rate is the optimizer's times its `lr_scale` "
                  "(`oth.param_groups(model, selection, lr)`).", "", f"`{budget_summary(obj)}`", ""]
    return lines


#: the per-layer plot written next to the card, by artefact kind
CARD_PLOTS = {"selection": "alpha.png"}


def write_card_plot(obj: Artefact, kind: str, folder: str | os.PathLike) -> str | None:
    """Write ``obj``'s per-layer plot into ``folder`` for its card; the file name, None for a kind without one."""
    name = CARD_PLOTS.get(kind)
    if name is None:
        return None
    from ..methods.plots import plot_alpha

    title = f"{obj.arch}: alpha per layer" + (", learning-rate scales" if obj.has_lr_scales else "")
    plot_alpha(obj, Path(folder) / name, title=title)
    return name


def _how_to_load(kind: str, arch: str, repo: str) -> list[str]:
    if kind == "packed":
        return ["```bash", "pip install opentrans-hub",
                f"opentrans-hub pull hf://{repo} --name my-backbone   # verified; prints where the file is",
                "opentrans-hub unpack PATH/backbone.sparse.safetensors --out model_final.pth   # the dense checkpoint",
                "```", "", "```python", "import opentrans_hub as oth",
                f"tower = oth.load_backbone(\"{arch}\", pretrained=\"hf://{repo}\")   # masks exact while training",
                "```", ""]
    return ["```bash", "pip install opentrans-hub",
            f"opentrans-hub pull hf://{repo} --name my-{'subnetwork' if kind == 'subnetwork' else 'selection'}",
            "```", "", "```python", "import opentrans_hub as oth",
            f"obj = oth.load_{'subnetwork' if kind == 'subnetwork' else 'selection'}(\"hf://{repo}\")", "```", ""]


def model_card(obj: Artefact, manifest: Mapping[str, Any], license: str | None = None,
               base: str | None = None, repo_id: str | None = None, plot: str | None = None) -> str:
    """README.md text: front matter, what the artefact is (with ``plot``, an image file beside the card), its
    method and provenance, how to load it."""
    kind = manifest["kind"]
    tags = {"packed": ["pruned", "sparse"], "subnetwork": ["pruning", "pruned"]}.get(kind, ["layer-selection"])
    tags = ["opentrans-hub", *tags, PAPER_TAG, "clip", "open-vocabulary-segmentation"]
    base = base or base_model(obj)
    license = license or obj.provenance.get("license") or "apache-2.0"
    front = ["library_name: opentrans-hub", f"license: {license}", f"tags:{_yaml_list(tags)}"]
    if base:
        front.append(f"base_model: {base}")
        if kind in RELATIONS:
            front.append(f"base_model_relation: {RELATIONS[kind]}")
    elif kind == "packed":
        warnings.warn(f"model card of {manifest.get('name') or manifest['file']}: base model unknown (the mask's "
                      "provenance does not name it); pass base_model= (--base-model) so the Hub links the card",
                      UserWarning, stacklevel=3)
    name = manifest.get("name") or manifest["file"]
    repo = repo_id or "ORG/REPO"
    provenance = {"policy": obj.policy, **obj.provenance} if kind == "selection" else obj.provenance
    method = obj.policy.get("name") if kind == "selection" else obj.provenance.get("method")
    figure = [f"![per-layer plot]({plot})", ""] if plot else []
    lines = ["---", *front, "---", "", f"# {name}", "", *_body(obj, kind), *figure,
             "## Method", "", f"`{method}` (OpenTrans, arXiv:2404.07448)", "", "```json",
             json.dumps(provenance, indent=1, sort_keys=True, default=str), "```", "",
             "## Provenance", "", f"- content sha256: `{manifest['sha256']}`",
             f"- file `{manifest['file']}` sha256: `{manifest['file_sha256']}`"]
    if isinstance(obj, PackedFile) and obj.reader.mask_names:
        lines.append(f"- subnetwork (masks) sha256: `{obj.subnetwork.sha256}`")
    if base:
        lines.append(f"- base model: [{base}](https://huggingface.co/{base})")
    lines += [f"- created with {manifest.get('library', 'opentrans-hub')}", "", "## How to load", "",
              *_how_to_load(kind, obj.arch, repo)]
    return "\n".join(lines)
