"""Magnitude selection: keep-masks at a target sparsity, on whole tensors or on FSDP2 shards.

Weights are ranked by ``(|w|, tensor order, flat index)``, so ties are broken the same way on every run,
rank and device. The threshold comes from a radix selection over the float bits (a 32,768-bucket
histogram of the top 16 bits, then the k-th value inside one bucket), never from a sort of all weights.

On weights sharded by ``fully_shard`` (DTensors, Shard(0) on a 1-D mesh) every rank ranks only its own
rows: the histograms and counts are summed across ranks (the bucket's k-th value comes from a second,
65,536-bucket histogram of the low 16 bits instead of gathering values), and ties at the threshold are
handed out in global order from a table of per-rank tie counts. No rank ever sees another rank's
weights, and the masks are bit-identical to the unsharded computation.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping

import torch

from ..errors import OpenTransError
from ..sparsity.sharding import check_row_sharded, from_local_like, is_dtensor, local, shard_like

RANKINGS = ("global", "layerwise")


class _Comm:
    """Sums and gathers over the ranks of one process group (FSDP2's mesh); ``None`` means one process."""

    def __init__(self, group):
        import torch.distributed as dist

        self.dist, self.group = dist, group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.to(torch.int64).cpu()
        self.dist.all_reduce(out, group=self.group)
        return out

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.to(torch.int64).cpu()
        out = [torch.empty_like(tensor) for _ in range(self.world)]
        self.dist.all_gather(out, tensor, group=self.group)
        return torch.stack(out)


def _counts(mask: torch.Tensor, spans: list[slice], comm: _Comm | None) -> list[int]:
    """True entries of ``mask`` in each span, summed over ranks."""
    local_counts = torch.stack([mask[s].sum() for s in spans]) if spans else torch.zeros(0, dtype=torch.int64)
    return (comm.sum(local_counts) if comm is not None else local_counts).tolist()


def _high_halves(values: torch.Tensor) -> torch.Tensor:
    """The top 16 bits of each float32 as int16 (a view on little-endian machines, no copy)."""
    if sys.byteorder == "little":
        return values.view(torch.int16)[1::2]
    return (values.view(torch.int32) >> 16).to(torch.int16)


def _kth_smallest(values: torch.Tensor, k: int, comm: _Comm | None = None) -> float:
    """The k-th smallest (1-based) of a flat non-negative float32 tensor (over all ranks), without sorting.

    Non-negative float32 values order like their bit patterns, so a histogram of the top 16 bits finds the
    bucket holding the k-th value; inside it, one process takes an exact kthvalue, several ranks sum a
    histogram of the low 16 bits (the bits of the k-th value, exactly).
    """
    top = _high_halves(values)
    histogram = torch.bincount(top, minlength=1 << 15)
    if comm is not None:
        histogram = comm.sum(histogram)
    cumulative = histogram.cumsum(0)
    bucket = int(torch.searchsorted(cumulative, torch.tensor([k], device=cumulative.device)).item())
    below = int(cumulative[bucket - 1].item()) if bucket else 0
    pool = values[top == bucket]
    if comm is None:
        return float(pool.kthvalue(k - below).values.item())
    low = comm.sum(torch.bincount(pool.view(torch.int32) & 0xFFFF, minlength=1 << 16)).cumsum(0)
    bits = (bucket << 16) | int(torch.searchsorted(low, torch.tensor([k - below])).item())
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32).item())


def _prune_lowest(values: torch.Tensor, count: int, spans: list[slice], comm: _Comm | None = None) -> torch.Tensor:
    """Flat bool "prune now" tensor selecting exactly ``count`` of the smallest ``(value, tensor, flat index)``.

    ``values`` are live magnitudes with +inf at pruned (or excluded) positions; ``spans`` are the tensors'
    slices of it in tensor order (on several ranks: this rank's rows of each, ranks holding rows in order).
    """
    prune = torch.zeros(values.numel(), dtype=torch.bool, device=values.device)
    if count <= 0:
        return prune
    threshold = _kth_smallest(values, count, comm)
    prune = values < threshold
    remaining = count - sum(_counts(prune, [slice(0, values.numel())], comm))
    if remaining <= 0:
        return prune
    ties = values == threshold  # the first ones in global order: tensor order, then flat index
    if comm is None:
        prune[torch.nonzero(ties).reshape(-1)[:remaining]] = True
        return prune
    table = comm.gather(torch.stack([ties[s].sum() for s in spans])).tolist()  # [rank][span]
    for i, span in enumerate(spans):
        before = sum(table[r][i] for r in range(comm.rank)) + sum(sum(row[:i]) for row in table)
        take = max(0, min(table[comm.rank][i], remaining - before))
        if take:
            prune[span.start + torch.nonzero(ties[span]).reshape(-1)[:take]] = True
    return prune


def magnitude_masks(weights: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor] | None = None, *,
                    sparsity: float | None = None, rate: float | None = None, ranking: str = "global",
                    min_density: float = 0.0) -> dict[str, torch.Tensor]:
    """Keep-masks (bool, shaped like each weight) that prune the smallest-magnitude live weights.

    Give ``sparsity`` (fraction of all weights in ``weights`` pruned afterwards; masks never regrow) or
    ``rate`` (fraction of the weights still alive pruned now). ``masks`` are the current keep-masks (absent =
    all alive); the result keeps a subset of them. ``ranking="global"`` uses one threshold over all tensors,
    ``"layerwise"`` one per tensor; ``min_density`` keeps at least ``ceil(min_density * numel)`` weights
    of every tensor (fewer only if fewer are alive). Ties are broken by tensor order, then flat index.

    All tensors must live on one device. The magnitudes are gathered into one float32 buffer (the only copy
    made), so a round is a handful of large kernels rather than several per layer. Weights sharded by
    ``fully_shard`` give bool DTensor masks laid out like them (collective: call on every rank), equal bit
    for bit to the masks of the whole weights.
    """
    if (sparsity is None) == (rate is None):
        raise OpenTransError("give exactly one of sparsity and rate")
    amount = float(sparsity if sparsity is not None else rate)
    if not 0.0 <= amount <= 1.0:
        raise OpenTransError(f"{'sparsity' if sparsity is not None else 'rate'} must lie in [0, 1], got {amount}")
    if ranking not in RANKINGS:
        raise OpenTransError(f"ranking must be one of {RANKINGS}, got {ranking!r}")
    names = list(weights)
    if not names:
        raise OpenTransError("no weights to prune")
    full = [weights[n].detach() for n in names]
    sharded = [is_dtensor(t) for t in full]
    comm = None
    if any(sharded):
        if not all(sharded):
            raise OpenTransError("some weights are sharded (DTensor) and some are not: prune one model at a time")
        for name, tensor in zip(names, full):
            check_row_sharded(tensor, name)
        comm = _Comm(full[0].device_mesh.get_group())
    masks = masks or {}
    device = full[0].device
    for name, tensor in zip(names, full):
        if tensor.device != device:
            raise OpenTransError(f"weights on {tensor.device} and {device}: put them on one device", tensor=name)
        mask = masks.get(name)
        if mask is not None and (tuple(mask.shape) != tuple(tensor.shape) or mask.dtype != torch.bool):
            raise OpenTransError(f"mask {tuple(mask.shape)}/{mask.dtype} does not fit weight {tuple(tensor.shape)}",
                                 tensor=name)
    with torch.no_grad():
        tensors = [local(t) for t in full]
        current = {n: local(shard_like(masks[n], w, n) if comm is not None else masks[n])
                   for n, w in zip(names, full) if masks.get(n) is not None}
    sizes = [t.numel() for t in full]  # whole tensors: targets and floors
    offsets = [0]
    for piece in tensors:
        offsets.append(offsets[-1] + piece.numel())
    spans = [slice(offsets[i], offsets[i + 1]) for i in range(len(names))]
    values = torch.cat([t.reshape(-1) for t in tensors]).to(torch.float32).abs_()
    alive: torch.Tensor | None = None
    if current:
        alive = torch.cat([current[n].reshape(-1).to(device) if n in current
                           else torch.ones(t.numel(), dtype=torch.bool, device=device)
                           for n, t in zip(names, tensors)])
        values.masked_fill_(~alive, math.inf)
        alive_counts = _counts(alive, spans, comm)
    else:
        alive_counts = list(sizes)
    floors = [math.ceil(float(min_density) * size) for size in sizes]
    capacity = [max(0, a - f) for a, f in zip(alive_counts, floors)]

    def target_prune(alive_count: int, numel: int) -> int:
        if sparsity is not None:
            return max(0, alive_count - round(numel * (1.0 - amount)))
        return alive_count - round(alive_count * (1.0 - amount))

    def within(i: int) -> list[slice]:
        return [slice(0, spans[i].stop - spans[i].start)]

    prune: torch.Tensor | None = None
    if ranking == "layerwise":
        prune = torch.zeros(offsets[-1], dtype=torch.bool, device=device)
        for i, size in enumerate(sizes):
            count = min(capacity[i], target_prune(alive_counts[i], size))
            prune[spans[i]] = _prune_lowest(values[spans[i]], count, within(i), comm)
    else:
        total = min(sum(capacity), target_prune(sum(alive_counts), sum(sizes)))
        if any(floors):
            prune = torch.zeros(offsets[-1], dtype=torch.bool, device=device)
        for i in range(len(sizes)):
            if capacity[i] == 0:
                values[spans[i]] = math.inf  # at its floor already: out of the global pool
        # water-filling: a layer that would drop under its floor is pruned down to the floor and leaves the pool
        while total > 0:
            chosen = _prune_lowest(values, total, spans, comm)
            chosen_counts = _counts(chosen, spans, comm) if any(floors) else []
            over = [i for i in range(len(sizes)) if any(floors) and capacity[i] > 0 and chosen_counts[i] > capacity[i]]
            if not over:
                prune = chosen if prune is None else prune | chosen
                break
            for i in over:
                prune[spans[i]] = _prune_lowest(values[spans[i]], capacity[i], within(i), comm)
                values[spans[i]] = math.inf
                total -= capacity[i]
                capacity[i] = 0
    if prune is None:
        keep = alive.clone() if alive is not None else torch.ones(offsets[-1], dtype=torch.bool, device=device)
    else:
        keep = ~prune if alive is None else alive & ~prune
    # views into one buffer: nothing ever writes into a keep-mask in place
    out = {name: keep[spans[i]].reshape(tensors[i].shape) for i, name in enumerate(names)}
    if comm is not None:
        out = {name: from_local_like(out[name].clone(), full[i]) for i, name in enumerate(names)}
    return out
