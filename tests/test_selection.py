"""LayerSelection policies, JSON manifest and applying a selection to a real framework-shaped model."""

from __future__ import annotations

import json

import pytest
import torch
from support.towers import make_tiny_resnet
from torch import nn

from opentrans_hub.errors import OpenTransError
from opentrans_hub.formats.selection import LayerSelection
from opentrans_hub.methods.select import select_layers
from opentrans_hub.methods.spectral import compute_metrics
from opentrans_hub.naming.namemap import NameMap


def layers(alphas, params=None):
    params = params or [100] * len(alphas)
    return [{"name": f"l{i}.weight", "alpha": a, "D": 0.1, "num_eigs": 50, "num_params": p}
            for i, (a, p) in enumerate(zip(alphas, params))]


def trainable(selection):
    return [layer["name"] for layer in selection.layers if layer["trainable"]]


# ------------------------------------------------------------------------------------------- policies
def test_median_freezes_below_median_and_keeps_median_layer_trainable():
    sel = select_layers(layers([3.0, 1.0, 2.0, 5.0, 4.0]), "median")
    assert trainable(sel) == ["l0.weight", "l3.weight", "l4.weight"]  # 3.0 is the median: trains
    assert sel.policy["median"] == 3.0
    even = select_layers(layers([1.0, 4.0, 2.0, 3.0]), "median")
    assert trainable(even) == ["l1.weight", "l3.weight"] and even.policy["median"] == 2.5


def test_fraction_count_and_budget():
    alphas, sizes = [2.0, 6.0, 4.0, 5.0, 3.0], [10, 500, 40, 30, 20]
    assert trainable(select_layers(layers(alphas), "fraction", fraction=0.4)) == ["l1.weight", "l3.weight"]
    assert trainable(select_layers(layers(alphas), "count", count=3)) == ["l1.weight", "l2.weight", "l3.weight"]
    budget = select_layers(layers(alphas, sizes), "budget", max_params=100)
    # 6.0 (500) does not fit and is skipped; 5.0 (30) + 4.0 (40) + 3.0 (20) = 90 fit; 2.0 (10) would be 100: fits
    assert trainable(budget) == ["l0.weight", "l2.weight", "l3.weight", "l4.weight"]
    assert budget.policy["used_params"] == 100
    with pytest.raises(OpenTransError, match="fraction"):
        select_layers(layers(alphas), "fraction", fraction=1.5)
    with pytest.raises(OpenTransError, match="policy"):
        select_layers(layers(alphas), "random")


def test_ties_keep_network_order_and_layers_without_alpha_train():
    sel = select_layers(layers([2.0, 2.0, 2.0, float("nan")]), "count", count=1)
    assert trainable(sel) == ["l0.weight", "l3.weight"]
    assert sel.layers[3]["alpha"] is None  # JSON has no NaN
    json.loads(sel.to_json())


def test_manifest_round_trip_hash_and_reselect(tmp_path):
    metrics = compute_metrics(make_tiny_resnet())
    sel = select_layers(metrics, "median", arch="open_clip/RN50", weights_sha256="ab" * 32,
                        provenance={"method": "spectral", "settings": {"xmin": "peak"}})
    path = sel.save(tmp_path / "sel.json")
    back = LayerSelection.load(path, expected_sha256=sel.sha256)
    assert back.layers == json.loads(sel.to_json())["layers"]
    assert back.arch == "open_clip/RN50" and back.policy == sel.policy and back.weights_sha256 == "ab" * 32
    for layer in back.layers:
        assert {"name", "alpha", "D", "num_eigs", "trainable", "param", "num_params"} <= set(layer)
    assert back.reselect("median").sha256 == sel.sha256
    count = back.reselect("count", count=2)
    assert len(count.trainable) == 2 and count.arch == "open_clip/RN50" and count.sha256 != sel.sha256
    data = json.loads(path.read_text())
    data["layers"][0]["trainable"] = not data["layers"][0]["trainable"]
    path.write_text(json.dumps(data))
    with pytest.raises(OpenTransError, match="hash mismatch"):
        LayerSelection.load(path)


# ------------------------------------------------------------------------------------------- apply
class Framework(nn.Module):
    """A segmentation-model shape: a CLIP tower under ``backbone.clip.visual``, a decoder beside it."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.clip = nn.Module()
        self.backbone.clip.visual = make_tiny_resnet()
        for module in self.backbone.clip.visual.modules():  # open_clip zero-inits bn3: give every branch a gradient
            if isinstance(module, nn.BatchNorm2d):
                nn.init.uniform_(module.weight, 0.5, 1.5)
        self.decoder = nn.Sequential(nn.Linear(32, 16), nn.LayerNorm(16), nn.Linear(16, 3))

    def forward(self, x):
        return self.decoder(self.backbone.clip.visual(x))


@pytest.fixture
def selection():
    return select_layers(compute_metrics(make_tiny_resnet()), "median", arch="open_clip/RN50")


def test_apply_through_name_map_freezes_inside_the_tower_only(selection):
    model = Framework()
    report = selection.apply(model, NameMap.prefix("backbone.clip.visual."))
    params = dict(model.named_parameters())
    assert report.scope == "backbone.clip.visual."
    assert len(report.mapped) == len(selection.layers) and not report.unmapped
    for layer in selection.layers:
        assert params["backbone.clip.visual." + layer["name"]].requires_grad == layer["trainable"]
    tower = "backbone.clip.visual."
    # biases follow their weight; norms and the remaining tower parameters freeze; the decoder is untouched
    q_trains = selection.is_trainable("attnpool.q_proj.weight")
    assert params[tower + "attnpool.q_proj.bias"].requires_grad == q_trains
    assert not params[tower + "bn1.weight"].requires_grad
    assert not params[tower + "attnpool.positional_embedding"].requires_grad
    assert all(p.requires_grad for n, p in params.items() if n.startswith("decoder."))
    assert report.trainable_after == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert report.trainable_before == report.total_params > report.trainable_after


def test_apply_options_and_training_step(selection):
    model = Framework()
    selection.apply(model, NameMap.prefix("backbone.clip.visual."), biases="train", norms="train", others="keep")
    params = dict(model.named_parameters())
    tower = "backbone.clip.visual."
    assert params[tower + "bn1.weight"].requires_grad and params[tower + "attnpool.positional_embedding"].requires_grad
    frozen = [n for n in selection.frozen]
    assert all(params[tower + n.removesuffix(".weight") + ".bias"].requires_grad
               for n in frozen if tower + n.removesuffix(".weight") + ".bias" in params)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    before = {n: p.detach().clone() for n, p in params.items()}
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    opt.step()
    for name in frozen:
        assert params[tower + name].grad is None
        assert torch.equal(params[tower + name], before[tower + name])
    for name in selection.trainable:
        assert not torch.equal(params[tower + name], before[tower + name])
    with pytest.raises(OpenTransError, match="norms"):
        selection.apply(model, NameMap.prefix(tower), norms="sometimes")


def test_apply_with_rename_rules_strict_and_all_or_nothing(selection):
    model = Framework()
    # a framework that calls the stages res2..res5 (detectron2 style) and has no attention pool
    renamed = nn.Module()
    renamed.stem = model.backbone.clip.visual
    name_map = NameMap.parse(["rename ^(conv\\d|bn\\d)\\. -> stem.{g1}.",
                              "rename ^layer(\\d)\\. -> stem.layer{g1}.",
                              "drop ^attnpool\\."])
    report = selection.apply(renamed, name_map)
    assert {s for s, _ in report.dropped} == {n for n in selection.params if n.startswith("attnpool.")}
    assert report.scope == "stem."
    flags = {n: p.requires_grad for n, p in renamed.named_parameters()}
    with pytest.raises(OpenTransError, match="strict"):
        selection.apply(renamed, NameMap.parse(["rename ^layer(\\d)\\. -> stem.layer{g1}."]), strict=True)
    assert flags == {n: p.requires_grad for n, p in renamed.named_parameters()}  # nothing changed
    with pytest.raises(OpenTransError, match="no layer"):
        selection.apply(renamed, NameMap.prefix("nowhere."))
    assert flags == {n: p.requires_grad for n, p in renamed.named_parameters()}


def test_split_attention_parts_train_their_parameter_if_any_part_trains():
    model = nn.Module()
    model.attn = nn.MultiheadAttention(24, 4)
    model.fc = nn.Linear(24, 24)
    metrics = compute_metrics(model)
    assert [m.name for m in metrics][:3] == [f"attn.in_proj_weight:{p}" for p in "qkv"]
    rows = [m.to_dict() for m in metrics]
    for row, alpha in zip(rows, [1.0, 9.0, 1.5, 2.0]):
        row["alpha"] = alpha
    sel = select_layers(rows, "count", count=1)
    assert sel.trainable == ["attn.in_proj_weight:k"]
    assert sel.params == {"attn.in_proj_weight": True, "attn.out_proj.weight": False, "fc.weight": False}
    sel.apply(model)
    assert model.attn.in_proj_weight.requires_grad and model.attn.in_proj_bias.requires_grad
    assert not model.fc.weight.requires_grad and not model.fc.bias.requires_grad
