"""Training-step cost of keeping a subnetwork exact: dense vs opentrans-hub vs torch.nn.utils.prune.

open_clip RN50 visual tower (random init), CPU, one training step = zero_grad + forward + backward + SGD
(momentum 0.9) step on a batch of 8 x 3 x 224 x 224. Masks: per-layer L1 at 89 % over every Conv2d
weight except the first (the OpenTrans recipe). The three peers run interleaved in one process (the order
rotates every repeat), after warm-up; medians over the repeats.

The last line of stdout is one JSON object:
  dense_s, ours_s, torch_prune_s         median seconds per training step
  ours_over_dense, ours_over_torch_prune ratios of those medians
  cpu_s, *_cpu                           the same from this process's CPU time (less sensitive to other
                                         processes on a shared machine than wall time)
  hooks_ms                               our optimizer pre+post hooks alone, median ms per step
  bits_per_weight, compressed_bits_per_weight   subnetwork file size (packbits / zstd) per masked weight
  state_dict_mb                          {dense, ours, torch_prune}: what state_dict() holds
  exact                                  every pruned weight of ours is 0.0 after the timed steps
  compiled_dense_s, compiled_ours_s      the same step with the model under torch.compile (inductor), and
  compiled_ours_over_compiled_dense      their ratio (target <= 1.03); compiled_graphs: graphs per model
                                         from torch._dynamo.explain (masks add none); skip with --no-compile

Usage: python benchmarks/sparsity_overhead.py [--repeats 7] [--batch 8] [--threads N] [--quick] [--no-compile]
       [--json FILE]
"""

from __future__ import annotations

import sys
import time

import _bench
import torch
from torch import nn
from torch.nn.utils import prune

from opentrans_hub import Subnetwork, apply_masks, model_sparsity
from opentrans_hub.sparsity import masks as sparsity_mod
from opentrans_hub.towers.backbones import build_visual


def state_mb(model: nn.Module) -> float:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20


def main() -> None:
    parser = _bench.options(__doc__, repeats=7, quick="batch 2, 3 repeats, 1 warm-up (smoke run)", threads=0,
                            threads_help="torch threads (default 0: torch's choice)")
    _bench.step_options(parser, batch=8)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile peers")
    args = _bench.parse(parser, batch=2, repeats=3, warmup=1)
    _bench.set_threads(args.threads)

    base = _bench.rn50_tower()
    masks = _bench.layer_l1_masks(base, args.sparsity)
    state = base.state_dict()
    models = {}
    compiled = () if args.no_compile else ("compiled_dense", "compiled_ours")
    for peer in ("dense", "ours", "torch_prune", *compiled):
        model = base if peer == "dense" else build_visual("open_clip/RN50")
        model.load_state_dict(state)
        model.train()
        models[peer] = model
    apply_masks(models["ours"], masks)
    forwards = {peer: model for peer, model in models.items()}
    graphs = {}
    if compiled:
        apply_masks(models["compiled_ours"], masks)
        for peer in compiled:
            explained = torch._dynamo.explain(models[peer])(torch.randn(1, 3, 224, 224))
            graphs[peer] = explained.graph_count
            torch._dynamo.reset()
        for peer in compiled:
            forwards[peer] = torch.compile(models[peer])
    prune_modules = dict(models["torch_prune"].named_modules())
    for name, keep in masks.items():
        prune.custom_from_mask(prune_modules[name.rsplit(".", 1)[0]], "weight", keep.float())
    optimizers = {peer: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for peer, m in models.items()}
    images = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))

    def step(peer: str) -> None:
        forward, optimizer = forwards[peer], optimizers[peer]
        optimizer.zero_grad(set_to_none=True)
        forward(images).pow(2).mean().backward()
        optimizer.step()

    peers = list(models)
    for _ in range(args.warmup):
        for peer in peers:
            step(peer)
    times = _bench.Timings(*peers)
    hooks: list[float] = []
    for repeat in range(args.repeats):
        for peer in _bench.order(peers, repeat, rotate=True):
            with times.time(peer):
                step(peer)
        # the hooks alone, on ours' real gradients and optimizer state
        start = time.perf_counter()
        sparsity_mod._optimizer_pre_hook(optimizers["ours"], (optimizers["ours"],), {})
        sparsity_mod._optimizer_post_hook(optimizers["ours"], (optimizers["ours"],), {})
        hooks.append(time.perf_counter() - start)
        print(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(f"{p} {times.last(p):.3f}s" for p in peers),
              file=sys.stderr)

    med = times.medians()
    cpu = times.cpu_medians()
    sub = Subnetwork(masks, arch="open_clip/RN50")
    ours_params = dict(models["ours"].named_parameters())
    exact = all(bool((ours_params[n].detach()[~m] == 0).all()) for n, m in masks.items())
    result = {
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "repeats": args.repeats,
        "sparsity": model_sparsity(models["ours"])["sparsity"],
        "dense_s": med["dense"],
        "ours_s": med["ours"],
        "torch_prune_s": med["torch_prune"],
        "ours_over_dense": med["ours"] / med["dense"],
        "ours_over_torch_prune": med["ours"] / med["torch_prune"],
        "torch_prune_over_dense": med["torch_prune"] / med["dense"],
        "cpu_s": cpu,
        "ours_over_dense_cpu": cpu["ours"] / cpu["dense"],
        "ours_over_torch_prune_cpu": cpu["ours"] / cpu["torch_prune"],
        "hooks_ms": 1000 * _bench.median(hooks),
        "bits_per_weight": 8 * len(sub.to_bytes("packbits")) / sub.numel,
        "compressed_bits_per_weight": 8 * len(sub.to_bytes("zstd")) / sub.numel,
        "state_dict_mb": {peer: round(state_mb(m), 1) for peer, m in models.items()},
        "exact": exact,
        **({"compiled_dense_s": med["compiled_dense"], "compiled_ours_s": med["compiled_ours"],
            "compiled_ours_over_compiled_dense": med["compiled_ours"] / med["compiled_dense"],
            "compiled_ours_over_compiled_dense_cpu": cpu["compiled_ours"] / cpu["compiled_dense"],
            "compiled_graphs": graphs,
            "compiled_exact": all(bool((dict(models["compiled_ours"].named_parameters())[n].detach()[~m] == 0).all())
                                  for n, m in masks.items())} if compiled else {}),
        "all_s": times.all_s(),
    }
    _bench.emit(result, args)


if __name__ == "__main__":
    main()
