"""hubconf.py through torch.hub itself: ``load(dir, ..., source="local")`` and ``list``/``help`` on a cached repo."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support.hubserver import refuse_non_loopback
from support.towers import make_tiny_resnet

from opentrans_hub import LayerSelection, OpenTransError
from opentrans_hub.methods.imp import magnitude_prune
from opentrans_hub.sparsity.masks import masked_parameters
from opentrans_hub.towers.backbones import build_visual, timm_to_canonical
from opentrans_hub.zoo.registry import Registry

REPO = Path(__file__).resolve().parent.parent
ENTRYPOINTS = ["clip_backbone", "layer_selection", "subnetwork"]


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    refuse_non_loopback(monkeypatch)


@pytest.fixture(scope="module")
def rn50_files(tmp_path_factory):
    """A random-init RN50 tower saved as a weights file, and a 60 % subnetwork of it (test fixtures)."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("rn50")
    torch.manual_seed(1)
    tower = build_visual("open_clip/RN50")
    weights = folder / "rn50.safetensors"
    save_file(tower.state_dict(), str(weights))
    sub = magnitude_prune(tower, sparsity=0.6, arch="open_clip/RN50", apply=False)
    path = sub.save(folder / "rn50-sub.safetensors")
    return weights, path, sub, {k: v.clone() for k, v in tower.state_dict().items()}


def hub_load(name: str, *args, **kwargs):
    return torch.hub.load(str(REPO), name, *args, source="local", **kwargs)


def test_clip_backbone_from_local_weights_and_registry_subnetwork(rn50_files, tmp_path, monkeypatch):
    weights, path, sub, state = rn50_files
    monkeypatch.setenv("OPENTRANS_HUB_HOME", str(tmp_path / "home"))
    Registry().add(path, "rn50-test")
    tower = hub_load("clip_backbone", arch="RN50", pretrained=str(weights), subnetwork="rn50-test")
    params = dict(tower.named_parameters())
    for name, keep in sub.masks.items():
        assert torch.equal(params[name].detach()[~keep], torch.zeros(int((~keep).sum())))
        assert torch.equal(params[name].detach()[keep], state[name][keep])
    assert masked_parameters(tower) == {}  # baked: plain modules
    assert tower.opentrans_subnetwork["sha256"] == sub.sha256

    exact = hub_load("clip_backbone", arch="open_clip/RN50", pretrained=str(weights), subnetwork=str(path),
                     exact=True)
    assert set(masked_parameters(exact)) == set(sub.masks)
    name = "layer2.0.downsample.0.weight"  # open_clip zero-inits bn3, so in-block convs get no gradient yet
    opt = torch.optim.SGD(exact.parameters(), lr=0.1, momentum=0.9)
    exact.train()
    exact(torch.randn(1, 3, 224, 224)).square().sum().backward()
    opt.step()
    weight = dict(exact.named_parameters())[name].detach()
    assert torch.equal(weight[~sub[name]], torch.zeros(int((~sub[name]).sum())))
    assert not torch.equal(weight[sub[name]], state[name][sub[name]])  # the kept weights did train


def test_subnetwork_and_selection_entrypoints(rn50_files, tmp_path):
    _, path, sub, _ = rn50_files
    assert hub_load("subnetwork", str(path)).sha256 == sub.sha256
    names = [n for n, p in make_tiny_resnet().named_parameters() if p.dim() == 4]
    sel = LayerSelection([{"name": n, "trainable": i % 3 == 0} for i, n in enumerate(names)], arch="test/tiny")
    sel_path = sel.save(tmp_path / "sel.json")
    assert hub_load("layer_selection", str(sel_path)).sha256 == sel.sha256
    with pytest.raises(OpenTransError, match="no such file"):
        hub_load("subnetwork", str(tmp_path / "missing.safetensors"))


def test_clip_backbone_with_selection(rn50_files, tmp_path):
    weights, _, _, _ = rn50_files
    convs = [n for n, p in build_visual("open_clip/RN50").named_parameters() if p.dim() == 4]
    sel = LayerSelection([{"name": n, "trainable": i % 2 == 0} for i, n in enumerate(convs)], arch="open_clip/RN50")
    sel_path = str(sel.save(tmp_path / "s.json"))
    tower = hub_load("clip_backbone", arch="RN50", pretrained=str(weights), selection=sel_path)
    params = dict(tower.named_parameters())
    assert [n for n in convs if params[n].requires_grad] == sel.trainable
    assert not any(p.requires_grad for n, p in params.items() if ".bn" in n or n.startswith("bn"))  # norms frozen
    assert tower.opentrans_selection["sha256"] == sel.sha256


def test_timm_clip_resnet_tower(rn50_files, tmp_path):
    import timm
    from safetensors.torch import save_file

    _, path, sub, _ = rn50_files
    torch.manual_seed(2)
    reference = timm.create_model("resnet50_clip").eval()
    timm_file = tmp_path / "timm-rn50.safetensors"
    save_file(reference.state_dict(), str(timm_file))  # timm's own names
    tower = hub_load("clip_backbone", arch="timm/resnet50_clip", pretrained=str(timm_file))
    assert "layer1.0.conv1.weight" in dict(tower.named_parameters())  # canonical open_clip names
    image = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(tower(image), reference(image), atol=1e-5)
    pruned = hub_load("clip_backbone", arch="timm/resnet50_clip", pretrained=str(timm_file), subnetwork=str(path))
    canonical = timm_to_canonical(reference.state_dict(), pruned.state_dict())
    zeros = dict(pruned.named_parameters())["layer3.1.conv2.weight"].detach()
    keep = sub["layer3.1.conv2.weight"]
    assert torch.equal(zeros[keep], canonical["layer3.1.conv2.weight"][keep]) and not zeros[~keep].any()
    with pytest.raises(OpenTransError, match="no attention-pool head"):
        hub_load("clip_backbone", arch="timm/resnet50_clip_gap")


def test_torch_hub_list_and_help_on_cached_repo(tmp_path, monkeypatch):
    """torch.hub.list/help take a GitHub 'owner/repo:ref'; with the repo in torch.hub's cache folder they
    read that copy and never download (the same path a user's second call takes)."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "someone_opentrans-hub_main").symlink_to(REPO, target_is_directory=True)
    listed = torch.hub.list("someone/opentrans-hub:main", trust_repo=True, verbose=False)
    assert sorted(listed) == ENTRYPOINTS
    doc = torch.hub.help("someone/opentrans-hub:main", "clip_backbone", trust_repo=True)
    assert "CLIP image encoder" in doc and "subnetwork" in doc
    for name in ENTRYPOINTS:
        assert torch.hub.help("someone/opentrans-hub:main", name, trust_repo=True).strip()
    module = torch.hub._import_module("hubconf", str(REPO / "hubconf.py"))
    torch.hub._check_dependencies(module)  # every listed dependency imports here
