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

Usage: python benchmarks/fsdp_step.py [--world 2] [--repeats 7] [--batch 2] [--image 64] [--threads 1] [--quick]
       [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import _bench
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def worker(rank: int, args: argparse.Namespace, port: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from opentrans_hub import apply_masks, masked_parameters, verify_exact
    from opentrans_hub.sparsity import masks as sparsity_mod

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.world)
    mesh = init_device_mesh("cpu", (args.world,))
    models, optimizers = {}, {}
    masks = _bench.layer_l1_masks(_bench.rn50_tower(image=args.image), args.sparsity)
    for peer in ("dense", "masked"):
        model = _bench.rn50_tower(image=args.image).train()
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
    times = _bench.Timings(*peers)
    hooks = []
    for repeat in range(args.repeats):
        for peer in _bench.order(peers, repeat):
            times.add(peer, *step(peer))
        start = time.perf_counter()
        sparsity_mod._optimizer_pre_hook(optimizers["masked"], (optimizers["masked"],), {})
        sparsity_mod._optimizer_post_hook(optimizers["masked"], (optimizers["masked"],), {})
        hooks.append(time.perf_counter() - start)
        if rank == 0:
            print(f"repeat {repeat + 1}/{args.repeats}: dense {times.last('dense'):.3f}s "
                  f"masked {times.last('masked'):.3f}s", file=sys.stderr)
    report = verify_exact(models["masked"], raise_on_violation=False)
    local_bytes = sum(m.to_local().numel() * m.element_size() for m in masked_parameters(models["masked"]).values())
    # the slowest rank's medians (every step ends at a barrier, so they agree closely)
    wall, cpu = times.medians(), times.cpu_medians()
    med = torch.tensor([wall["dense"], wall["masked"], cpu["dense"], cpu["masked"]], dtype=torch.float64)
    dist.all_reduce(med, op=dist.ReduceOp.MAX)
    if rank == 0:
        result = {
            "device": "cpu", "world": args.world, "threads_per_rank": args.threads, "batch_per_rank": args.batch,
            "image": args.image, "repeats": args.repeats,
            "fsdp_dense_s": float(med[0]), "fsdp_masked_s": float(med[1]), "ratio": float(med[1] / med[0]),
            "cpu_ratio": float(med[3] / med[2]),
            "mask_bytes_per_rank": local_bytes, "mask_bytes_total": sum(m.numel() for m in masks.values()),
            "hooks_ms": 1000 * _bench.median(hooks),
            "exact": report["violations"] == 0, "pruned": report["pruned"],
            "all_s": times.all_s(), "peak_rss_mb": _bench.peak_rss_mb(),  # rank 0's
        }
        Path(out).write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = _bench.options(__doc__, repeats=7, quick="2 repeats, 1 warm-up (smoke run)", threads=1,
                            threads_help="torch threads per rank")
    _bench.step_options(parser, batch=2)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--image", type=int, default=64)
    args = _bench.parse(parser, repeats=2, warmup=1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    port = _bench.free_port()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.spawn(worker, args=(args, port, out), nprocs=args.world, join=True)
        _bench.emit(json.loads(Path(out).read_text()), args)


if __name__ == "__main__":
    main()
