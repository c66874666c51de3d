"""Proof on demand that a masked model is exact, and whole-mask export from sharded models.

:func:`verify_exact` counts the pruned positions that are not exactly 0.0 (NaN counts) in every masked
parameter; under ``torch.distributed`` the per-tensor counts of all ranks are summed in one ``all_reduce``,
so every rank gets the same answer (call it on every rank). It reads each weight once and allocates one
bool tensor per parameter, so it is cheap enough to run every few hundred steps.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..errors import OpenTransError
from ..formats.subnetwork import Subnetwork, default_provenance
from .masks import mask_store, masked_parameters, unwrap
from .sharding import dist_world, full_mask, local


def verify_exact(model: nn.Module, *, raise_on_violation: bool = True, group: Any = None) -> dict[str, Any]:
    """Check that every pruned weight of ``model`` is exactly 0.0; a report, or :class:`OpenTransError`.

    The report: ``tensors`` (masked parameters on this rank), ``pruned`` (pruned positions, summed over
    ranks), ``violations`` (pruned positions not 0.0, summed over ranks), ``bad`` (up to 5 tensor names with
    violations). A model without masks raises: there is nothing to prove. Collective under
    ``torch.distributed`` (``group``: the process group, default WORLD): every rank must call it.
    """
    model = unwrap(model)
    names, counts = [], []
    with torch.no_grad():
        for module_name, module in model.named_modules():
            store = mask_store(module)
            if store is None:
                continue
            masked_parameters(module)  # follows parameters replaced since (sharding, assign=True loads)
            for attr, mask in store.items():
                param = store.params.get(attr)
                if param is None:
                    continue
                keep = local(mask)
                weights = local(param.detach())
                names.append(f"{module_name}.{attr}" if module_name else attr)
                # nonzero where pruned: NaN != 0 is True, so NaN counts as a violation
                counts.append(torch.stack([(~keep).sum(), ((weights != 0) & ~keep).sum()]))
    if not names:
        raise OpenTransError("verify_exact: the model holds no masks (apply a subnetwork first)")
    table = torch.stack(counts).to(torch.int64).cpu()
    _, world = dist_world()
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(table, group=group)
    pruned, violations = int(table[:, 0].sum()), int(table[:, 1].sum())
    bad = [name for name, row in zip(names, table.tolist()) if row[1]][:5]
    report = {"tensors": len(names), "pruned": pruned, "violations": violations, "bad": bad}
    if violations and raise_on_violation:
        raise OpenTransError(f"{violations} of {pruned} pruned weights are not exactly 0.0 (summed over "
                             f"{world} rank(s)); first tensors: {', '.join(bad)}")
    return report


def export_subnetwork(model: nn.Module, *, arch: str = "unknown", prefix: str = "",
                      provenance: Mapping[str, Any] | None = None) -> Subnetwork:
    """The model's current masks as a :class:`Subnetwork` (names under ``prefix``, stripped).

    On a model sharded by ``fully_shard`` each mask is all-gathered as bytes, one tensor at a time; no rank
    ever holds weights it does not own. Collective there: every rank must call it.
    """
    masks = {}
    for name, mask in masked_parameters(unwrap(model)).items():
        whole = full_mask(mask)
        if name.startswith(prefix):
            masks[name[len(prefix):]] = whole.cpu()
    if not masks:
        raise OpenTransError(f"the model holds no masks under prefix {prefix!r}")
    prov = default_provenance("export", prefix=prefix)
    prov.update(provenance or {})
    return Subnetwork(masks, arch=arch, provenance=prov)
