"""DTensor helpers for exact sparsity on sharded models (FSDP2's ``fully_shard``), and the FSDP1 guard.

A parameter sharded by ``fully_shard`` is a DTensor; its mask is a bool DTensor with the same mesh and
placements, so each rank holds only the mask rows of its own shard (mask memory falls as 1/world). All
elementwise work (zeroing gradients, optimizer state and weights) runs on the local shards, which line up
row for row, without DTensor dispatch or any communication. Only reductions (counts, histograms) and an
explicit export (bool masks gathered, never weights) talk to other ranks.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from ..errors import OpenTransError

_DTENSOR: list[Any] = []


def _dtensor_type() -> type | None:
    if not _DTENSOR:
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # pragma: no cover - torch built without distributed
            DTensor = None  # noqa: N806
        _DTENSOR.append(DTensor)
    return _DTENSOR[0]


def is_dtensor(tensor: Any) -> bool:
    cls = _dtensor_type()
    return cls is not None and isinstance(tensor, cls)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a view sharing its storage; call under ``no_grad``), else the tensor."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (tuple(a.shape) == tuple(b.shape) and a.device_mesh == b.device_mesh
            and tuple(a.placements) == tuple(b.placements))


def shard_like(mask: torch.Tensor, param: torch.Tensor, name: str = "") -> torch.Tensor:
    """``mask`` (full bool tensor, or a DTensor laid out like ``param``) as a bool DTensor laid out like the
    DTensor ``param``; the local rows are cut out on every rank without communication and copied, so no
    full-size mask stays alive."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if is_dtensor(mask):
        if not same_layout(mask, param):
            raise OpenTransError(f"mask is sharded as {tuple(mask.placements)} on {mask.device_mesh}, the parameter as "
                                 f"{tuple(param.placements)} on {param.device_mesh}", tensor=name or None)
        return mask
    if tuple(mask.shape) != tuple(param.shape):
        raise OpenTransError(f"mask shape {tuple(mask.shape)} != parameter shape {tuple(param.shape)}",
                             tensor=name or None)
    mask = mask.to(param.device).contiguous()
    piece = distribute_tensor(mask, param.device_mesh, param.placements, src_data_rank=None).to_local().clone()
    return DTensor.from_local(piece, param.device_mesh, param.placements, shape=mask.shape, stride=mask.stride(),
                              run_check=False)


def from_local_like(piece: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A DTensor with ``like``'s mesh, placements and global shape around the local ``piece``."""
    from torch.distributed.tensor import DTensor

    shape = tuple(like.shape)
    stride, step = [], 1
    for size in reversed(shape):
        stride.append(step)
        step *= size
    return DTensor.from_local(piece, like.device_mesh, like.placements, shape=shape, stride=tuple(reversed(stride)),
                              run_check=False)


def full_mask(mask: torch.Tensor) -> torch.Tensor:
    """The whole bool mask on this rank: a sharded mask is all-gathered as bytes (collective on its mesh)."""
    if not is_dtensor(mask):
        return mask
    with torch.no_grad():
        as_bytes = from_local_like(mask.to_local().to(torch.uint8), mask)
        return as_bytes.full_tensor().to(torch.bool)


def count_true(mask: torch.Tensor) -> int:
    """True entries of a bool mask; a sharded mask is counted on every rank's rows and summed (collective)."""
    if not is_dtensor(mask):
        return int(mask.sum())
    import torch.distributed as dist

    count = torch.tensor([int(mask.to_local().sum())])
    dist.all_reduce(count, group=mask.device_mesh.get_group())
    return int(count[0])


def check_row_sharded(tensor: torch.Tensor, name: str) -> None:
    """Sharded magnitude pruning knows how to order ties across ranks for ``fully_shard``'s default layout."""
    from torch.distributed.tensor import Shard

    if tensor.device_mesh.ndim != 1 or tuple(tensor.placements) != (Shard(0),):
        raise OpenTransError(f"sharded magnitude pruning supports a 1-D mesh with Shard(0) placement (fully_shard's "
                             f"default); got {tuple(tensor.placements)} on a {tensor.device_mesh.ndim}-D mesh",
                             tensor=name)


def dist_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def fsdp1_modules(model: nn.Module) -> list[str]:
    """Names of FullyShardedDataParallel (FSDP1) wrappers in ``model`` (none unless that module was imported)."""
    fsdp = sys.modules.get("torch.distributed.fsdp.fully_sharded_data_parallel")
    cls = getattr(fsdp, "FullyShardedDataParallel", None)
    if cls is None:
        return []
    return [name or "<root>" for name, module in model.named_modules() if isinstance(module, cls)]


FSDP1_HINT = ("FullyShardedDataParallel (FSDP1) flattens parameters into shards that no per-parameter mask "
              "can follow; shard with torch.distributed.fsdp.fully_shard (FSDP2) instead, before or after "
              "applying the subnetwork")


def check_not_fsdp1(model: nn.Module) -> None:
    wrapped = fsdp1_modules(model)
    if wrapped:
        raise OpenTransError(f"{FSDP1_HINT} (FSDP1 wrapper at {wrapped[0]}); nothing was applied")
