"""The IMP tests' subprocess entry points, on the training task of ``support.training``.

  python imp_worker.py resume OUT_DIR STEPS [--sleep-after-round S]   (killable IMP run with resume)
  python imp_worker.py ddp OUT_DIR RANK WORLD PORT                     (one DDP rank, gloo on 127.0.0.1)

``tests/`` must be on PYTHONPATH (``support.processes.python_env`` puts it there).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from support.training import DDP_SETTINGS, PREFIX, TinyClassifier, make_optimizer, run_resume, train_step
from torch import nn

torch.set_num_threads(1)


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
