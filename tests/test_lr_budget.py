"""Learning-rate budgets: alpha -> lr scale, the scales in the selection manifest, and param_groups driving a real
optimizer step (plain PyTorch), checked against hand-computed values."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
from support.layouts import Box, place
from support.towers import make_tiny_resnet
from torch import nn

import opentrans_hub as oth
from opentrans_hub import OpenTransError, OpenTransWarning
from opentrans_hub.formats.selection import LayerSelection
from opentrans_hub.methods.lr_budget import alpha_lr_scales, budget_summary, check_lr_range, extreme_layers
from opentrans_hub.methods.select import select_layers
from opentrans_hub.methods.spectral import compute_metrics
from opentrans_hub.naming.namemap import NameMap


def rows(alphas, sizes=None):
    sizes = sizes or [100] * len(alphas)
    return [{"name": f"l{i}.weight", "alpha": a, "num_params": n} for i, (a, n) in enumerate(zip(alphas, sizes))]


# ------------------------------------------------------------------------------------------- the formula
def test_scales_are_linear_in_alpha_between_lo_and_hi():
    # alpha 2 is the lowest (0.5), 4 the highest (1.5), 3 halfway (1.0); no alpha -> 1.0
    assert alpha_lr_scales([2.0, 4.0, None, 3.0]) == [0.5, 1.5, 1.0, 1.0]
    # range 1..3 over alphas 1..5: alpha 2 is a quarter of the way -> 1 + 2 * 0.25 = 1.5
    assert alpha_lr_scales([1.0, 5.0, 2.0, float("nan")], (1.0, 3.0)) == [1.0, 3.0, 1.5, 1.0]
    assert alpha_lr_scales([2.5, 4.5], (0.2, 0.2)) == [0.2, 0.2]


def test_equal_alphas_and_a_single_alpha_take_the_midpoint():
    assert alpha_lr_scales([3.0, 3.0, None], (0.5, 1.5)) == [1.0, 1.0, 1.0]
    assert alpha_lr_scales([7.0], (1.0, 2.0)) == [1.5]
    assert alpha_lr_scales([None, None]) == [1.0, 1.0]


@pytest.mark.parametrize("bad", [(0.0, 1.0), (-1.0, 1.0), (2.0, 1.0), (float("nan"), 1.0), (1.0, float("inf")),
                                 ("a", 1.0), (1.0,), None])
def test_lr_range_is_validated(bad):
    with pytest.raises(OpenTransError, match="lr range"):
        check_lr_range(bad)
    if bad is not None:  # to select_layers None means "no scales"
        with pytest.raises(OpenTransError, match="lr range"):
            select_layers(rows([1.0, 2.0]), "median", lr_range=bad)


def test_alpha_lr_policy_trains_every_layer_with_its_scale():
    sel = select_layers(rows([2.0, 4.0, None, 3.0]), "alpha-lr")
    assert sel.trainable == ["l0.weight", "l1.weight", "l2.weight", "l3.weight"]
    assert [layer["lr_scale"] for layer in sel.layers] == [0.5, 1.5, 1.0, 1.0]
    assert sel.policy["lr_range"] == [0.5, 1.5] and sel.policy["alpha_range"] == [2.0, 4.0]
    wide = select_layers(rows([2.0, 4.0, None, 3.0]), "alpha-lr", lr_range=(1.0, 2.0))
    assert [layer["lr_scale"] for layer in wide.layers] == [1.0, 2.0, 1.0, 1.5]


def test_scales_on_top_of_another_policy_keep_its_frozen_layers():
    # median of 1, 2, 3, 5 is 2.5: l0 (1) and l1 (2) freeze; the scales spread over all four alphas
    sel = select_layers(rows([1.0, 2.0, 3.0, 5.0, None]), "median", lr_range=(0.5, 1.5))
    assert [layer["trainable"] for layer in sel.layers] == [False, False, True, True, True]
    assert [layer["lr_scale"] for layer in sel.layers] == [0.5, 0.75, 1.0, 1.5, 1.0]
    plain = select_layers(rows([1.0, 2.0, 3.0, 5.0, None]), "median")
    assert not any("lr_scale" in layer for layer in plain.layers) and not plain.has_lr_scales
    assert sel.sha256 != plain.sha256  # the budget is part of the identity
    assert sel.reselect("median").sha256 == plain.sha256  # reselecting without a range drops the scales
    # trainable l2 (1.0, 100 weights), l3 (1.5, 100), l4 (1.0, 100): mean 3.5 / 3
    assert budget_summary(sel).endswith(f"{3.5 / 3:.3f}") and "0.500..1.500" in budget_summary(sel)
    top, bottom = extreme_layers(sel, 2)
    assert [x["name"] for x in top] == ["l3.weight", "l2.weight"]
    assert [x["name"] for x in bottom] == ["l0.weight", "l1.weight"]


# ------------------------------------------------------------------------------------------- the manifest
def _v2_hash(arch, entries):
    canonical = json.dumps(sorted(entries), separators=(",", ":"))
    head = b"opentrans-hub/layer-selection/v2\0" + arch.encode() + b"\0"
    return hashlib.sha256(head + canonical.encode()).hexdigest()


def test_manifest_round_trip_and_identity_covers_the_scales(tmp_path):
    sel = select_layers(rows([2.0, 4.0, 3.0]), "alpha-lr", arch="unknown")
    back = LayerSelection.load(sel.save(tmp_path / "s.json"), expected_sha256=sel.sha256)
    assert [layer["lr_scale"] for layer in back.layers] == [0.5, 1.5, 1.0]
    # a scale of 1.0 is not hashed (same identity as no scale); the others are
    assert sel.sha256 == _v2_hash("unknown", [["l0.weight", True, 0.5], ["l1.weight", True, 1.5],
                                                     ["l2.weight", True]])
    data = json.loads((tmp_path / "s.json").read_text())
    data["layers"][1]["lr_scale"] = 1.25
    (tmp_path / "t.json").write_text(json.dumps(data))
    with pytest.raises(OpenTransError, match="hash mismatch"):
        LayerSelection.load(tmp_path / "t.json")


def test_a_manifest_without_scales_still_reads_and_means_one(tmp_path):
    layers = [{"name": "l0.weight", "trainable": True}, {"name": "l1.weight", "trainable": False}]
    old = {"format": "opentrans-hub/layer-selection", "format_version": 1, "arch": "unknown",
           "policy": {"name": "median"}, "provenance": {}, "weights_sha256": None, "layers": layers,
           "sha256": _v2_hash("unknown", [["l0.weight", True], ["l1.weight", False]])}
    (tmp_path / "old.json").write_text(json.dumps(old))
    sel = LayerSelection.load(tmp_path / "old.json")
    assert sel.lr_scales == {"l0.weight": 1.0, "l1.weight": 1.0} and sel.lr_scale("l1.weight") == 1.0
    explicit = LayerSelection([{**layer, "lr_scale": 1} for layer in layers], arch="unknown")
    assert explicit.sha256 == sel.sha256 and explicit.layers[0]["lr_scale"] == 1.0


@pytest.mark.parametrize("bad", [0, -0.5, "1.5", True, None, "NaN", "Infinity", 10 ** 400, [1.0]])
def test_bad_scales_are_refused_naming_file_and_layer(tmp_path, bad):
    sel = select_layers(rows([2.0, 4.0]), "alpha-lr")
    data = json.loads(sel.to_json())  # a copy: to_dict shares the layer objects
    data["layers"][1]["lr_scale"] = bad
    text = json.dumps(data)
    if bad in ("NaN", "Infinity"):  # what Python's json writes for them (and reads back as floats)
        text = text.replace(f'"{bad}"', bad)
    (tmp_path / "bad.json").write_text(text)
    with pytest.raises(OpenTransError, match="lr_scale.*finite number > 0") as info:
        LayerSelection.load(tmp_path / "bad.json", verify=False)
    assert "bad.json" in str(info.value) and "l1.weight" in str(info.value)


# ------------------------------------------------------------------------------------------- param_groups
class Net(nn.Module):
    """A tower of three Linear layers under ``enc.``, a head outside the selection."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4), nn.Linear(4, 4))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.enc(x)))


def _budget() -> LayerSelection:
    # alphas 2, 4, 3 over (0.5, 1.5): scales 0.5, 1.5, 1.0 by hand
    return select_layers([{"name": f"{i}.weight", "alpha": a} for i, a in enumerate([2.0, 4.0, 3.0])], "alpha-lr")


def test_sgd_step_moves_each_parameter_by_lr_times_scale_times_grad():
    torch.manual_seed(0)
    model, lr = Net(), 0.1
    groups = oth.param_groups(model, _budget(), lr, name_map=NameMap.prefix("enc."))
    listed = [p for g in groups for p in g["params"]]
    assert len(listed) == len({id(p) for p in listed}) == len(list(model.parameters()))
    expected = {"enc.0.weight": 0.5, "enc.0.bias": 0.5, "enc.1.weight": 1.5, "enc.1.bias": 1.5,
                "enc.2.weight": 1.0, "enc.2.bias": 1.0, "head.weight": 1.0, "head.bias": 1.0}
    group_of = {id(p): g for g in groups for p in g["params"]}
    for name, param in model.named_parameters():
        assert group_of[id(param)]["lr"] == lr * expected[name], name
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(groups, lr=123.0)  # the groups' lr wins over the default
    model(torch.randn(8, 6)).pow(2).sum().backward()
    opt.step()
    for name, param in model.named_parameters():
        step = before[name] - param.detach()
        assert torch.allclose(step, lr * expected[name] * param.grad, rtol=1e-5, atol=1e-7), name
        assert param.grad.abs().sum() > 0


def test_groups_carry_the_optimizer_options_and_adamw_takes_them():
    model = Net()
    groups = oth.param_groups(model, _budget(), 1e-3, name_map=NameMap.prefix("enc."), weight_decay=0.05)
    assert sorted(g["lr_scale"] for g in groups) == [0.5, 1.0, 1.5]
    assert all(g["weight_decay"] == 0.05 for g in groups)
    opt = torch.optim.AdamW(groups)
    assert sorted(g["lr"] for g in opt.param_groups) == [5e-4, 1e-3, 1.5e-3]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)  # schedulers keep the ratios
    assert sorted(g["lr"] for g in opt.param_groups) == [2.5e-4, 5e-4, 7.5e-4]
    assert sched.get_last_lr()
    with pytest.raises(OpenTransError, match="lr_scale, params cannot be an optimizer option"):
        oth.param_groups(model, _budget(), 1e-3, name_map=NameMap.prefix("enc."), params=[], lr_scale=2.0)


def test_frozen_parameters_are_left_out_and_a_frozen_layer_that_still_trains_warns():
    sel = select_layers([{"name": f"{i}.weight", "alpha": a} for i, a in enumerate([2.0, 4.0, 3.0])], "median",
                        lr_range=(0.5, 1.5))
    assert [layer["trainable"] for layer in sel.layers] == [False, True, True]
    model = Net()
    with pytest.warns(OpenTransWarning, match="1 parameter.*enc.0.weight.*apply_selection"):
        oth.param_groups(model, sel, 0.1, name_map=NameMap.prefix("enc."))
    oth.apply_selection(model, sel, NameMap.prefix("enc."))
    groups = oth.param_groups(model, sel, 0.1, name_map=NameMap.prefix("enc."))
    listed = {id(p) for g in groups for p in g["params"]}
    assert id(model.enc[0].weight) not in listed and id(model.enc[0].bias) not in listed
    assert listed == {id(p) for p in model.parameters() if p.requires_grad}


def test_nothing_mapped_nothing_trainable_and_both_maps_are_errors():
    model = Net()
    with pytest.raises(OpenTransError, match="none of the 3 selection names"):
        oth.param_groups(model, _budget(), 0.1)  # no name map: '0.weight' is not a parameter of Net
    with pytest.raises(OpenTransError, match="not both"):
        oth.param_groups(model, _budget(), 0.1, name_map=NameMap(), plugin="fcclip")
    with pytest.raises(OpenTransError, match="lr must be"):
        oth.param_groups(model, _budget(), float("nan"), name_map=NameMap.prefix("enc."))
    model.requires_grad_(False)
    with pytest.raises(OpenTransError, match="nothing to optimize"):
        oth.param_groups(model, _budget(), 0.1, name_map=NameMap.prefix("enc."))


def test_split_attention_parts_share_one_parameter_at_their_mean_scale():
    model = nn.Module()
    model.attn = nn.MultiheadAttention(24, 4)
    metrics = [m.to_dict() for m in compute_metrics(model)]
    assert [m["name"] for m in metrics] == [f"attn.in_proj_weight:{p}" for p in "qkv"] + ["attn.out_proj.weight"]
    for row, alpha in zip(metrics, [1.0, 3.0, 2.0, 5.0]):
        row["alpha"] = alpha
    sel = select_layers(metrics, "alpha-lr", lr_range=(1.0, 2.0))  # q 1.0, k 1.5, v 1.25, out 2.0
    groups = oth.param_groups(model, sel, 1.0)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert lr_of[id(model.attn.in_proj_weight)] == lr_of[id(model.attn.in_proj_bias)] == (1.0 + 1.5 + 1.25) / 3
    assert lr_of[id(model.attn.out_proj.weight)] == lr_of[id(model.attn.out_proj.bias)] == 2.0


def test_a_plugin_maps_the_budget_onto_the_framework_names():
    tower = make_tiny_resnet()
    sel = select_layers(compute_metrics(tower), "alpha-lr", arch="open_clip/RN50")
    model = place(Box(), "backbone.clip_model.visual", tower)
    model.decoder = nn.Linear(4, 4)
    groups = oth.param_groups(model, sel, 0.01, plugin="fcclip")
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    params = dict(model.named_parameters())
    alphas = [layer["alpha"] for layer in sel.layers if layer["alpha"] is not None]
    low, high = min(alphas), max(alphas)
    for layer in sel.layers:
        alpha = layer["alpha"]
        scale = 1.0 if alpha is None else 0.5 + (alpha - low) / (high - low)
        assert math.isclose(lr_of[id(params["backbone.clip_model.visual." + layer["name"]])], 0.01 * scale)
    assert lr_of[id(model.decoder.weight)] == 0.01
    with pytest.raises(OpenTransError, match="nothing was applied"):
        oth.param_groups(Net(), sel, 0.01, plugin="fcclip")
