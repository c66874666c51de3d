"""Packed backbones load wherever a backbone or checkpoint does: load_backbone, torch.hub, registry, plugins."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from support.artefacts import finetuned_pruned, train_and_check_exact
from support.cli import run_cli
from support.towers import make_tiny_resnet, use_tiny_family

import opentrans_hub as oth
from opentrans_hub import OpenTransError
from opentrans_hub.methods.imp import magnitude_prune
from opentrans_hub.sparsity.masks import masked_parameters
from opentrans_hub.transfer.backbone import load_backbone
from opentrans_hub.transfer.discovery import get_plugin
from opentrans_hub.zoo.packing import load_sparse, pack_checkpoint, tower_masks
from opentrans_hub.zoo.registry import Registry

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def tiny_arch(monkeypatch):
    """An architecture family 'tinytest' building the small ModifiedResNet (random init; weights come from files)."""
    return use_tiny_family(monkeypatch)


def test_load_backbone_from_packed_framework_checkpoint(tmp_path, tiny_arch):
    tower, sub = finetuned_pruned()
    state = tower.state_dict()
    checkpoint = {"model": {f"backbone.clip_model.visual.{k}": v for k, v in state.items()}, "iteration": 9}
    torch.save(checkpoint, tmp_path / "model_final.pth")
    packed = tmp_path / "model_final.sparse.safetensors"
    pack_checkpoint(tmp_path / "model_final.pth", packed, subnetwork=sub)

    loaded = load_backbone(tiny_arch, pretrained=str(packed))
    got = loaded.state_dict()
    assert all(torch.equal(got[k], v) for k, v in state.items())
    assert set(masked_parameters(loaded)) == set(sub.masks)
    assert loaded.opentrans_packed["subnetwork"] == sub.sha256
    train_and_check_exact(loaded, sub.masks)

    plain = load_backbone(tiny_arch, pretrained=str(packed), exact=False)
    assert masked_parameters(plain) == {} and torch.equal(plain.state_dict()["layer1.0.conv2.weight"],
                                                          state["layer1.0.conv2.weight"])
    with pytest.raises(AssertionError):  # without the masks the same training regrows pruned weights
        train_and_check_exact(plain, sub.masks)


def test_registry_name_and_torch_hub(tmp_path, tiny_arch, monkeypatch):
    tower, sub = finetuned_pruned(seed=1)
    torch.save(tower.state_dict(), tmp_path / "tower.pth")
    packed = tmp_path / "tower.sparse.safetensors"
    pack_checkpoint(tmp_path / "tower.pth", packed, zeros=True, arch=tiny_arch)
    monkeypatch.setenv("OPENTRANS_HUB_HOME", str(tmp_path / "home"))
    Registry().add(packed, "my-finetuned-tiny")
    by_name = load_backbone(tiny_arch, pretrained="my-finetuned-tiny")
    assert set(masked_parameters(by_name)) == {n for n, keep in sub.masks.items() if not keep.all()}
    assert by_name.state_dict().keys() == tower.state_dict().keys()
    assert all(torch.equal(by_name.state_dict()[k], v) for k, v in tower.state_dict().items())  # the weights too
    hub = torch.hub.load(str(REPO), "clip_backbone", source="local", arch=tiny_arch, pretrained=str(packed))
    assert set(masked_parameters(hub)) == set(masked_parameters(by_name))
    assert all(torch.equal(a, b) for a, b in zip(hub.state_dict().values(), tower.state_dict().values()))
    with pytest.raises(OpenTransError, match="packed file's masks do not fit"):
        _wrong_model_masks(packed)


def _wrong_model_masks(packed: Path) -> None:
    tower_masks(packed, ["conv1.weight", "fc.weight"])


def test_plugin_apply_checkpoint_reads_packed_input(tmp_path):
    tower, sub = finetuned_pruned(seed=2)
    state = {f"backbone.clip_model.visual.{k}": v for k, v in tower.state_dict().items()}
    torch.save({"model": state}, tmp_path / "fcclip.pth")
    pack_checkpoint(tmp_path / "fcclip.pth", tmp_path / "fcclip.sparse.safetensors", subnetwork=sub)
    narrower = magnitude_prune(make_tiny_resnet(2), sparsity=0.9, arch="open_clip/RN50", apply=False)
    report = get_plugin("fcclip").apply_checkpoint(tmp_path / "fcclip.sparse.safetensors", narrower,
                                                   tmp_path / "out.pth")
    assert report.mapped
    out = torch.load(tmp_path / "out.pth", weights_only=True)["model"]
    name = "layer1.0.conv2.weight"
    weight = out[f"backbone.clip_model.visual.{name}"]
    assert not weight[~narrower[name]].any() and not weight[~sub[name]].any()
    assert torch.equal(weight[narrower[name] & sub[name]], state[f"backbone.clip_model.visual.{name}"][
        narrower[name] & sub[name]])


def test_tower_masks_ignore_a_pruned_decoder(tmp_path, tiny_arch):
    tower, sub = finetuned_pruned(seed=3)
    decoder = torch.randn(32, 32, 3, 3) * (torch.rand(32, 32, 3, 3) > 0.8)
    state = {**{f"backbone.visual.{k}": v for k, v in tower.state_dict().items()}, "head.conv.weight": decoder}
    pack_checkpoint({"model": state}, tmp_path / "both.sparse.safetensors", zeros=True)
    loaded = load_backbone(tiny_arch, pretrained=str(tmp_path / "both.sparse.safetensors"))
    assert set(masked_parameters(loaded)) == {n for n, keep in sub.masks.items() if not keep.all()}


def test_two_towers_in_one_file_are_refused(tmp_path, tiny_arch):
    tower, sub = finetuned_pruned(seed=4)
    state = tower.state_dict()
    both = {**{f"model.visual.{k}": v for k, v in state.items()}, **{f"ema.visual.{k}": v for k, v in state.items()}}
    pack_checkpoint(both, tmp_path / "ema.sparse.safetensors", zeros=True)
    with pytest.raises(OpenTransError, match="holds the tower 2 times"):
        load_backbone(tiny_arch, pretrained=str(tmp_path / "ema.sparse.safetensors"))


def _swap_mask_bits(data: bytes, key: str, i: int, j: int) -> bytes:
    """The file's bytes with bits ``i`` and ``j`` of ``key``'s stored mask swapped; nothing else recomputed."""
    (length,) = struct.unpack("<Q", data[:8])
    start = 8 + length + json.loads(data[8:8 + length])[key + "::mask"]["data_offsets"][0]
    out = bytearray(data)
    bit = {n: bool(out[start + n // 8] >> (7 - n % 8) & 1) for n in (i, j)}  # packbits: first weight = high bit
    for n, other in ((i, j), (j, i)):
        out[start + n // 8] = out[start + n // 8] & ~(1 << (7 - n % 8)) | bit[other] << (7 - n % 8)
    return bytes(out)


def test_mask_bits_moved_onto_zeros_are_refused(tmp_path, tiny_arch):
    """A kept weight that is exactly 0.0 and its pruned neighbour swap mask bits: the dense content, and so its
    hash, is unchanged, but the masks are not the published ones; every load that uses them refuses the file."""
    tower, sub = finetuned_pruned(seed=5)
    name = "layer1.0.conv2.weight"
    keep = sub[name].reshape(-1)
    i = next(n for n in range(keep.numel() - 1) if keep[n] and not keep[n + 1])
    state = tower.state_dict()
    state[name].view(-1)[i] = 0.0
    torch.save(state, tmp_path / "tower.pth")
    good = tmp_path / "tower.sparse.safetensors"
    pack_checkpoint(tmp_path / "tower.pth", good, subnetwork=sub)
    assert oth.load_backbone(tiny_arch, pretrained=str(good)).opentrans_packed["subnetwork"] == sub.sha256

    bad = tmp_path / "swapped.sparse.safetensors"
    bad.write_bytes(_swap_mask_bits(good.read_bytes(), name, i, i + 1))
    dense = load_sparse(bad)  # the dense content hash holds: only the masks changed
    assert all(torch.equal(dense[k], v) for k, v in state.items())
    with pytest.raises(OpenTransError, match="content hash mismatch") as info:
        oth.load_backbone(tiny_arch, pretrained=str(bad))
    assert str(info.value).startswith(f"{bad}: ") and "\n" not in str(info.value)
    with pytest.raises(OpenTransError, match="content hash mismatch"):
        tower_masks(bad, dict(tower.named_parameters()))
    shown = run_cli(tmp_path, "inspect", bad.name)  # the header alone: it describes, and says it verified nothing
    assert shown.returncode == 0 and "not verified" in shown.stdout and "(verified)" not in shown.stdout
    for argv in (["verify", bad.name], ["unpack", bad.name, "--out", "swapped.pth"]):
        refused = run_cli(tmp_path, *argv)
        assert refused.returncode == 2 and refused.stdout == "", argv
        assert refused.stderr.count("\n") == 1 and bad.name in refused.stderr and "hash mismatch" in refused.stderr
    assert not (tmp_path / "swapped.pth").exists()
