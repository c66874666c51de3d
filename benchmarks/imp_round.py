"""One global magnitude-pruning round over the open_clip RN50 image tower: opentrans-hub vs torch.nn.utils.prune.

Scope: every Conv2d weight but the first (23,473,152 weights). Each repeat prunes a fresh copy of the same
randomly initialised tower (copying is not timed) with

* ``opentrans_hub.methods.imp.magnitude_prune(tower, rate=AMOUNT)`` (threshold by radix selection, masks applied
  in place with exact-zero hooks), and
* ``torch.nn.utils.prune.global_unstructured(..., pruning_method=L1Unstructured, amount=AMOUNT)``,

interleaved (the order alternates between repeats), after one untimed warm-up of each. Prints one JSON
object on the last line: medians, the ratio, the resulting sparsity and whether both chose the same weights.

    python benchmarks/imp_round.py [--repeats 3] [--amount 0.1] [--threads 2] [--device cpu] [--quick] [--json FILE]
"""

from __future__ import annotations

import copy
import sys
import time

import _bench
import torch
from torch import nn


def _scope(tower: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    convs = [(name, m) for name, m in tower.named_modules() if isinstance(m, nn.Conv2d)]
    return convs[1:]  # the paper leaves the first conv dense


def run_ours(tower: nn.Module, amount: float) -> tuple[float, dict[str, torch.Tensor]]:
    from opentrans_hub.methods.imp import magnitude_prune

    start = time.perf_counter()
    sub = magnitude_prune(tower, rate=amount)
    elapsed = time.perf_counter() - start
    return elapsed, {name: mask for name, mask in sub.masks.items()}


def run_torch(tower: nn.Module, amount: float) -> tuple[float, dict[str, torch.Tensor]]:
    from torch.nn.utils import prune

    convs = _scope(tower)
    start = time.perf_counter()
    prune.global_unstructured([(m, "weight") for _, m in convs], pruning_method=prune.L1Unstructured,
                              amount=amount)
    elapsed = time.perf_counter() - start
    return elapsed, {f"{name}.weight": m.weight_mask.bool() for name, m in convs}


def main(argv: list[str] | None = None) -> int:
    parser = _bench.options(__doc__, repeats=3, quick="one repeat", threads=2)
    parser.add_argument("--amount", type=float, default=0.1, help="fraction pruned in the round (IMP: 0.1)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = _bench.parse(parser, argv, repeats=1)
    _bench.set_threads(args.threads)

    base = _bench.rn50_tower(args.seed).to(args.device)
    total = sum(m.weight.numel() for _, m in _scope(base))
    runners = {"ours": run_ours, "torch_prune": run_torch}
    times = _bench.Timings(*runners)
    masks: dict[str, dict[str, torch.Tensor]] = {}
    for runner in runners.values():  # warm-up, untimed
        runner(copy.deepcopy(base), args.amount)
    for repeat in range(args.repeats):
        for name in _bench.order(list(runners), repeat):
            tower = copy.deepcopy(base)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            elapsed, masks[name] = runners[name](tower, args.amount)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.add(name, elapsed)
            print(f"repeat {repeat}: {name} {elapsed:.3f} s", file=sys.stderr)
            del tower
    kept = sum(int(m.sum()) for m in masks["ours"].values())
    kept_torch = sum(int(m.sum()) for m in masks["torch_prune"].values())
    same = all(torch.equal(masks["ours"][n].cpu(), masks["torch_prune"][n].cpu()) for n in masks["ours"])
    ours, theirs = times.median("ours"), times.median("torch_prune")
    result = {
        "benchmark": "imp_round",
        "tower": "open_clip/RN50 (random init)",
        "scope_weights": total,
        "amount": args.amount,
        "repeats": args.repeats,
        "threads": args.threads,
        "device": args.device,
        "ours_s": round(ours, 4),
        "torch_prune_s": round(theirs, 4),
        "ours_over_torch_prune": round(ours / theirs, 4),
        "ours_all_s": times.all_s()["ours"],
        "torch_prune_all_s": times.all_s()["torch_prune"],
        "sparsity_after": (total - kept) / total,
        "torch_prune_sparsity_after": (total - kept_torch) / total,
        "same_masks_as_torch_prune": same,
    }
    _bench.emit(result, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
