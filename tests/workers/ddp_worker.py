"""One rank of the DistributedDataParallel sparsity test (run by tests/test_sparsity_ddp.py, 2 processes, gloo).

Usage: python ddp_worker.py RANK WORLD_SIZE PORT OUT_DIR. Writes OUT_DIR/rank{RANK}.json with what it saw;
``tests/`` must be on PYTHONPATH (``support.processes`` starts the ranks).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from support.sparsity import conv_masks, pruned_nonzeros
from support.towers import make_tiny_resnet
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from opentrans_hub import (
    NameMap,
    Subnetwork,
    apply_masks,
    apply_subnetwork,
    masked_parameters,
    verify_exact,
)


def steps(ddp: nn.Module, optimizer: torch.optim.Optimizer, rank: int, count: int, autocast: bool = False) -> None:
    for i in range(count):
        gen = torch.Generator().manual_seed(1000 * rank + i)  # different data on every rank
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = ddp(torch.randn(2, 3, 64, 64, generator=gen)).float().pow(2).mean()
        loss.backward()
        optimizer.step()


def main() -> None:
    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    result: dict = {"rank": rank}

    # A: mask first, then wrap. Ranks start from different weights; DDP broadcasts rank 0's at construction.
    model = make_tiny_resnet(seed=rank)
    masks = conv_masks(model, 0.89, seed=0)
    apply_masks(model, masks)
    ddp = DistributedDataParallel(model)
    result["a_masked_inside_ddp"] = sorted(masked_parameters(ddp.module)) == sorted(masks)
    result["a_masked_through_wrapper"] = sorted(masked_parameters(ddp)) == sorted(f"module.{n}" for n in masks)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    steps(ddp, optimizer, rank, 3)
    steps(ddp, optimizer, rank, 1, autocast=True)
    result["a_pruned_nonzeros"] = pruned_nonzeros(model, masks)
    result["a_checksum"] = float(sum(p.double().sum() for p in model.parameters()))
    result["a_verify"] = verify_exact(ddp)  # one count summed over the ranks
    result["a_pruned_local"] = sum(int((~m).sum()) for m in masks.values())
    result["a_state_keys_plain"] = all(not k.endswith(("_orig", "_mask")) for k in ddp.state_dict())

    # B: wrap first, train densely (momentum and Adam state non-zero), then apply a subnetwork through the
    # wrapper's names (prefix "module."), mid-training.
    model_b = make_tiny_resnet(seed=10 + rank)
    ddp_b = DistributedDataParallel(model_b)
    opt_b = torch.optim.AdamW(ddp_b.parameters(), lr=1e-2, weight_decay=0.1)
    steps(ddp_b, opt_b, rank, 2)
    masks_b = conv_masks(model_b, 0.89, seed=1)
    report = apply_subnetwork(ddp_b, Subnetwork(masks_b, arch="open_clip/tiny"), NameMap.prefix("module."),
                              strict=True)
    result["b_mapped"] = len(report.mapped)
    steps(ddp_b, opt_b, rank, 3)
    result["b_pruned_nonzeros"] = pruned_nonzeros(model_b, masks_b)
    result["b_checksum"] = float(sum(p.double().sum() for p in model_b.parameters()))
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
