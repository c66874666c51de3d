"""One rank of the FSDP tests (run by tests/test_sparsity_fsdp.py; gloo on 127.0.0.1, CPU).

Usage: python fsdp_worker.py MODE OUT_DIR RANK WORLD PORT, MODE in {rn50, vit (+ the FSDP1 checks), fsdp1}. Writes
OUT_DIR/MODE_rank{RANK}.json with what the rank saw; ``tests/`` must be on PYTHONPATH (``support.processes``
starts the ranks).
Every check here is computed independently of the library where it can be (local shards against chunks of
the full masks), besides ``verify_exact``.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from support.sparsity import conv_masks
from torch import nn

torch.set_num_threads(1)
IMAGE = 32  # RN50 at 32 px: a 1x1 attnpool grid, every conv of the tower at a quarter of the 64 px cost
T0 = time.perf_counter()


# ------------------------------------------------------------------------------------------- models
class Holder(nn.Module):
    """A model with the tower at ``visual.`` (as in a segmentation model)."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x)


def rn50(seed: int) -> nn.Module:
    """open_clip's RN50 tower (layers 3-4-6-3, width 64, RN50 names) at 64 px input (a smaller attnpool grid)."""
    from open_clip.modified_resnet import ModifiedResNet

    torch.manual_seed(seed)
    return ModifiedResNet(layers=(3, 4, 6, 3), output_dim=1024, heads=32, image_size=IMAGE, width=64)


def tiny_vit(seed: int) -> nn.Module:
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(seed)
    return VisionTransformer(image_size=32, patch_size=8, width=64, layers=2, heads=4, mlp_ratio=4.0, output_dim=32)


def shard(model: nn.Module, mesh, blocks, **kwargs) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for block in blocks:
        fully_shard(block, mesh=mesh, **kwargs)
    fully_shard(model, mesh=mesh, **kwargs)
    return model


def rn50_blocks(model: nn.Module) -> list[nn.Module]:
    return [block for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for block in layer]


def images(step: int, rank: int, size: int = 2, image: int = IMAGE) -> torch.Tensor:
    return torch.randn(size, 3, image, image, generator=torch.Generator().manual_seed(100 * step + rank))


def train(model: nn.Module, optimizer: torch.optim.Optimizer, rank: int, steps: int, accumulate: int = 1,
          clip: float | None = None, image: int = IMAGE, seed: int = 0) -> None:
    for step in range(steps):
        optimizer.zero_grad()
        for micro in range(accumulate):
            model(images(seed + 10 * step + micro, rank, image=image)).float().pow(2).mean().backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()


# ------------------------------------------------------------------------------------------- checks
def error_of(fn) -> str:
    """An empty string when ``fn()`` returns, else "ExceptionType: message" (recorded for the test to assert)."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"
    return ""


def local_rows(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The rows of ``full`` this rank's shard of ``param`` holds (fully_shard: torch.chunk on dim 0)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    pieces = torch.chunk(full, world, dim=0)
    return pieces[rank] if rank < len(pieces) else full[:0]


def independent_nonzeros(model: nn.Module, masks: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(pruned nonzeros, kept entries) over this rank's shards, summed over ranks, without the library."""
    params = dict(model.named_parameters())
    bad = kept = 0
    for name, keep in masks.items():
        piece = params[name].detach().to_local()
        rows = local_rows(keep, params[name])
        assert piece.shape == rows.shape, (name, piece.shape, rows.shape)
        bad += int((piece[~rows] != 0).sum())
        kept += int(rows.sum())
    counts = torch.tensor([bad, kept])
    dist.all_reduce(counts)
    return int(counts[0]), int(counts[1])


def mask_bytes(model: nn.Module) -> tuple[int, int]:
    from opentrans_hub import masked_parameters

    masks = masked_parameters(model)
    local = sum(m.to_local().numel() * m.element_size() for m in masks.values())
    return local, sum(m.numel() * m.element_size() for m in masks.values())


def local_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().to_local().clone() for n, p in model.named_parameters()}


def moved(model: nn.Module, before: dict[str, torch.Tensor]) -> int:
    out = torch.tensor([sum(int((p.detach().to_local() != before[n]).sum()) for n, p in model.named_parameters())])
    dist.all_reduce(out)
    return int(out)


# ------------------------------------------------------------------------------------------- scenarios
def run_rn50(result: dict, rank: int, mesh, out: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import DTensor

    from opentrans_hub import (
        NameMap,
        Subnetwork,
        apply_masks,
        apply_subnetwork,
        apply_subnetwork_to_state_dict,
        bake,
        export_subnetwork,
        masked_parameters,
        verify_exact,
    )

    # A: subnetwork applied BEFORE sharding; AdamW with weight decay, accumulation, clipping, resharding after forward
    model = rn50(seed=0)
    masks = conv_masks(model, 0.89, seed=0)
    apply_masks(model, masks)
    shard(model, mesh, rn50_blocks(model), reshard_after_forward=True)
    before = local_snapshot(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    train(model, optimizer, rank, steps=2, accumulate=2, clip=1.0)
    result["a_nonzeros"], result["a_kept"] = independent_nonzeros(model, masks)
    result["a_verify"] = verify_exact(model)
    result["a_moved"] = moved(model, before)
    result["a_masks_are_dtensors"] = all(isinstance(m, DTensor) for m in masked_parameters(model).values())
    result["a_mask_bytes_local"], result["a_mask_bytes_full"] = mask_bytes(model)
    result["a_pruned_total"] = sum(int((~m).sum()) for m in masks.values())
    sub = Subnetwork(masks, arch="open_clip/RN50")
    result["t_a"] = time.perf_counter() - T0
    result["a_export_equal"] = export_subnetwork(model, arch="open_clip/RN50").sha256 == sub.sha256

    # B: shard first (no reshard after forward, bf16 compute), train densely so momentum is non-zero
    # everywhere, then apply the subnetwork to the sharded model through a name map
    holder = Holder(rn50(seed=1))
    shard(holder, mesh, rn50_blocks(holder.visual), reshard_after_forward=False)
    opt_b = torch.optim.SGD(holder.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    train(holder, opt_b, rank, steps=1)
    apply_subnetwork(holder, sub, NameMap.prefix("visual."), strict=True)
    before = local_snapshot(holder)
    train(holder, opt_b, rank, steps=2, clip=1.0, seed=50)
    prefixed = {f"visual.{n}": m for n, m in masks.items()}
    result["b_nonzeros"], _ = independent_nonzeros(holder, prefixed)
    result["b_verify"] = verify_exact(holder)
    result["b_moved"] = moved(holder, before)
    result["t_b"] = time.perf_counter() - T0

    # DCP: a sharded save of A, loaded into a freshly sharded masked model with other weights
    ckpt = out / "dcp_a"
    dcp.save(model.state_dict(), checkpoint_id=str(ckpt))
    other = rn50(seed=2)
    shard(other, mesh, rn50_blocks(other))
    apply_subnetwork(other, sub, strict=True)
    state = other.state_dict()
    dcp.load(state, checkpoint_id=str(ckpt))
    other.load_state_dict(state)
    result["dcp_equal"] = all(torch.equal(p.detach().to_local(), q.detach().to_local())
                              for p, q in zip(model.parameters(), other.parameters()))
    result["dcp_verify"] = verify_exact(other)
    # a dense sharded checkpoint loaded into the masked model: the load hook re-zeroes
    dense = rn50(seed=3)
    shard(dense, mesh, rn50_blocks(dense))
    dcp.save(dense.state_dict(), checkpoint_id=str(out / "dcp_dense"))
    state = other.state_dict()
    dcp.load(state, checkpoint_id=str(out / "dcp_dense"))
    other.load_state_dict(state)
    result["dcp_dense_verify"] = verify_exact(other)
    # a sharded state dict zeroed without a live mask (DCP conversion scripts)
    zeroed, _ = apply_subnetwork_to_state_dict(dense.state_dict(), sub, strict=True)
    name = sorted(masks)[0]
    result["state_dict_zeroed"] = bool((zeroed[name].to_local()[~local_rows(masks[name], zeroed[name])] == 0).all()) \
        and isinstance(zeroed[name], DTensor)
    result["t_dcp"] = time.perf_counter() - T0
    # bake on the sharded model: plain modules holding the zeros
    bake(model)
    result["bake_unmasked"] = masked_parameters(model) == {}
    result["bake_nonzeros"], _ = independent_nonzeros(model, masks)
    # a violation is found and reported: one pruned weight set by hand on rank 1
    params = dict(other.named_parameters())
    name = sorted(masks)[0]
    if rank == 1:
        with torch.no_grad():
            piece = params[name].to_local()
            rows = local_rows(masks[name], params[name])
            piece[~rows] = 0.5
    result["violation"] = verify_exact(other, raise_on_violation=False)
    result["violation_raised"] = error_of(lambda: verify_exact(other))


def run_fsdp1(result: dict, rank: int, mesh, out: Path) -> None:
    from support.towers import make_tiny_resnet
    from torch.distributed.fsdp import FullyShardedDataParallel

    from opentrans_hub import apply_masks

    model = make_tiny_resnet(width=8)
    masks = conv_masks(model, 0.5, seed=0)
    wrapped = FullyShardedDataParallel(model, use_orig_params=True, device_id=torch.device("cpu"))
    result["apply_after"] = error_of(lambda: apply_masks(wrapped, {f"_fsdp_wrapped_module.{n}": m
                                                                   for n, m in masks.items()}))
    model = make_tiny_resnet(width=8)
    apply_masks(model, masks)
    wrapped = FullyShardedDataParallel(model, use_orig_params=True, device_id=torch.device("cpu"))
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    result["step_after_wrap"] = error_of(lambda: train(wrapped, optimizer, rank, steps=1, image=64))
    model = make_tiny_resnet(width=8)  # the default FSDP1 (flat parameters only)
    apply_masks(model, masks)
    wrapped = FullyShardedDataParallel(model, device_id=torch.device("cpu"))
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    result["step_after_flat_wrap"] = error_of(lambda: train(wrapped, optimizer, rank, steps=1, image=64))


def quantized_vit(seed: int) -> nn.Module:
    """A tiny open_clip ViT whose weights take few distinct values: many magnitude ties across ranks."""
    model = tiny_vit(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_((param * 16).round() / 16)
    return model


def full_weights(model: nn.Module, names) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {n: params[n].detach().full_tensor() for n in names}


def run_vit(result: dict, rank: int, mesh, out: Path) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from opentrans_hub import (
        IMPRunner,
        PruneScope,
        Subnetwork,
        bake,
        export_subnetwork,
        magnitude_masks,
        magnitude_prune,
        masked_parameters,
        model_sparsity,
        parameter_counts,
        remove,
        verify_exact,
    )

    scope = PruneScope(layer_types=("linear",), min_density=0.3)  # floors make the water-filling run too
    reference = quantized_vit(seed=0)
    model = quantized_vit(seed=0)
    shard(model, mesh, model.transformer.resblocks, reshard_after_forward=False,
          mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    # one-shot global, then an IMP-style round nested in it: sharded == unsharded, bit for bit
    ref1 = magnitude_prune(reference, sparsity=0.6, scope=scope, arch="tiny/ViT")
    sub1 = magnitude_prune(model, sparsity=0.6, scope=scope, arch="tiny/ViT")
    ref2 = magnitude_prune(reference, rate=0.3, scope=scope, arch="tiny/ViT")
    sub2 = magnitude_prune(model, rate=0.3, scope=scope, arch="tiny/ViT")
    result["prune_sha"] = [sub1.sha256, sub2.sha256]
    result["prune_equal"] = [sub1.sha256 == ref1.sha256, sub2.sha256 == ref2.sha256]
    result["prune_sparsity"] = [sub1.sparsity, sub2.sparsity]
    result["model_sparsity"] = model_sparsity(model)["sparsity"]  # counted on the shards, summed
    result["counts_pruned"] = parameter_counts(model)["pruned"]
    result["sub_pruned"] = sub2.masked
    # layerwise ranking on the pure core
    selected = scope.select(model)
    weights = {c: p for c, (_, p) in selected.items()}
    ref_weights = {c: p for c, (_, p) in scope.select(reference).items()}
    lw = magnitude_masks(weights, sparsity=0.5, ranking="layerwise")
    ref_lw = magnitude_masks(ref_weights, sparsity=0.5, ranking="layerwise")
    result["layerwise_equal"] = Subnetwork({c: m.full_tensor() for c, m in lw.items()}).sha256 == \
        Subnetwork(ref_lw).sha256
    result["masks_local"] = all(m.to_local().numel() < m.numel() for m in masked_parameters(model).values())
    # mixed precision training keeps it exact; export gives back the last round
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    train(model, optimizer, rank, steps=2, image=32)
    result["train_verify"] = verify_exact(model)
    result["export_equal"] = export_subnetwork(model, arch="tiny/ViT").sha256 == sub2.sha256

    # IMPRunner on the sharded model: two rounds with rewinding to init, compared with the unsharded
    # computation on the same (gathered by the test) weights
    imp_model = quantized_vit(seed=1)
    shard(imp_model, mesh, imp_model.transformer.resblocks)
    runner = IMPRunner(imp_model, rate=0.25, rounds=2, period=2, scope=scope, arch="tiny/ViT", rewind=0,
                       out_dir=out / "imp")
    runner.before_train()
    init = local_snapshot(imp_model)
    opt = torch.optim.SGD(imp_model.parameters(), lr=0.05, momentum=0.9)
    names = [full for full, _ in scope.select(imp_model).values()]
    canon = {full: c for c, (full, _) in scope.select(imp_model).items()}
    equal = []
    for iteration in range(4):
        train(imp_model, opt, rank, steps=1, image=32, seed=iteration)
        expected = None
        if iteration == runner.round_iteration(runner.rounds_done + 1):
            whole = full_weights(imp_model, names)
            current = {canon[n]: m.full_tensor() for n, m in masked_parameters(imp_model).items()}
            expected = Subnetwork(magnitude_masks({canon[n]: w for n, w in whole.items()}, current or None,
                                                  sparsity=1 - 0.75 ** (runner.rounds_done + 1),
                                                  min_density=0.3), arch="tiny/ViT")  # the arch is identity
        sub = runner.after_step(iteration)
        if expected is not None:
            equal.append(sub is not None and sub.sha256 == expected.sha256)
    result["imp_equal"] = equal
    result["imp_rewound"] = all(torch.equal(p.detach().to_local(), init[n].masked_fill(
        ~masked_parameters(imp_model)[n].to_local(), 0) if n in masked_parameters(imp_model) else init[n])
        for n, p in imp_model.named_parameters())
    result["imp_verify"] = verify_exact(imp_model)
    state = IMPRunner.read_state(out / "imp") if rank == 0 else None
    result["imp_state_sha"] = [r["sha256"] for r in state["rounds"]] if state else None
    result["imp_last_sha"] = runner.last.sha256
    # resume on a freshly sharded model: the last committed round comes back on the shards
    resumed_model = quantized_vit(seed=1)
    shard(resumed_model, mesh, resumed_model.transformer.resblocks)
    resumed = IMPRunner(resumed_model, rate=0.25, rounds=2, period=2, scope=scope, arch="tiny/ViT", rewind=0,
                        out_dir=out / "imp")
    resumed.before_train()
    result["resume_rounds"] = resumed.rounds_done
    result["resume_equal"] = export_subnetwork(resumed_model, arch="tiny/ViT").sha256 == runner.last.sha256
    before = local_snapshot(resumed_model)
    remove(resumed_model)  # masks gone, weights untouched
    result["remove_ok"] = masked_parameters(resumed_model) == {} and all(
        torch.equal(p.detach().to_local(), before[n]) for n, p in resumed_model.named_parameters())
    bake(imp_model)
    result["bake_unmasked"] = masked_parameters(imp_model) == {}
    run_fsdp1(result, rank, mesh, out)  # in the same processes: one start-up less


def main() -> None:
    mode, out, rank, world, port = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    result: dict = {"rank": rank}
    try:
        {"rn50": run_rn50, "vit": run_vit, "fsdp1": run_fsdp1}[mode](result, rank, mesh, out)
    except Exception:
        traceback.print_exc()
        raise
    (out / f"{mode}_rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()




if __name__ == "__main__":
    main()
