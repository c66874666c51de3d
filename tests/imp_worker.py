"""A small real training task for the IMP tests, and the subprocess entry points they start.

The model is a reduced-width open_clip ModifiedResNet (RN50 names) at ``backbone.visual.`` with a linear
head; the task classifies which quadrant of a noisy 32 px image holds a bright square. Each iteration's
batch is generated from a seed made of the iteration (and the rank), so a run resumed at iteration ``i``
sees exactly the batches an uninterrupted run sees.

Run as a script:
  python imp_worker.py resume OUT_DIR STEPS [--sleep-after-round S]   (killable IMP run with resume)
  python imp_worker.py ddp OUT_DIR RANK WORLD PORT                     (one DDP rank, gloo on 127.0.0.1)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch import nn

torch.set_num_threads(1)

PREFIX = "backbone.visual."
IMAGE = 32
CLASSES = 4


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


# ------------------------------------------------------------------------------------------ resume
RESUME_SETTINGS = {"rate": 0.2, "rounds": 4, "period": 3}


def run_resume(out_dir: str, steps: int, sleep_after_round: float) -> None:
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


# ------------------------------------------------------------------------------------------ DDP
DDP_SETTINGS = {"rate": 0.25, "rounds": 3, "period": 2}


def run_ddp(out_dir: str, rank: int, world: int, port: int) -> None:
    import torch.distributed as dist

    from opentrans_hub.methods.imp import IMPRunner
    from opentrans_hub.towers.backbones import weights_sha256

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        # rank-specific init: DDP broadcasts rank 0's parameters when it wraps the model
        model = nn.parallel.DistributedDataParallel(TinyClassifier(seed=rank))
        optimizer = make_optimizer(model)

        def on_round(round_index: int, iteration: int, sub) -> None:
            sub.save(os.path.join(out_dir, f"rank{rank}_round{round_index}.safetensors"))

        runner = IMPRunner(model, prefix=PREFIX, arch="tiny/RN", out_dir=os.path.join(out_dir, "imp"),
                           on_round=on_round, **DDP_SETTINGS)
        runner.before_train()
        for iteration in range(DDP_SETTINGS["rounds"] * DDP_SETTINGS["period"] + 1):
            train_step(model, optimizer, iteration, rank)  # each rank sees its own data
            runner.after_step(iteration)
        with open(os.path.join(out_dir, f"rank{rank}_weights.txt"), "w") as handle:
            # parameters only: BatchNorm running statistics follow each rank's own data
            handle.write(weights_sha256(dict(model.module.named_parameters())))
        # towers that differ on purpose (no DDP): the masks must still be rank 0's on every rank
        lone = TinyClassifier(seed=100 + rank)
        lone_runner = IMPRunner(lone, prefix=PREFIX, arch="tiny/RN", rate=0.5, rounds=1, period=1)
        lone_runner.before_train()
        lone_runner.after_step(0).save(os.path.join(out_dir, f"rank{rank}_lone.safetensors"))
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="mode", required=True)
    resume = sub.add_parser("resume")
    resume.add_argument("out_dir")
    resume.add_argument("steps", type=int)
    resume.add_argument("--sleep-after-round", type=float, default=0.0)
    ddp = sub.add_parser("ddp")
    ddp.add_argument("out_dir")
    ddp.add_argument("rank", type=int)
    ddp.add_argument("world", type=int)
    ddp.add_argument("port", type=int)
    args = parser.parse_args(argv)
    if args.mode == "resume":
        run_resume(args.out_dir, args.steps, args.sleep_after_round)
    else:
        run_ddp(args.out_dir, args.rank, args.world, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
