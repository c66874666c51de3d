"""A small real training task shared by the IMP, schedule, verify and detectron2 tests and the IMP workers.

The model is a reduced-width open_clip ModifiedResNet (RN50 names) at ``backbone.visual.`` with a linear
head; the task classifies which quadrant of a noisy 32 px image holds a bright square. Each iteration's
batch is generated from a seed made of the iteration (and the rank), so a run resumed at iteration ``i``
sees exactly the batches an uninterrupted run sees.
"""

from __future__ import annotations

import os
import time

import torch
from torch import nn

from opentrans_hub.formats.selection import LayerSelection

PREFIX = "backbone.visual."
IMAGE = 32
CLASSES = 4
RESUME_SETTINGS = {"rate": 0.2, "rounds": 4, "period": 3}
DDP_SETTINGS = {"rate": 0.25, "rounds": 3, "period": 2}


class TinyClassifier(nn.Module):
    """``backbone.visual`` = open_clip ModifiedResNet at width 8; ``head`` = Linear."""

    def __init__(self, seed: int = 0):
        super().__init__()
        from open_clip.modified_resnet import ModifiedResNet

        torch.manual_seed(seed)
        self.backbone = nn.Module()
        self.backbone.visual = ModifiedResNet(layers=(1, 1, 1, 1), output_dim=16, heads=2, image_size=IMAGE,
                                              width=8)
        self.head = nn.Linear(16, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.visual(x))


def make_batch(iteration: int, rank: int = 0, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + iteration)
    labels = torch.randint(0, CLASSES, (size,), generator=g)
    images = 0.3 * torch.randn(size, 3, IMAGE, IMAGE, generator=g)
    half = IMAGE // 2
    for i, label in enumerate(labels.tolist()):
        y, x = divmod(label, 2)
        images[i, :, y * half + 4:y * half + 12, x * half + 4:x * half + 12] += 1.5
    return images, labels


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, iteration: int, rank: int = 0) -> float:
    images, labels = make_batch(iteration, rank)
    optimizer.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)


def alternate_selection(model: TinyClassifier) -> LayerSelection:
    """Every other layer of the tower's prune scope (first conv included) trainable."""
    from opentrans_hub.methods.imp import PruneScope

    names = list(PruneScope(exclude_first=False).select(model.backbone.visual))
    return LayerSelection([{"name": n, "trainable": i % 2 == 0} for i, n in enumerate(names)], arch="tiny/RN",
                          policy={"name": "alternate"})


def run_resume(out_dir: str, steps: int, sleep_after_round: float) -> None:
    """An IMP run that checkpoints after every round and resumes from the last one (killable between rounds)."""
    from opentrans_hub.io.checkpoints import write_checkpoint
    from opentrans_hub.methods.imp import IMPRunner

    model = TinyClassifier(seed=0)
    optimizer = make_optimizer(model)

    def on_round(round_index: int, iteration: int, sub) -> None:
        write_checkpoint(os.path.join(out_dir, f"ckpt_{round_index:03d}.pt"),
                         {"model": model.state_dict(), "optimizer": optimizer.state_dict()})

    runner = IMPRunner(model, prefix=PREFIX, arch="tiny/RN", out_dir=out_dir, on_round=on_round,
                       **RESUME_SETTINGS)
    runner.before_train()
    start = runner.resume_iteration
    if runner.rounds_done:
        ckpt = torch.load(os.path.join(out_dir, f"ckpt_{runner.rounds_done:03d}.pt"), weights_only=True)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        print(f"resumed after round {runner.rounds_done} at iteration {start}", flush=True)
    for iteration in range(start, steps):
        train_step(model, optimizer, iteration)
        if runner.after_step(iteration) is not None:
            print(f"round {runner.rounds_done} at {iteration}", flush=True)
            if sleep_after_round:
                time.sleep(sleep_after_round)
    runner.last.save(os.path.join(out_dir, "final.safetensors"))
    print("done", flush=True)


def step_trains_only_selected(model: nn.Module, optimizer: torch.optim.Optimizer, schedule,
                              selection: LayerSelection, iteration: int = 0) -> dict[str, nn.Parameter]:
    """One scheduled training step: exactly the selection's trainable layers (under ``PREFIX``) moved. Returns
    the model's parameters after the step."""
    before = {k: v.clone() for k, v in model.named_parameters()}
    train_step(model, optimizer, iteration)
    schedule.after_step(iteration)
    params = dict(model.named_parameters())
    for layer in selection.layers:
        full = PREFIX + layer["name"]
        assert torch.equal(params[full], before[full]) != layer["trainable"], full
    return params
