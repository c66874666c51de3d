"""The open_clip ConvNeXt frameworks' plugins (MAFT+, Mask-Adapter, SED) on their real module structures.

Every layout holds a whole open_clip CLIP model (timm ConvNeXt-atto trunk, text tower) where the framework holds it,
beside the framework's own modules (tests/support/convnext_layouts.py). The expected destination of each mask comes
from module identity (the canonical tower masked directly), the ``auto`` plugin's inference is compared with each
plugin tensor by tensor, and the presets are compared with re-implementations of the frameworks' own freezing code.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from support.artefacts import random_subnetwork
from support.cli import main_in_process
from support.convnext_layouts import CONVNEXT_MLP_TINY, clip_model, maftplus_layout, maskadapter_layout, sed_layout
from support.layouts import resolved
from support.towers import CONVNEXT_TINY, finetuned
from torch import nn

from opentrans_hub import OpenTransError, Plugin, apply_masks, infer_name_map
from opentrans_hub.transfer.discovery import get_plugin

LARGE = "open_clip/convnext_large_d_320"
TOWER = {"maftplus": "backbone.clip_model.visual.", "maskadapter": "backbone.clip_model.visual.",
         "sed": "sem_seg_head.predictor.clip_model.visual."}


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def bit_identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


@pytest.fixture(scope="module")
def clip() -> nn.Module:
    return clip_model(CONVNEXT_TINY, seed=3)


def _layouts(clip: nn.Module) -> dict[str, nn.Module]:
    return {"maftplus": maftplus_layout(finetuned(clip), clip),  # trained student, teacher at the start values
            "maskadapter": maskadapter_layout(clip, "mask_adapter"),
            "maskadapter-fcclip": maskadapter_layout(clip, "fcclip"),
            "maskadapter-maftp": maskadapter_layout(clip, "maftp"), "sed": sed_layout(clip)}


def _assert_only_the_tower_changed(model: nn.Module, before: dict[str, torch.Tensor], prefix: str, tower: nn.Module,
                                   sub) -> None:
    """Inside ``prefix`` the state equals ``tower`` masked directly; every other tensor is bit-identical."""
    reference = copy.deepcopy(tower)
    apply_masks(reference, dict(sub.masks))
    expected = {prefix + k: v for k, v in reference.state_dict().items()}
    for key, value in model.state_dict().items():
        if key.startswith(prefix):
            assert torch.equal(value, expected[key]), key
        else:
            assert bit_identical(value, before[key]), key


# ----------------------------------------------------------------------------- live models
@pytest.mark.parametrize("layout", ["maftplus", "maskadapter", "maskadapter-fcclip", "maskadapter-maftp", "sed"])
def test_each_plugin_lands_on_the_trained_tower_only(clip, layout):
    model = _layouts(clip)[layout]
    name = layout.split("-")[0]
    plugin = get_plugin(name)
    prefix = TOWER[name]
    tower = model.get_submodule(prefix.rstrip("."))
    assert plugin.locate_tower(model) is tower
    sub = random_subnetwork(tower, LARGE)
    unmasked_tower = copy.deepcopy(tower)
    before = snapshot(model)

    report = plugin.apply(model, sub, strict=True)

    assert not report.unmapped and not report.dropped
    assert dict(report.mapped) == {n: prefix + n for n in sub.masks}
    _assert_only_the_tower_changed(model, before, prefix, unmasked_tower, sub)
    if name == "maftplus":  # the teacher is a whole second CLIP model of the very same shapes
        assert set(model.backbone_t.state_dict()) == set(model.backbone.state_dict())
        assert all(bool((p != 0).all()) for p in model.backbone_t.parameters())


@pytest.mark.parametrize("layout", ["maftplus", "maskadapter-maftp", "sed"])
def test_auto_infers_each_plugins_mapping(clip, layout):
    model = _layouts(clip)[layout]
    name = layout.split("-")[0]
    state = model.state_dict()
    expected = resolved(get_plugin(name).name_map(LARGE), CONVNEXT_TINY, state)
    assert expected and all(dest == [TOWER[name] + src] for src, dest in expected.items())
    tower = "backbone." if name == "maftplus" else None
    if tower:  # two copies of the tower fit: auto refuses to choose and names the prefix that does
        with pytest.raises(OpenTransError, match="--tower"):
            infer_name_map(model, CONVNEXT_TINY)
    name_map, report = infer_name_map(model, CONVNEXT_TINY, tower=tower)
    assert resolved(name_map, CONVNEXT_TINY, state) == expected
    assert report.tower == TOWER[name] and not report.unmapped


def test_maftplus_selection_never_touches_the_teacher(clip):
    model = maftplus_layout(finetuned(clip), clip)
    model.backbone_t.requires_grad_(True)  # whatever its state, the selection may not reach it
    tower = model.backbone.clip_model.visual
    sub = random_subnetwork(tower, LARGE)
    from opentrans_hub import LayerSelection

    layers = [{"name": n, "trainable": i % 3 == 0} for i, n in enumerate(sub.masks)]
    selection = LayerSelection(layers, arch=LARGE, policy={"name": "test"})
    get_plugin("maftplus").apply_selection(model, selection, strict=True)
    params = dict(model.named_parameters())
    for layer in layers:
        assert params[f"backbone.clip_model.visual.{layer['name']}"].requires_grad is layer["trainable"]
    assert all(p.requires_grad for p in model.backbone_t.parameters())
    assert all(p.requires_grad for p in model.backbone.clip_model.transformer.parameters())  # the text tower
    assert all(p.requires_grad for n, p in params.items() if n.startswith(("sem_seg_head.", "cdt.", "void_")))


# ----------------------------------------------------------------------------- checkpoints through the CLI
def test_apply_on_a_maftplus_checkpoint_keeps_the_teacher_dense(tmp_path, capsys, clip):
    model = maftplus_layout(finetuned(clip), clip)
    state = model.state_dict()
    tower = model.backbone.clip_model.visual
    sub = random_subnetwork(tower, CONVNEXT_TINY)
    sub_path = sub.save(tmp_path / "sub.safetensors")
    src = tmp_path / "maftp.pth"
    torch.save({"model": state, "iteration": 55000}, src)

    # the plugin knows the tiny tower by ConvNeXt-L's names; its linear head (L has an MLP head) stays uncovered
    code, stdout, err = main_in_process(capsys, "apply", "--plugin", "maftplus", "--arch", LARGE, "--subnetwork",
                                        sub_path, "--checkpoint", src, "--out", tmp_path / "hand.pth", "--strict",
                                        "--allow-partial", "--json")
    assert code == 0, err
    assert json.loads(stdout)["counts"]["mapped"] == len(sub)
    hand = torch.load(tmp_path / "hand.pth", weights_only=True)
    assert hand["iteration"] == 55000 and list(hand["model"]) == list(state)
    for key, before in state.items():
        canonical = key[len("backbone.clip_model.visual."):]
        if key.startswith("backbone.clip_model.visual.") and canonical in sub.masks:
            assert torch.equal(hand["model"][key], before * sub.masks[canonical]), key
        else:
            assert bit_identical(hand["model"][key], before), key  # the teacher backbone_t.* among them

    # auto: refused without --tower (one line naming it), then the same file as the plugin's with it
    code, _, err = main_in_process(capsys, "apply", "--plugin", "auto", "--subnetwork", sub_path, "--checkpoint", src,
                                   "--out", tmp_path / "auto.pth")
    assert code == 2 and "--tower" in err and "backbone_t.clip_model.visual." in err
    assert not (tmp_path / "auto.pth").exists()
    code, _, err = main_in_process(capsys, "apply", "--plugin", "auto", "--tower", "backbone.clip_model",
                                   "--subnetwork", sub_path, "--checkpoint", src, "--out", tmp_path / "auto.pth")
    assert code == 0, err
    auto = torch.load(tmp_path / "auto.pth", weights_only=True)
    assert list(auto["model"]) == list(hand["model"])
    assert all(bit_identical(auto["model"][k], hand["model"][k]) for k in hand["model"])
    code, _, err = main_in_process(capsys, "apply", "--plugin", "maftplus", "--tower", "backbone.", "--subnetwork",
                                   sub_path, "--checkpoint", src, "--out", tmp_path / "no.pth")
    assert code == 2 and "--tower is for the 'auto' plugin" in err and not (tmp_path / "no.pth").exists()


@pytest.mark.parametrize("name,layout", [("maftplus", "maftplus"), ("maskadapter", "maskadapter-fcclip"),
                                         ("sed", "sed")])
def test_plugins_check_predicts_the_sparsity_on_each_checkpoint(tmp_path, capsys, clip, name, layout):
    model = _layouts(clip)[layout]
    tower = model.get_submodule(TOWER[name].rstrip("."))
    sub = random_subnetwork(tower, LARGE)
    sub_path = sub.save(tmp_path / "sub.safetensors")
    src = tmp_path / "model.pth"
    torch.save({"model": model.state_dict()}, src)
    code, stdout, err = main_in_process(capsys, "plugins", "check", name, "--checkpoint", src, "--subnetwork", sub_path,
                                        "--strict", "--json")
    assert code == 0, err
    info = json.loads(stdout)
    pruned = sum(int((~m).sum()) for m in sub.masks.values())
    assert info["counts"]["mapped"] == len(sub) and info["counts"]["mismatched"] == 0
    assert info["zeros"] == pruned and info["mapped_params"] == sum(m.numel() for m in sub.masks.values())
    assert {m["target"] for m in info["mapped"]} == {TOWER[name] + n for n in sub.masks}
    # auto, searching the tiny tower's block structure, checks the same tensors (told which copy in MAFT+)
    tower = ["--tower", "backbone."] if name == "maftplus" else []
    code, stdout, err = main_in_process(capsys, "plugins", "check", "auto", *tower, "--arch", CONVNEXT_TINY,
                                        "--checkpoint", src, "--subnetwork", sub_path, "--json")
    assert code == 0, err
    auto = json.loads(stdout)
    assert auto["mapped"] == info["mapped"] and auto["zeros"] == pruned


# ----------------------------------------------------------------------------- presets
def sed_sets_trainable(mode: str, name: str) -> bool:
    """SED's own rule (sed_model.py) for one parameter name of its ``clip_model``, re-written from its code."""
    if "visual" not in name:
        return False
    if mode == "prompt":
        return "prompt" in name
    if mode == "conv":
        return "conv" in name or "position" in name
    if mode == "full":
        return True
    if mode == "mlp":
        return "mlp" in name or "position" in name
    if mode == "full_res5":
        return "stages.3" in name
    return False


def maftplus_sets_trainable(name: str) -> bool:
    """MAFT+'s ``_freeze`` for one parameter name of the student (``backbone.clip_model...``), re-written from its
    code: its CLIP backbone has frozen everything before."""
    trainable = False
    if any(part in name for part in ("clip_model.visual.trunk.stem", "clip_model.visual.trunk.stages",
                                     "clip_model.visual.trunk.norm_pre")):
        trainable = True
    if "clip_model.visual.trunk.head.norm." in name or "clip_model.visual.head.mlp." in name:
        trainable = False
    return trainable


@pytest.fixture(scope="module")
def large_names() -> list[str]:
    from opentrans_hub.towers.backbones import canonical_shapes

    return list(canonical_shapes(LARGE))  # ConvNeXt-L on the meta device: names and shapes only


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "conv", "mlp", "full_res5"])
def test_sed_presets_are_what_sed_trains(large_names, mode):
    plugin = get_plugin("sed")
    selection = plugin.selection_preset(mode, LARGE)
    assert [layer["name"] for layer in selection.layers] == large_names  # every tower parameter, in order
    expected = {n: sed_sets_trainable(mode, "visual." + n) for n in large_names}
    assert {layer["name"]: layer["trainable"] for layer in selection.layers} == expected
    assert any(expected.values()) and selection.policy["name"] == f"preset:sed/{mode}"

    # on a live SED model (MLP head, as ConvNeXt-L has): the same requires_grad inside the tower as SED's own loop
    clip = clip_model(CONVNEXT_MLP_TINY, seed=4)
    ours, theirs = sed_layout(clip), sed_layout(clip)
    for name, param in theirs.sem_seg_head.predictor.clip_model.named_parameters():
        param.requires_grad = sed_sets_trainable(mode, name)
    report = plugin.apply_selection(ours, selection)
    assert not report.dropped and len(report.mapped) == sum(1 for _ in clip.visual.parameters())
    theirs_flags = dict((n, p.requires_grad) for n, p in theirs.named_parameters())
    for name, param in ours.named_parameters():
        if name.startswith(TOWER["sed"]):
            assert param.requires_grad is theirs_flags[name], name
        else:
            assert param.requires_grad, name  # outside the tower: untouched (SED freezes its text tower itself)


@pytest.mark.slow
def test_maftplus_default_preset_and_preset_errors(large_names, tmp_path, capsys):
    plugin = get_plugin("maftplus")
    selection = plugin.selection_preset("default", LARGE)
    expected = {n: maftplus_sets_trainable("backbone.clip_model.visual." + n) for n in large_names}
    assert {layer["name"]: layer["trainable"] for layer in selection.layers} == expected
    assert sorted(n for n, t in expected.items() if not t) == sorted(
        ["trunk.head.norm.weight", "trunk.head.norm.bias", "head.mlp.fc1.weight", "head.mlp.fc1.bias",
         "head.mlp.fc2.weight"])

    # on a live MAFT+ model (MLP head, as ConvNeXt-L has): the student as MAFT+'s _freeze leaves it, the teacher
    # and everything outside the student's tower untouched
    clip = clip_model(CONVNEXT_MLP_TINY, seed=6)
    model = maftplus_layout(clip)
    model.backbone_t.requires_grad_(True)
    report = plugin.apply_selection(model, selection)
    assert len(report.mapped) == sum(1 for _ in clip.visual.parameters())
    for name, param in model.named_parameters():
        if name.startswith(TOWER["maftplus"]):
            assert param.requires_grad is maftplus_sets_trainable(name), name
        else:
            assert param.requires_grad, name

    # through a MAFT+ checkpoint of ConvNeXt-L's names (one value each: a selection maps by name), the manifest names
    # the student's parameters only, never the teacher's
    state = {f"{m}.clip_model.visual.{n}": torch.ones(1) for m in ("backbone", "backbone_t") for n in large_names}
    state["backbone.clip_model.text_projection"] = state["backbone_t.clip_model.text_projection"] = torch.ones(1)
    torch.save({"model": state}, tmp_path / "maftp.pth")
    selection.save(tmp_path / "default.json")
    code, _, err = main_in_process(capsys, "apply", "--plugin", "maftplus", "--selection", tmp_path / "default.json",
                                   "--checkpoint", tmp_path / "maftp.pth", "--out", tmp_path / "manifest.json",
                                   "--strict")
    assert code == 0, err
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["trainable"] == sorted(f"backbone.clip_model.visual.{n}" for n, t in expected.items() if t)
    assert manifest["frozen"] == sorted(f"backbone.clip_model.visual.{n}" for n, t in expected.items() if not t)

    # the CLI writes the same selection as the Python call; modes that train nothing of the tower have no preset
    out = tmp_path / "sed-conv.json"
    code, stdout, err = main_in_process(capsys, "plugins", "preset", "sed", "conv", "--arch", LARGE, "--out", out)
    assert code == 0, err
    assert "sed preset conv" in stdout
    from opentrans_hub import LayerSelection

    assert LayerSelection.load(out).sha256 == get_plugin("sed").selection_preset("conv", LARGE).sha256
    code, _, err = main_in_process(capsys, "plugins", "preset", "sed", "conv", "--arch", LARGE, "--out", out)
    assert code == 2 and "exists" in err  # never over an existing file without --overwrite
    for mode in ("prompt", "attention", "fast_infer"):
        code, _, err = main_in_process(capsys, "plugins", "preset", "sed", mode, "--out", tmp_path / "x.json")
        assert code == 2 and "no preset" in err and "full_res5" in err and not (tmp_path / "x.json").exists()
    code, _, err = main_in_process(capsys, "plugins", "preset", "sed", "--out", tmp_path / "x.json")
    assert code == 2 and "name the preset" in err and not (tmp_path / "x.json").exists()  # not a silent listing
    code, stdout, _ = main_in_process(capsys, "plugins", "preset", "sed", "--json")
    assert code == 0 and set(json.loads(stdout)["presets"]) == {"full", "conv", "mlp", "full_res5"}
    with pytest.raises(OpenTransError, match="does not cover"):
        plugin.selection_preset("default", "open_clip/RN50")


def test_preset_declarations_and_empty_presets_are_refused(clip):
    with pytest.raises(OpenTransError, match="preset 'bad'"):
        Plugin(name="x", frameworks=("X",), archs={CONVNEXT_TINY: ""}, presets={"bad": "stages.("})
    with pytest.raises(OpenTransError, match="presets must map"):
        Plugin(name="x", frameworks=("X",), archs={CONVNEXT_TINY: ""}, presets=["full"])
    with pytest.raises(OpenTransError, match="preset ''"):
        Plugin(name="x", frameworks=("X",), archs={CONVNEXT_TINY: ""}, presets={"": "."})
    presets = {"prompt": "prompt", "s3": r"^trunk\.stages\.3\."}
    plugin = Plugin(name="x", frameworks=("X",), archs={CONVNEXT_TINY: ""}, presets=presets)
    with pytest.raises(OpenTransError, match="trains no parameter"):  # a mode that freezes the whole tower
        plugin.selection_preset("prompt")
    selection = plugin.selection_preset("s3")  # the plugin's first architecture
    names = [n for n, _ in clip.visual.named_parameters()]
    assert selection.arch == CONVNEXT_TINY and [layer["name"] for layer in selection.layers] == names
    assert selection.trainable == [n for n in names if n.startswith("trunk.stages.3.")]
    assert selection.policy["trainable_params"] == sum(p.numel() for n, p in clip.visual.named_parameters()
                                                       if n.startswith("trunk.stages.3."))
    assert plugin.describe()["presets"] == presets
