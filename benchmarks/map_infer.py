"""Name-map inference on a ~1,000-tensor FC-CLIP-like checkpoint, with and without the base tower's weights.

The checkpoint holds a whole open_clip RN50 (visual tower at ``backbone.clip_model.visual.``, text tower beside it)
and Mask2Former-style distractors: a pixel decoder (transformer encoder layers) and two query decoders
(transformer decoder layers with their own attention blocks), query embeddings and class heads. Inference runs on
the in-memory state dict (file reading excluded); the canonical tower's names are built once before timing.
Beside it, in the same process: a longest-name-suffix matcher with equal shapes (the idea behind detectron2's
``align_and_update_state_dicts``, written here), on the same layout and on the same tower under detectron2's
names, to show what renames cost a suffix matcher. Prints one JSON object on its last line.

    python benchmarks/map_infer.py [--repeats 5] [--threads 1] [--quick] [--json FILE]
"""

from __future__ import annotations

import _bench
import torch
from torch import nn


def build_checkpoint() -> tuple[dict[str, torch.Tensor], nn.Module]:
    import logging

    import open_clip

    logging.disable(logging.WARNING)
    torch.manual_seed(0)
    clip = open_clip.create_model("RN50", pretrained=None)
    logging.disable(logging.NOTSET)
    model = nn.Module()
    model.backbone = nn.Module()
    model.backbone.clip_model = clip
    head = nn.Module()
    head.pixel_decoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(256, 8, 1024, batch_first=True), 14,
                                               enable_nested_tensor=False)
    head.predictor = nn.TransformerDecoder(nn.TransformerDecoderLayer(256, 8, 2048, batch_first=True), 9)
    head.aux_predictor = nn.TransformerDecoder(nn.TransformerDecoderLayer(256, 8, 2048, batch_first=True), 9)
    head.query_feat = nn.Embedding(100, 256)
    head.query_embed = nn.Embedding(100, 256)
    head.class_embed = nn.Linear(256, 1024)
    head.mask_embed = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                                    nn.Linear(256, 256))
    head.input_proj = nn.ModuleList([nn.Conv2d(c, 256, 1) for c in (512, 1024, 2048)])
    model.sem_seg_head = head
    return {k: v.detach() for k, v in model.state_dict().items()}, clip.visual


def d2_names(visual: nn.Module) -> dict[str, torch.Tensor]:
    """The tower's tensors under detectron2 ResNet names (stem.convK(.norm), resN, shortcut(.norm))."""
    import re

    out = {}
    for name, tensor in visual.state_dict().items():
        if name.startswith("attnpool."):
            continue
        new = re.sub(r"^(conv\d)\.", r"stem.\1.", name)
        new = re.sub(r"^bn(\d)\.", r"stem.conv\1.norm.", new)
        new = re.sub(r"^layer(\d)\.", lambda m: f"res{int(m.group(1)) + 1}.", new)
        new = re.sub(r"\.bn(\d)\.", r".conv\1.norm.", new)
        new = new.replace(".downsample.0.", ".shortcut.").replace(".downsample.1.", ".shortcut.norm.")
        out[f"backbone.{new}"] = tensor
    return out


def suffix_match(canonical: dict[str, tuple[int, ...]], target: dict[str, torch.Tensor]) -> dict[str, str]:
    """Each canonical name -> the target name sharing its longest dotted suffix, with the same shape."""
    by_leaf: dict[str, list[str]] = {}
    for name in target:
        by_leaf.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    out = {}
    for name, shape in canonical.items():
        tokens = name.split(".")
        best, best_len = None, 0
        for candidate in by_leaf.get(tokens[-1], []):
            if tuple(target[candidate].shape) != shape:
                continue
            ctoks = candidate.split(".")
            common = 0
            while common < min(len(tokens), len(ctoks)) and tokens[-1 - common] == ctoks[-1 - common]:
                common += 1
            if common > best_len:
                best, best_len = candidate, common
        if best is not None:
            out[name] = best
    return out


def main() -> None:
    args = _bench.parse(_bench.options(__doc__, repeats=5, quick="one repeat", threads=1), repeats=1)
    _bench.set_threads(args.threads)
    from opentrans_hub.transfer.inference import canonical_state, infer_name_map

    arch = "open_clip/RN50"
    state, visual = build_checkpoint()
    weights = visual.state_dict()
    canonical_s, canonical = _bench.timed(canonical_state, arch)
    times = _bench.Timings("plain", "with_weights", "peer")
    for _ in range(args.repeats):  # interleaved, so load changes hit every peer alike
        with times.time("plain"):
            name_map, report = infer_name_map(state, arch)
        with times.time("with_weights"):
            _, report_w = infer_name_map(state, arch, weights=weights)
        with times.time("peer"):
            suffix = suffix_match({k: tuple(v.shape) for k, v in canonical.items()}, state)
    truth = {k: f"backbone.clip_model.visual.{k}" for k in canonical}
    ours_correct = sum(report.mapping.get(k) == [v] for k, v in truth.items())
    suffix_correct = sum(suffix.get(k) == v for k, v in truth.items())
    renamed = d2_names(visual)
    renamed_truth = {k: n for k, n in zip((k for k in canonical if not k.startswith("attnpool.")), renamed)}
    _, renamed_report = infer_name_map(renamed, arch)
    suffix_renamed = suffix_match({k: tuple(v.shape) for k, v in canonical.items()}, renamed)
    result = {
        "tensors": len(state), "tower_tensors": len(canonical), "rules": len(name_map.rules),
        "infer_s": times.median("plain"), "infer_with_weights_s": times.median("with_weights"),
        "canonical_names_s": canonical_s, "suffix_peer_s": times.median("peer"),
        "ours_correct": ours_correct, "ours_wrong": len(report.tensors) - ours_correct,
        "suffix_peer_correct": suffix_correct, "suffix_peer_wrong": sum(1 for k in suffix if suffix[k] != truth[k]),
        "d2_names": {"tensors": len(renamed),
                     "ours_correct": sum(renamed_report.mapping.get(k) == [v] for k, v in renamed_truth.items()),
                     "ours_wrong": sum(1 for k, v in renamed_report.mapping.items() if renamed_truth.get(k) != v[0]),
                     "suffix_peer_correct": sum(suffix_renamed.get(k) == v for k, v in renamed_truth.items()),
                     "suffix_peer_wrong": sum(1 for k, v in suffix_renamed.items() if renamed_truth.get(k) != v)},
        "with_weights_evidence": sum(1 for t in report_w.tensors.values() if t.evidence[0].startswith("values")),
        "repeats": args.repeats, "threads": args.threads,
    }
    _bench.emit(result, args)


if __name__ == "__main__":
    main()
