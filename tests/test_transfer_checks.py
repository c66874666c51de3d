"""Issue 12 items 1-3: an apply that maps nothing (or far too little), a plugin name claimed twice, and a
subnetwork of another architecture are errors before anything changes, not "mapped 0" with exit 0."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.cli import assert_refused, cli_env, command
from support.processes import install_copy, python_env
from support.towers import make_tiny_resnet

from opentrans_hub import OpenTransError, Subnetwork, get_plugin, load_backbone, masked_parameters
from opentrans_hub.towers.archs import canonical_tensors
from opentrans_hub.towers.backbones import build_visual

PREFIX = "backbone.clip_model.visual."
FIXTURE = Path(__file__).parent / "fixtures" / "oth-dup-plugin"


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("transfer")
    tower = make_tiny_resnet()
    gen = torch.Generator().manual_seed(0)
    masks = {n: torch.rand(p.shape, generator=gen) > 0.5 for n, p in tower.named_parameters() if p.dim() == 4}
    Subnetwork(masks, arch="open_clip/RN50").save(root / "sub.safetensors")
    from opentrans_hub import LayerSelection

    LayerSelection([{"name": n, "trainable": i % 2 == 0} for i, n in enumerate(masks)],
                   arch="open_clip/RN50").save(root / "sel.json")
    state = {PREFIX + k: v for k, v in tower.state_dict().items()}
    torch.save({"model": state}, root / "fcclip.pth")
    few = {k: v for k, v in state.items() if ".layer1." in k or k.endswith("conv1.weight")}
    torch.save({"model": few}, root / "partial.pth")  # a checkpoint holding a sliver of the tower
    return root


@pytest.mark.slow
def test_wrong_plugin_maps_nothing_and_names_the_right_one(ws):
    line = assert_refused(ws, "apply", "--plugin", "hanovs", "--subnetwork", "sub.safetensors", "--checkpoint",
                          "fcclip.pth", "--out", "o.pth", needles=("nothing was applied", "plugin 'fcclip'"))
    assert "none of the" in line
    assert_refused(ws, "apply", "--plugin", "deeplabv3-d2", "--selection", "sel.json", "--checkpoint", "fcclip.pth",
                   "--out", "o.json", needles=("nothing was applied", "plugin 'fcclip'"))
    assert_refused(ws, "apply", "--plugin", "fcclip", "--subnetwork", "sub.safetensors", "--checkpoint", "partial.pth",
                   "--out", "o.pth", needles=("nothing was applied", "only"))


def test_wrong_plugin_raises_in_the_api(ws, tmp_path):
    model = torch.nn.Module()
    model.backbone = torch.nn.Module()
    model.backbone.clip_model = torch.nn.Module()
    model.backbone.clip_model.visual = make_tiny_resnet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(OpenTransError, match="nothing was applied.*plugin 'fcclip'"):
        get_plugin("hanovs").apply(model, ws / "sub.safetensors")
    assert masked_parameters(model) == {} and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(OpenTransError, match="nothing was applied"):
        get_plugin("hanovs").apply_checkpoint(ws / "fcclip.pth", ws / "sub.safetensors", tmp_path / "o.pth")
    assert not (tmp_path / "o.pth").exists()
    report = get_plugin("fcclip").apply(model, str(ws / "sub.safetensors"))  # the right one works, by path
    assert len(report.mapped) == len(Subnetwork.load(ws / "sub.safetensors"))


@pytest.fixture(scope="module")
def dup_site(tmp_path_factory) -> Path:
    return install_copy(FIXTURE, tmp_path_factory.mktemp("dup"))


def test_a_plugin_name_claimed_twice_is_an_error_wherever_it_is_used(dup_site, ws):
    env = {"PYTHONPATH": python_env(dup_site)["PYTHONPATH"]}
    line = assert_refused(ws, "apply", "--plugin", "fcclip", "--subnetwork", "sub.safetensors", "--checkpoint",
                          "fcclip.pth", "--out", "o.pth", env=env, needles=("duplicate plugin name",))
    assert "opentrans-hub-fcclip" in line and "oth-dup-plugin 1.0.0" in line
    assert_refused(ws, "plugins", "check", "fcclip", "--checkpoint", "fcclip.pth", env=env,
                   needles=("duplicate plugin name", "oth-dup-plugin"))
    listing = subprocess.run(command() + ["plugins", "list"], capture_output=True, text=True, cwd=ws, timeout=300,
                             env=cli_env(ws, **env))
    assert listing.returncode == 0
    broken = [line for line in listing.stdout.splitlines() if line.startswith("BROKEN fcclip")]
    assert len(broken) == 2 and all("duplicate plugin name" in line for line in broken)
    script = ("from opentrans_hub.transfer.discovery import get_plugin\n"
              "try:\n    get_plugin('fcclip')\nexcept Exception as e:\n    print(type(e).__name__, e)\n")
    api = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env=cli_env(ws, **env))
    assert api.stdout.startswith("OpenTransError") and "oth-dup-plugin" in api.stdout, api.stderr


@pytest.fixture(scope="module")
def rn50_sub() -> Subnetwork:
    """Random masks over RN50's conv weights but the first, built from meta shapes (no RN50 weights needed)."""
    gen = torch.Generator().manual_seed(0)
    convs = [(n, t.shape) for n, t in canonical_tensors("open_clip/RN50").items() if t.dim() == 4][1:]
    return Subnetwork({n: torch.rand(s, generator=gen) > 0.89 for n, s in convs}, arch="open_clip/RN50")


@pytest.mark.slow  # builds RN101 twice (random init)
def test_rn50_subnetwork_on_an_rn101_tower_is_refused(rn50_sub):
    with pytest.raises(OpenTransError, match="subnetwork is for open_clip/RN50.*RN101"):
        load_backbone("RN101", subnetwork=rn50_sub)
    torch.manual_seed(0)
    tower = build_visual("open_clip/RN101")
    model = torch.nn.Module()
    model.backbone = torch.nn.Module()
    model.backbone.clip_model = torch.nn.Module()
    model.backbone.clip_model.visual = tower
    before = {k: v.clone() for k, v in tower.state_dict().items()}
    with pytest.raises(OpenTransError, match="no counterpart in open_clip/RN50.*layer3.6.conv1.weight"):
        get_plugin("fcclip").apply(model, rn50_sub, strict=True)
    assert masked_parameters(model) == {} and all(torch.equal(v, before[k]) for k, v in tower.state_dict().items())
    # said explicitly: applied, and exactly the blocks RN50 lacks are reported dense
    report = get_plugin("fcclip").apply(model, rn50_sub, strict=True, allow_partial=True)
    extra = sorted(f"{PREFIX}{n}" for n, p in tower.named_parameters()
                   if p.dim() == 4 and n.startswith("layer3.") and int(n.split(".")[1]) >= 6)
    assert sorted(report.uncovered) == extra and len(extra) == 17 * 3
    assert len(report.mapped) == len(rn50_sub)


def test_model_sparsity_counts_zeros_of_a_baked_tower_loaded_through_torch_hub(rn50_sub, tmp_path):
    """Issue 12 item 4: a tower baked with an 89 % subnetwork has no masks left; its zeros still count."""
    from opentrans_hub import count_zeros, model_sparsity

    rn50_sub.save(tmp_path / "rn50.safetensors")
    repo = Path(__file__).resolve().parents[1]
    tower = torch.hub.load(str(repo), "clip_backbone", source="local", arch="RN50",
                           subnetwork=str(tmp_path / "rn50.safetensors"))
    assert masked_parameters(tower) == {}  # baked: plain modules
    overall = model_sparsity(tower)
    zeros = count_zeros(tower)
    assert overall["scope"] == "weights" and overall["zeros"] == zeros["zeros"] >= rn50_sub.masked
    assert overall["sparsity"] == zeros["sparsity"] > 0.5
    within = model_sparsity(tower, names=list(rn50_sub))
    assert within["scope"] == "names" and within["sparsity"] >= rn50_sub.sparsity > 0.88


def test_magnitude_prune_warns_when_layers_are_pruned_away():
    from opentrans_hub import magnitude_prune
    from opentrans_hub.errors import OpenTransWarning

    with pytest.warns(OpenTransWarning, match="pruned away entirely"):
        magnitude_prune(make_tiny_resnet(), sparsity=0.995, apply=False)


def test_refs_are_accepted_wherever_an_object_is(ws):
    from opentrans_hub import apply_selection, apply_subnetwork, apply_subnetwork_to_state_dict

    tower = make_tiny_resnet()
    report = apply_subnetwork(tower, str(ws / "sub.safetensors"))
    assert len(report.mapped) == len(Subnetwork.load(ws / "sub.safetensors"))
    _, report = apply_subnetwork_to_state_dict(make_tiny_resnet().state_dict(), ws / "sub.safetensors")
    assert report.mapped
    assert apply_selection(make_tiny_resnet(), ws / "sel.json").trainable
    with pytest.warns(DeprecationWarning, match="argument order"):  # the 0.2 order still works, with a word
        assert apply_selection(ws / "sel.json", make_tiny_resnet()).trainable
