"""Masks, training steps and exactness checks shared by the sparsity tests and their DDP/FSDP workers."""

from __future__ import annotations

import torch
from torch import nn

IMAGE = 64

OPTIMIZERS = {
    "sgd_momentum_wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-2),
    "sgd_momentum_foreach": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, foreach=True),
    "sgd_momentum_loop": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, foreach=False),
    "adamw_wd_foreach": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, foreach=True),
    "adamw_wd_loop": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, foreach=False),
    "adamw_fused": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, fused=True),
    "adam_amsgrad": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True, weight_decay=1e-3),
    "rmsprop_momentum": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.9, centered=True, weight_decay=0.1),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2, initial_accumulator_value=0.1, weight_decay=0.1),
    "adadelta": lambda p: torch.optim.Adadelta(p, lr=1.0, weight_decay=0.1),
    "adamax": lambda p: torch.optim.Adamax(p, lr=1e-2, weight_decay=0.1),
    "nadam": lambda p: torch.optim.NAdam(p, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True),
    "radam": lambda p: torch.optim.RAdam(p, lr=1e-2, weight_decay=0.1),
    "sgd_maximize": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.1, maximize=True),
}


def conv_masks(model: nn.Module, sparsity: float = 0.89, seed: int = 0, first: bool = False
               ) -> dict[str, torch.Tensor]:
    """Random per-layer keep-masks over every Conv2d weight except the first (the OpenTrans recipe; ``first``:
    the first one too)."""
    gen = torch.Generator().manual_seed(seed)
    names = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Conv2d)][0 if first else 1:]
    shapes = {n: p.shape for n, p in model.named_parameters()}
    return {n: torch.rand(shapes[n], generator=gen) >= sparsity for n in names}


def batch(seed: int = 0, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 3, seed: int = 0,
                autocast: bool = False) -> None:
    model.train()
    for i in range(steps):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(batch(seed + i).to(next(model.parameters()).dtype)).float().pow(2).mean()
        loss.backward()
        optimizer.step()


def assert_exact_zeros(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for name, keep in masks.items():
        pruned = params[name].detach()[~keep]
        assert pruned.numel() > 0
        assert bool((pruned == 0).all()), f"{name}: {int((pruned != 0).sum())} pruned weights moved"


def assert_kept_moved(model: nn.Module, before: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> None:
    """Training really happened: kept weights changed somewhere."""
    params = dict(model.named_parameters())
    moved = sum(int((params[n].detach()[masks[n]] != before[n][masks[n]]).sum()) for n in masks)
    assert moved > 0


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def pruned_nonzeros(model: nn.Module, masks: dict[str, torch.Tensor]) -> int:
    """How many pruned weights are off 0.0."""
    params = dict(model.named_parameters())
    return sum(int((params[n].detach()[~m] != 0).sum()) for n, m in masks.items())
