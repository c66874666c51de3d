"""MODEL.OPENTRANS.LR_SCALES and opentrans_build_optimizer on a real yacs CfgNode and real torch optimizers, built
the way detectron2's build_optimizer builds them (detectron2 itself is absent here)."""

from __future__ import annotations

import importlib

import pytest
import torch
from support.layouts import Box, place
from torch import nn
from yacs.config import CfgNode

from opentrans_hub import OpenTransError, OpenTransWarning
from opentrans_hub.formats.selection import LayerSelection
from opentrans_hub.integrations.detectron2 import add_opentrans_config, opentrans_build_optimizer
from opentrans_hub.integrations.lr_scales import apply_lr_scales, split_groups

TOWER = "backbone.clip_model.visual"


class Tower(nn.Module):
    """Two convolutions with a BatchNorm between (detectron2 gives norms their own weight decay)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.conv2(torch.relu(self.bn1(self.conv1(x))))


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = place(Box(), TOWER, Tower())
    model.head = nn.Conv2d(4, 2, 1)
    return model


def _forward(model, x):
    return model.head(model.get_submodule(TOWER)(x))


def _cfg(lr_scales: str = "") -> CfgNode:
    cfg = CfgNode()
    cfg.MODEL = CfgNode()
    cfg.SOLVER = CfgNode({"BASE_LR": 0.1, "MOMENTUM": 0.0, "NESTEROV": False, "WEIGHT_DECAY": 1e-3,
                          "WEIGHT_DECAY_NORM": 0.0, "BIAS_LR_FACTOR": 2.0, "WEIGHT_DECAY_BIAS": 1e-4})
    add_opentrans_config(cfg)
    cfg.MODEL.OPENTRANS.PREFIX = TOWER + "."
    cfg.MODEL.OPENTRANS.LR_SCALES = lr_scales
    return cfg


def d2_style_build(cfg, model):
    """detectron2's build_optimizer rules, written out: one group per parameter, norms at WEIGHT_DECAY_NORM, then
    every bias (a norm's too: the bias override comes last) at BASE_LR * BIAS_LR_FACTOR and WEIGHT_DECAY_BIAS,
    frozen parameters left out, SGD."""
    norms = (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)
    groups = []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            lr, decay = cfg.SOLVER.BASE_LR, cfg.SOLVER.WEIGHT_DECAY
            if isinstance(module, norms):
                decay = cfg.SOLVER.WEIGHT_DECAY_NORM
            if name == "bias":
                lr, decay = lr * cfg.SOLVER.BIAS_LR_FACTOR, cfg.SOLVER.WEIGHT_DECAY_BIAS
            groups.append({"params": [param], "lr": lr, "weight_decay": decay})
    return torch.optim.SGD(groups, lr=cfg.SOLVER.BASE_LR, momentum=cfg.SOLVER.MOMENTUM,
                           nesterov=cfg.SOLVER.NESTEROV, weight_decay=cfg.SOLVER.WEIGHT_DECAY)


def _budget(tmp_path, scales=(0.5, 1.5)):
    layers = [{"name": "conv1.weight", "trainable": True, "lr_scale": scales[0]},
              {"name": "conv2.weight", "trainable": True, "lr_scale": scales[1]}]
    return LayerSelection(layers, arch="unknown").save(tmp_path / "budget.json")


def test_the_key_exists_and_is_off_by_default():
    cfg = _cfg()
    assert cfg.MODEL.OPENTRANS.LR_SCALES == ""
    model = _model()
    plain = d2_style_build(cfg, model)
    built = opentrans_build_optimizer(cfg, model, build=d2_style_build)
    assert [g["lr"] for g in built.param_groups] == [g["lr"] for g in plain.param_groups]
    assert all("lr_scale" not in g for g in built.param_groups)


def test_rates_are_detectron2s_times_the_scale_and_a_step_moves_by_them(tmp_path):
    cfg, model = _cfg(str(_budget(tmp_path))), _model()
    opt = opentrans_build_optimizer(cfg, model, build=d2_style_build)
    params = dict(model.named_parameters())
    tower = TOWER + "."
    # by hand: base 0.1; biases x 2.0 (BIAS_LR_FACTOR); conv1 x 0.5, conv2 x 1.5, its bias follows its weight
    expected = {tower + "conv1.weight": (0.05, 1e-3), tower + "conv1.bias": (0.1, 1e-4),
                tower + "bn1.weight": (0.1, 0.0), tower + "bn1.bias": (0.2, 1e-4),
                tower + "conv2.weight": (0.15, 1e-3), tower + "conv2.bias": (0.3, 1e-4),
                "head.weight": (0.1, 1e-3), "head.bias": (0.2, 1e-4)}
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert len(group_of) == sum(len(g["params"]) for g in opt.param_groups) == len(params)
    for name, (lr, decay) in expected.items():
        group = group_of[id(params[name])]
        assert group["lr"] == pytest.approx(lr, rel=1e-12) and group["weight_decay"] == decay, name
    before = {n: p.detach().clone() for n, p in params.items()}
    _forward(model, torch.randn(2, 3, 8, 8)).pow(2).mean().backward()
    opt.step()
    for name, (lr, decay) in expected.items():  # plain SGD: p -= lr * (grad + decay * p)
        want = before[name] - lr * (params[name].grad + decay * before[name])
        assert torch.allclose(params[name].detach(), want, rtol=1e-5, atol=1e-7), name


def test_frozen_parameters_stay_out_and_a_budget_without_scales_warns(tmp_path):
    cfg, model = _cfg(str(_budget(tmp_path))), _model()
    model.get_submodule(TOWER).conv1.requires_grad_(False)
    opt = opentrans_build_optimizer(cfg, model, build=d2_style_build)
    listed = {id(p) for g in opt.param_groups for p in g["params"]}
    assert listed == {id(p) for p in model.parameters() if p.requires_grad}
    ones = LayerSelection([{"name": "conv1.weight", "trainable": True}], arch="unknown").save(tmp_path / "ones.json")
    with pytest.warns(OpenTransWarning, match="no learning-rate scale other than 1.0"):
        opentrans_build_optimizer(_cfg(str(ones)), _model(), build=d2_style_build)


def test_a_budget_that_reaches_nothing_or_comes_too_late_is_refused(tmp_path):
    cfg = _cfg(str(_budget(tmp_path)))
    cfg.MODEL.OPENTRANS.PREFIX = "elsewhere."
    with pytest.raises(OpenTransError, match="none of the 2 selection names"):
        opentrans_build_optimizer(cfg, _model(), build=d2_style_build)
    model = _model()
    opt = d2_style_build(cfg, model)
    torch.optim.lr_scheduler.StepLR(opt, 10)
    with pytest.raises(OpenTransError, match="scheduler was already built"):
        apply_lr_scales(opt, {})
    _forward(model, torch.randn(1, 3, 8, 8)).sum().backward()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt.step()  # momentum buffers now sit in its state
    with pytest.raises(OpenTransError, match="already stepped"):
        apply_lr_scales(opt, {})


def test_split_groups_keeps_options_and_order():
    a, b, c = (nn.Parameter(torch.zeros(1)) for _ in range(3))
    groups = [{"params": [a, b, c], "lr": 0.2, "weight_decay": 0.5, "betas": (0.9, 0.99)}]
    out = split_groups(groups, lambda p: 1.0 if p is b else 2.0)
    assert [[id(p) for p in g["params"]] for g in out] == [[id(a), id(c)], [id(b)]]
    assert [g["lr"] for g in out] == [0.4, 0.2] and [g["lr_scale"] for g in out] == [2.0, 1.0]
    assert all(g["weight_decay"] == 0.5 and g["betas"] == (0.9, 0.99) for g in out)


def test_without_build_it_needs_detectron2():
    if importlib.util.find_spec("detectron2") is not None:
        pytest.skip("detectron2 is installed here")
    with pytest.raises(OpenTransError, match="detectron2's build_optimizer"):
        opentrans_build_optimizer(_cfg(), _model())
