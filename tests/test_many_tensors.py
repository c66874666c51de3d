"""Checkpoints of many tensors: the fast paths give what the definitions say (blocks, hashes), map still finds the
tower among thousands of blocks, and bulk work leaves Python's garbage collector as it found it."""

from __future__ import annotations

import gc
import hashlib
import random
import struct

import pytest
import torch

from opentrans_hub import OpenTransError
from opentrans_hub.io import packed_spec as sf
from opentrans_hub.io.checkpoints import read_checkpoint
from opentrans_hub.towers.backbones import build_visual
from opentrans_hub.transfer.inference import infer_name_map
from opentrans_hub.transfer.inference.match import find_blocks
from opentrans_hub.zoo.packing import load_sparse, pack_checkpoint, unpack


def blocks_by_definition(names: list[str]) -> set[str]:
    """Numbered nodes holding two or more modules and no such numbered node below them, compared all pairs."""
    modules: dict[str, set[str]] = {}
    for name in names:
        tokens = name.split(".")
        for i, token in enumerate(tokens[:-1]):
            if token.isdigit() and i > 0:
                modules.setdefault(".".join(tokens[:i + 1]), set()).add(".".join(tokens[:-1]))
    deep = [node for node, found in modules.items() if len(found) >= 2]
    return {node for node in deep if not any(o != node and o.startswith(node + ".") for o in deep)}


def test_find_blocks_gives_the_blocks_the_definition_gives():
    rng = random.Random(0)
    tower = list(build_visual("open_clip/RN50").state_dict())
    for trial in range(30):
        names = [f"backbone.clip_model.visual.{n}" for n in tower]
        for i in range(rng.randint(0, 300)):  # decoders, mmcv-style wrappers, nested numbered stages
            kind = rng.choice(["blocks.{i}.norm.weight", "blocks.{i}.proj.weight", "ffn.layers.{i}.0.weight",
                               "stages.{j}.{i}.conv.weight", "stages.{j}.{i}.bn.bias", "heads.{i}.weight"])
            names.append("sem_seg_head." + kind.format(i=i, j=rng.randint(0, 3)))
        rng.shuffle(names)
        owner, runs = find_blocks(names)
        expected = blocks_by_definition(names)
        assert {b for blocks in runs.values() for b in blocks} == expected, trial
        assert set(owner.values()) <= expected


def test_map_finds_the_tower_among_thousands_of_small_blocks():
    gen = torch.Generator().manual_seed(0)
    state = {f"backbone.clip_model.visual.{k}": v for k, v in build_visual("open_clip/RN50").state_dict().items()}
    for i in range(5000):  # 20,000 head tensors in numbered blocks, none shaped like the tower's
        state.update({f"sem_seg_head.blocks.{i}.norm.weight": torch.ones(12),
                      f"sem_seg_head.blocks.{i}.norm.bias": torch.zeros(12),
                      f"sem_seg_head.blocks.{i}.proj.weight": torch.randn(12, 12, generator=gen),
                      f"sem_seg_head.blocks.{i}.proj.bias": torch.zeros(12)})
    _, report = infer_name_map(state, "open_clip/RN50")
    assert report.tower == "backbone.clip_model.visual."
    assert len(report.tensors) == len(build_visual("open_clip/RN50").state_dict()) and not report.unmapped


def hash_by_definition(key: str, tensor: torch.Tensor) -> bytes:
    """The format's per-tensor hash as docs/formats.md defines it, written out independently."""
    encoded = key.encode("utf-8")
    flat = tensor.detach().contiguous().reshape(-1)
    raw = flat.view(torch.uint8) if flat.dtype == torch.bool else flat.view(
        {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()])
    data = raw.numpy().tobytes() if tensor.numel() else b""
    return hashlib.sha256(struct.pack("<Q", len(encoded)) + encoded + sf.dtype_name(tensor.dtype, key).encode()
                          + b"\0" + struct.pack("<Q", tensor.dim()) + struct.pack(f"<{tensor.dim()}Q", *tensor.shape)
                          + data).digest()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64,
                                   torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool, torch.uint16,
                                   torch.uint32, torch.uint64, torch.float8_e4m3fn, torch.float8_e5m2])
def test_tensor_hash_is_the_formats_hash_for_every_dtype_and_layout(dtype):
    gen = torch.Generator().manual_seed(1)
    base = (torch.randn(6, 5, generator=gen) * 7).to(dtype)
    cases = {"plain": base, "transposed": base.t(), "sliced": base[1:4, ::2], "scalar": base[2, 3],
             "empty": base[:0], "nested.name": base.reshape(3, 2, 5)}
    if dtype.is_floating_point:
        cases["parameter"] = torch.nn.Parameter(base.clone())
    for key, tensor in cases.items():
        assert sf.tensor_hash(key, tensor) == hash_by_definition(key, tensor), key


def test_bulk_work_leaves_the_garbage_collector_as_it_was(tmp_path):
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(32, 32, generator=gen)
    weight[weight.abs() < 1] = 0
    torch.save({"model": {"w.weight": weight, "b": torch.randn(4, generator=gen)}}, tmp_path / "c.pth")
    was = gc.isenabled()
    try:
        for run, enabled in enumerate((True, False, True)):
            gc.enable() if enabled else gc.disable()
            packed, dense = tmp_path / f"p{run}.safetensors", tmp_path / f"u{run}.pth"
            steps = [(pack_checkpoint, tmp_path / "c.pth", packed), (unpack, packed, dense), (load_sparse, packed),
                     (read_checkpoint, dense), (read_checkpoint, packed)]
            for step, *args in steps:
                step(*args, **({"zeros": True} if step is pack_checkpoint else {}))
                assert gc.isenabled() is enabled, step.__name__
            with pytest.raises(OpenTransError, match="nothing looks pruned"):  # a refusal restores it too
                pack_checkpoint({"b": torch.ones(3)}, tmp_path / "x.safetensors", zeros=True)
            assert gc.isenabled() is enabled
    finally:
        gc.enable() if was else gc.disable()
