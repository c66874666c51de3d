"""Small real artefacts the tests share: subnetworks and selections of the tiny tower, pruned and fine-tuned
checkpoints, and bitwise comparison of nested checkpoints."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from opentrans_hub import LayerSelection, Subnetwork
from opentrans_hub.methods.imp import magnitude_prune
from support.towers import make_tiny_resnet


def tiny_subnetwork(seed: int = 0, sparsity: float = 0.5) -> Subnetwork:
    return magnitude_prune(make_tiny_resnet(seed), sparsity=sparsity, arch="test/tiny", apply=False)


def tiny_selection() -> LayerSelection:
    names = [n for n, p in make_tiny_resnet().named_parameters() if p.dim() == 4]
    return LayerSelection([{"name": n, "alpha": 2.0 + i / 10, "trainable": i % 2 == 0} for i, n in enumerate(names)],
                          arch="test/tiny", policy={"name": "alpha-median"})


def random_subnetwork(tower: nn.Module, arch: str = "open_clip/RN50", seed: int = 1) -> Subnetwork:
    """Random keep-masks over every conv / linear / attention weight of a canonical tower."""
    gen = torch.Generator().manual_seed(seed)
    return Subnetwork({name: torch.rand(p.shape, generator=gen) < 0.6 for name, p in tower.named_parameters()
                       if name.endswith("weight") and p.dim() >= 2}, arch=arch)


def same(a, b) -> bool:
    """Bitwise equality of nested checkpoints (tensors by their bytes, dtype and shape)."""
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.dtype != b.dtype or a.shape != b.shape:
            return False
        return a.numel() == 0 or torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    if isinstance(a, dict):
        return type(a) is type(b) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b or (a != a and b != b)


def pruned_checkpoint(seed: int = 0, sparsity: float = 0.8) -> tuple[dict, Subnetwork]:
    """A nested framework-style checkpoint whose tower was pruned (zeros in place), with odd values kept."""
    tower = make_tiny_resnet(seed)
    sub = magnitude_prune(tower, sparsity=sparsity, arch="test/tiny", apply=True)
    state = tower.state_dict()
    name = "layer1.0.conv2.weight"
    kept = sub[name].reshape(-1).nonzero().reshape(-1)
    flat = state[name].view(-1)
    flat[kept[0]] = -0.0
    flat[kept[1]] = float("nan")
    flat.view(torch.int32)[kept[2]] = 0x7FC0_1234  # a NaN with a payload
    state["layer2.0.conv1.weight"] = state["layer2.0.conv1.weight"].to(torch.bfloat16)
    state["layer3.0.conv1.weight"] = state["layer3.0.conv1.weight"].to(torch.float16)
    state["layer4.0.conv1.weight"] = state["layer4.0.conv1.weight"].to(torch.float64)
    checkpoint = {"model": OrderedDict((f"backbone.visual.{k}", v) for k, v in state.items()),
                  "iteration": 1234, "optimizer": {"state": {0: {"step": torch.tensor(3.0)}},
                                                   "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999),
                                                                     "eps": float("inf"), "params": [0]}]},
                  "meta": {"note": "fine-tuned", "none": None, "dtype": torch.float32, "flag": True,
                           "device": torch.device("cpu"), "ids": {3, 1}, "z": 1 + 2j, "shape": torch.Size([2, 3]),
                           "raw": b"\x00\xff"}}
    checkpoint["model"]._metadata = OrderedDict({"": {"version": 1}})
    return checkpoint, sub


def finetuned_pruned(seed: int = 0):
    """A pruned tower 'fine-tuned' a few steps with its masks exact: the state a user wants to share."""
    tower = make_tiny_resnet(seed)
    sub = magnitude_prune(tower, sparsity=0.7, arch="tinytest/resnet", apply=True)
    opt = torch.optim.SGD(tower.parameters(), lr=0.05, momentum=0.9)
    tower.train()
    for _ in range(2):
        opt.zero_grad()
        tower(torch.randn(2, 3, 64, 64)).square().mean().backward()
        opt.step()
    return tower, sub


def train_and_check_exact(tower: torch.nn.Module, masks: dict[str, torch.Tensor], steps: int = 2) -> None:
    params = dict(tower.named_parameters())
    before = {n: params[n].detach().clone() for n in masks}
    opt = torch.optim.AdamW(tower.parameters(), lr=0.01, weight_decay=0.1)
    tower.train()
    for _ in range(steps):
        opt.zero_grad()
        tower(torch.randn(2, 3, 64, 64)).square().mean().backward()
        opt.step()
    moved = False
    for name, keep in masks.items():
        weight = params[name].detach()
        assert torch.equal(weight[~keep], torch.zeros(int((~keep).sum()))), name  # exact from the first step
        moved |= not torch.equal(weight[keep], before[name][keep])
    assert moved  # the kept weights did train
