"""Training-step cost of exact sparsity under FSDP2: dense vs masked, both sharded with ``fully_shard``.

open_clip RN50 visual tower (random init), CPU, ``--world`` gloo processes on 127.0.0.1, every Bottleneck
block and the root sharded (``init_device_mesh("cpu", (world,))``). One training step = zero_grad +
forward + backward + AdamW (weight decay) step on a per-rank batch of ``--batch`` x 3 x ``--image`` px.
Masks: per-layer magnitude at 89 % over every Conv2d weight but the first, applied after sharding. The
two peers live in the same processes and run interleaved (the order alternates every repeat) after
warm-up; a step is timed between barriers; medians over the repeats.

The last line of stdout is one JSON object:
  fsdp_dense_s, fsdp_masked_s   median wall seconds per training step (slowest rank)
  ratio                         fsdp_masked_s / fsdp_dense_s (target <= 1.05)
  cpu_ratio                     the same from process CPU time (less sensitive to other load on the machine)
  mask_bytes_per_rank           bytes of masks held by each rank (bool shards), and mask_bytes_total
  hooks_ms                      our optimizer pre+post hooks alone, median ms per step (rank 0)
  exact                         verify_exact found no pruned weight off 0.0 after the timed steps

Usage: python benchmarks/fsdp_step.py [--world 2] [--repeats 7] [--batch 2] [--image 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn


def rn50(image: int) -> nn.Module:
    from open_clip.modified_resnet import ModifiedResNet

    torch.manual_seed(0)
    return ModifiedResNet(layers=(3, 4, 6, 3), output_dim=1024, heads=32, image_size=image, width=64)


def l1_masks(model: nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
    masks = {}
    for name, conv in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)][1:]:
        scores = conv.weight.detach().abs().flatten()
        threshold = scores.kthvalue(int(round(sparsity * scores.numel()))).values
        masks[f"{name}.weight"] = conv.weight.detach().abs() > threshold
    return masks


def worker(rank: int, args: argparse.Namespace, port: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from opentrans_hub import apply_masks, masked_parameters, verify_exact
    from opentrans_hub import sparsity as sparsity_mod

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.world)
    mesh = init_device_mesh("cpu", (args.world,))
    models, optimizers = {}, {}
    masks = l1_masks(rn50(args.image), args.sparsity)
    for peer in ("dense", "masked"):
        model = rn50(args.image).train()
        for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
            for block in layer:
                fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        if peer == "masked":
            apply_masks(model, masks)
        models[peer] = model
        optimizers[peer] = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    images = torch.randn(args.batch, 3, args.image, args.image, generator=torch.Generator().manual_seed(rank))

    def step(peer: str) -> tuple[float, float]:
        dist.barrier()
        start, cpu = time.perf_counter(), time.process_time()
        optimizers[peer].zero_grad(set_to_none=True)
        models[peer](images).pow(2).mean().backward()
        optimizers[peer].step()
        dist.barrier()
        return time.perf_counter() - start, time.process_time() - cpu

    peers = list(models)
    for _ in range(args.warmup):
        for peer in peers:
            step(peer)
    wall: dict[str, list[float]] = {p: [] for p in peers}
    cpu: dict[str, list[float]] = {p: [] for p in peers}
    hooks = []
    for repeat in range(args.repeats):
        for peer in (peers if repeat % 2 == 0 else peers[::-1]):
            w, c = step(peer)
            wall[peer].append(w)
            cpu[peer].append(c)
        start = time.perf_counter()
        sparsity_mod._optimizer_pre_hook(optimizers["masked"], (optimizers["masked"],), {})
        sparsity_mod._optimizer_post_hook(optimizers["masked"], (optimizers["masked"],), {})
        hooks.append(time.perf_counter() - start)
        if rank == 0:
            print(f"repeat {repeat + 1}/{args.repeats}: dense {wall['dense'][-1]:.3f}s "
                  f"masked {wall['masked'][-1]:.3f}s", file=sys.stderr)
    report = verify_exact(models["masked"], raise_on_violation=False)
    local_bytes = sum(m.to_local().numel() * m.element_size() for m in masked_parameters(models["masked"]).values())
    # the slowest rank's medians (every step ends at a barrier, so they agree closely)
    med = torch.tensor([statistics.median(wall["dense"]), statistics.median(wall["masked"]),
                        statistics.median(cpu["dense"]), statistics.median(cpu["masked"])], dtype=torch.float64)
    dist.all_reduce(med, op=dist.ReduceOp.MAX)
    if rank == 0:
        result = {
            "device": "cpu", "world": args.world, "threads_per_rank": args.threads, "batch_per_rank": args.batch,
            "image": args.image, "repeats": args.repeats,
            "fsdp_dense_s": float(med[0]), "fsdp_masked_s": float(med[1]), "ratio": float(med[1] / med[0]),
            "cpu_ratio": float(med[3] / med[2]),
            "mask_bytes_per_rank": local_bytes, "mask_bytes_total": sum(m.numel() for m in masks.values()),
            "hooks_ms": 1000 * statistics.median(hooks),
            "exact": report["violations"] == 0, "pruned": report["pruned"],
            "all_s": {p: [round(t, 4) for t in v] for p, v in wall.items()},
        }
        Path(out).write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--image", type=int, default=64)
    parser.add_argument("--sparsity", type=float, default=0.89)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = parser.parse_args()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.spawn(worker, args=(args, port, out), nprocs=args.world, join=True)
        print(Path(out).read_text())


if __name__ == "__main__":
    main()
