"""Checkpoint transfer through plugins: ``apply`` and ``plugins check`` on real checkpoint files."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from support.artefacts import random_subnetwork
from support.cli import main_in_process
from support.towers import make_tiny_resnet
from torch import nn

from opentrans_hub import OpenTransError
from opentrans_hub.formats.selection import LayerSelection
from opentrans_hub.transfer.discovery import get_plugin


def nonzero_init(module: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
    return module


def bit_identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


@pytest.fixture(scope="module")
def tower() -> nn.Module:
    return nonzero_init(make_tiny_resnet(seed=2))


def _fcclip_state(tower: nn.Module) -> dict[str, torch.Tensor]:
    state = {f"backbone.clip_model.visual.{k}": v.clone() for k, v in tower.state_dict().items()}
    state["backbone.clip_model.transformer.resblocks.0.mlp.c_fc.weight"] = torch.rand(8, 8) + 0.5
    state["backbone.clip_model.logit_scale"] = torch.tensor(4.6, dtype=torch.float16)
    state["sem_seg_head.predictor.class_embed.weight"] = (torch.rand(4, 8) + 0.5).half()
    return state


def test_apply_rewrites_a_nested_ddp_checkpoint(tmp_path, capsys, tower):
    sub = random_subnetwork(tower)
    sub_path = sub.save(tmp_path / "sub.safetensors")
    flat = _fcclip_state(tower)
    checkpoint = {"model": {f"module.{k}": v for k, v in flat.items()}, "iteration": 89999,
                  "scheduler": {"last_epoch": 3, "base_lrs": [0.0001]}, "__author__": "detectron2"}
    src = tmp_path / "model_final.pth"
    torch.save(checkpoint, src)
    out = tmp_path / "pruned.pth"

    code, stdout, _ = main_in_process(capsys, "apply", "--plugin", "fcclip", "--subnetwork", str(sub_path),
                                      "--checkpoint", str(src), "--out", str(out), "--strict", "--json")
    assert code == 0
    info = json.loads(stdout.strip().splitlines()[-1])
    assert info["counts"] == {"mapped": len(sub), "dropped": 0, "unmapped": 0, "mismatched": 0, "uncovered": 0}

    written = torch.load(out, weights_only=True)
    assert list(written) == list(checkpoint)
    assert {k: v for k, v in written.items() if k != "model"} == {k: v for k, v in checkpoint.items() if k != "model"}
    assert list(written["model"]) == list(checkpoint["model"])  # same names, same order, prefix kept
    for key, before in checkpoint["model"].items():
        after = written["model"][key]
        canonical = key[len("module.backbone.clip_model.visual."):]
        if key.startswith("module.backbone.clip_model.visual.") and canonical in sub.masks:
            mask = sub.masks[canonical]
            assert torch.equal(after, before * mask) and torch.equal(after == 0, ~mask), key
        else:
            assert bit_identical(after, before), key

    # the printed MappingReport (text mode) names what happened
    code, stdout, _ = main_in_process(capsys, "apply", "--plugin", "fcclip", "--subnetwork", str(sub_path),
                                      "--checkpoint", str(src), "--out", str(tmp_path / "again.pth"))
    assert code == 0 and f"mapped {len(sub)}, dropped 0, unmapped 0" in stdout


def test_apply_reports_and_strict_refuses_unmapped(tmp_path, capsys, tower):
    sub = random_subnetwork(tower)
    sub_path = sub.save(tmp_path / "sub.safetensors")
    backbone = copy.deepcopy(tower)
    del backbone.attnpool  # Han et al. without resAtten: no attention pool in the checkpoint
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    state.update({f"vision_clip.{k}": v.clone() for k, v in tower.state_dict().items()})  # frozen KD copy
    src = tmp_path / "han.pth"
    torch.save({"model": state}, src)
    out = tmp_path / "han-pruned.pth"

    code, _, err = main_in_process(capsys, "apply", "--plugin", "hanovs", "--subnetwork", str(sub_path),
                                   "--checkpoint", str(src), "--out", str(out), "--strict")
    assert code == 2 and "strict" in err and "attnpool" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()  # nothing written

    code, stdout, _ = main_in_process(capsys, "apply", "--plugin", "hanovs", "--subnetwork", str(sub_path),
                                      "--checkpoint", str(src), "--out", str(out), "--json")
    assert code == 0
    info = json.loads(stdout)
    attnpool = {n for n in sub.masks if n.startswith("attnpool.")}
    assert {u["source"] for u in info["unmapped"]} == attnpool
    assert info["counts"]["mapped"] == len(sub) - len(attnpool)
    written = torch.load(out, weights_only=True)["model"]
    for key, value in state.items():
        if key.startswith("vision_clip."):
            assert bit_identical(written[key], value), key  # never mapped onto the KD copy


def test_apply_safetensors_keeps_metadata(tmp_path, capsys, tower):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    sub = random_subnetwork(tower)
    plugin = get_plugin("fcclip")
    flat = _fcclip_state(tower)
    src = tmp_path / "model.safetensors"
    save_file(flat, str(src), metadata={"format": "pt", "framework": "fc-clip"})
    out = tmp_path / "pruned.safetensors"
    report = plugin.apply_checkpoint(src, sub, out, strict=True)
    assert len(report.mapped) == len(sub)
    written = load_file(str(out))
    assert list(written) == list(load_file(str(src)))
    with safe_open(str(out), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt", "framework": "fc-clip"}
    for key, before in flat.items():
        canonical = key[len("backbone.clip_model.visual."):]
        if key.startswith("backbone.clip_model.visual.") and canonical in sub.masks:
            assert torch.equal(written[key], before * sub.masks[canonical])
        else:
            assert bit_identical(written[key], before), key


def test_apply_refuses_mismatched_shapes_and_unsafe_pickles(tmp_path, capsys, tower):
    sub = random_subnetwork(tower)
    sub_path = sub.save(tmp_path / "sub.safetensors")
    state = {f"backbone.clip_model.visual.{k}": v for k, v in tower.state_dict().items()}
    state["backbone.clip_model.visual.layer1.0.conv1.weight"] = torch.ones(3, 3, 1, 1)
    src = tmp_path / "wrong.pth"
    torch.save({"model": state}, src)
    out = tmp_path / "out.pth"
    code, _, err = main_in_process(capsys, "apply", "--plugin", "fcclip", "--subnetwork", str(sub_path),
                                   "--checkpoint", str(src), "--out", str(out))
    assert code == 2 and "layer1.0.conv1.weight" in err and "wrong.pth" in err and not out.exists()

    unsafe = tmp_path / "unsafe.pth"
    torch.save({"model": {"x": torch.ones(1)}, "hook": OpenTransError("not data")}, unsafe)
    code, _, err = main_in_process(capsys, "apply", "--plugin", "fcclip", "--subnetwork", str(sub_path),
                                   "--checkpoint", str(unsafe), "--out", str(out))
    assert code == 2 and "weights-only" in err and not out.exists()

    code, _, err = main_in_process(capsys, "apply", "--plugin", "no-such-framework", "--subnetwork", str(sub_path),
                                   "--checkpoint", str(src), "--out", str(out))
    assert code == 2 and "no plugin named 'no-such-framework'" in err and "fcclip" in err


@pytest.fixture(scope="module")
def deeplab_checkpoint(tmp_path_factory):
    """A real torchvision deeplabv3_resnet50 checkpoint (fp16 to halve the file), no exact zeros."""
    from torchvision.models.segmentation import deeplabv3_resnet50

    torch.manual_seed(0)
    model = nonzero_init(deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=4), seed=3).half()
    path = tmp_path_factory.mktemp("deeplab") / "deeplab.pth"
    torch.save({"model": model.state_dict(), "iteration": 1}, path)
    return path


@pytest.fixture(scope="module")
def rn50_names():
    from opentrans_hub.towers.backbones import build_visual

    torch.manual_seed(0)
    return build_visual("open_clip/RN50")


def test_plugins_check_counts_on_a_real_checkpoint(tmp_path, capsys, deeplab_checkpoint, rn50_names):
    params = dict(rn50_names.named_parameters())
    stem = {n for n in params if n.split(".")[0] in {"conv1", "conv2", "conv3", "bn1", "bn2", "bn3"}}
    attnpool = {n for n in params if n.startswith("attnpool.")}
    code, stdout, _ = main_in_process(capsys, "plugins", "check", "deeplabv3-torchvision", "--checkpoint",
                                      str(deeplab_checkpoint), "--arch", "open_clip/RN50", "--json")
    assert code == 0
    info = json.loads(stdout)
    assert info["counts"]["mapped"] == len(params) - len(stem) - len(attnpool)
    assert info["counts"]["dropped"] == len(attnpool) and info["counts"]["unmapped"] == len(stem)
    assert info["counts"]["mismatched"] == 0 and info["kept_sparsity"] == 0.0
    assert {u["source"] for u in info["unmapped"]} == stem

    code, _, err = main_in_process(capsys, "plugins", "check", "deeplabv3-torchvision", "--checkpoint",
                                   str(deeplab_checkpoint), "--arch", "open_clip/RN50", "--strict")
    assert code == 2 and "strict" in err

    # apply a subnetwork, then check the result: the kept sparsity is exactly what the masks prune
    sub = random_subnetwork(rn50_names)
    sub_path = sub.save(tmp_path / "rn50.safetensors")
    out = tmp_path / "deeplab-pruned.pth"
    code, stdout, _ = main_in_process(capsys, "apply", "--plugin", "deeplabv3-torchvision", "--subnetwork",
                                      str(sub_path), "--checkpoint", str(deeplab_checkpoint), "--out", str(out),
                                      "--json")
    assert code == 0
    mapped_masks = {n: m for n, m in sub.masks.items() if n.startswith("layer")}
    pruned = sum(int((~m).sum()) for m in mapped_masks.values())
    mapped_numel = sum(params[n].numel() for n in params if n not in stem and n not in attnpool and params[n].dim() > 1)
    code, stdout, _ = main_in_process(capsys, "plugins", "check", "deeplabv3-torchvision", "--checkpoint", str(out),
                                      "--json")  # default arch: the plugin's first, open_clip/RN50
    after = json.loads(stdout)
    assert after["arch"] == "open_clip/RN50" and after["arch_detected"]  # RN101 also declared: fits worse
    assert after["zeros"] == pruned and after["mapped_params"] == mapped_numel
    assert after["kept_sparsity"] == pytest.approx(pruned / mapped_numel)
    # checking the dense checkpoint with the subnetwork predicts the same figure without writing anything
    code, stdout, _ = main_in_process(capsys, "plugins", "check", "deeplabv3-torchvision", "--checkpoint",
                                      str(deeplab_checkpoint), "--subnetwork", str(sub_path), "--json")
    predicted = json.loads(stdout)
    assert predicted["zeros"] == pruned and predicted["counts"]["unmapped"] == 3  # the stem convs


def test_apply_selection_writes_framework_names(tmp_path, capsys, tower):
    gen = torch.Generator().manual_seed(0)
    names = [n for n, p in tower.named_parameters() if n.endswith("weight") and p.dim() >= 2]
    layers = [{"name": n, "trainable": bool(torch.rand(1, generator=gen) < 0.5), "alpha": 3.0} for n in names]
    selection = LayerSelection(layers, arch="open_clip/RN50", policy={"name": "alpha<median"})
    sel_path = selection.save(tmp_path / "sel.json")
    state = {f"backbone.clip_model.visual.{k}": v for k, v in tower.state_dict().items()}
    src = tmp_path / "fcclip.pth"
    torch.save({"model": state}, src)
    out = tmp_path / "mapped.json"
    code, _, _ = main_in_process(capsys, "apply", "--plugin", "fcclip", "--selection", str(sel_path), "--checkpoint",
                                 str(src), "--out", str(out), "--strict")
    assert code == 0
    manifest = json.loads(out.read_text())
    assert manifest["selection"] == selection.sha256
    assert manifest["trainable"] == sorted(f"backbone.clip_model.visual.{n}" for n in selection.trainable)
    assert manifest["frozen"] == sorted(f"backbone.clip_model.visual.{n}" for n in selection.frozen)


def test_check_a_live_model_with_a_subnetwork(tower):
    sub = random_subnetwork(tower)
    model = nn.Module()
    model.backbone = copy.deepcopy(tower)
    del model.backbone.attnpool
    model.vision_clip = copy.deepcopy(tower)
    info = get_plugin("hanovs").check(model, subnetwork=sub)
    attnpool = {n for n in sub.masks if n.startswith("attnpool.")}
    assert info["counts"]["unmapped"] == len(attnpool) and info["counts"]["mapped"] == len(sub) - len(attnpool)
    mapped = [n for n in sub.masks if n not in attnpool]
    assert info["zeros"] == sum(int((~sub.masks[n]).sum()) for n in mapped)
    assert info["mapped_params"] == sum(sub.masks[n].numel() for n in mapped)
    assert not info["arch_detected"] and info["arch"] == "open_clip/RN50"
    assert all(bool((p != 0).all()) for p in model.parameters())  # check never changes the model
