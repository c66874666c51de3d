"""What a model holds right now: exact zeros counted in the weights, never read from masks."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import OpenTransError
from .masks import masked_parameters
from .sharding import is_dtensor, local


def model_sparsity(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, Any]:
    """Exact zeros in the weights right now (it counts values, never masks): over ``names``, else over the
    parameters ``model`` keeps masked, else, for a model without masks (a baked tower, a checkpoint loaded into a
    plain model), over every weight tensor of 2 dims or more (Conv/Linear kernels; norms and biases left out).

    Returns ``params``, ``zeros``, ``sparsity`` and ``scope`` (``"names"``, ``"masked"`` or ``"weights"``). On a
    model sharded by ``fully_shard`` each rank counts its own rows and the counts are summed over the shards'
    process group (collective: call it on every rank).
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    if names is not None:
        scope, names = "names", list(names)
    else:
        names = list(masked_parameters(model))
        scope = "masked"
        if not names:
            scope, names = "weights", [n for n, p in params.items() if p.dim() >= 2 and p.is_floating_point()]
    unknown = [name for name in names if name not in params]
    if unknown:
        raise OpenTransError(f"model has no parameter {unknown[0]!r}", tensor=unknown[0])
    total = zeros = 0
    sharded: list[torch.Tensor] = []
    for name in names:
        tensor = params[name].detach()
        total += tensor.numel()
        if is_dtensor(tensor):
            sharded.append(tensor)
        else:
            zeros += int((tensor == 0).sum())
    if sharded:
        import torch.distributed as dist

        counts = torch.tensor([sum(int((local(t) == 0).sum()) for t in sharded)])
        dist.all_reduce(counts, group=sharded[0].device_mesh.get_group())
        zeros += int(counts[0])
    return {"params": total, "zeros": zeros, "sparsity": zeros / total if total else 0.0, "scope": scope}


def count_zeros(model: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Exact zeros per weight tensor (2 dims or more) of a model or state dict, and overall: what a baked or
    loaded checkpoint really holds, whatever masks exist or not (plain tensors; for a sharded model use
    :func:`model_sparsity`)."""
    tensors = dict(model.named_parameters(remove_duplicate=False)) if isinstance(model, nn.Module) else dict(model)
    layers = {}
    for name, tensor in tensors.items():
        if isinstance(tensor, torch.Tensor) and tensor.dim() >= 2 and tensor.is_floating_point():
            layers[name] = (int((tensor.detach() == 0).sum()), tensor.numel())
    zeros, total = sum(z for z, _ in layers.values()), sum(n for _, n in layers.values())
    return {"params": total, "zeros": zeros, "sparsity": zeros / total if total else 0.0,
            "layers": {name: {"zeros": z, "params": n, "sparsity": z / n} for name, (z, n) in layers.items()}}
