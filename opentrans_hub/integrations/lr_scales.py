"""Scale the learning rates of an optimizer a framework already built, parameter by parameter.

Frameworks build their optimizers with their own rules (detectron2: a bias learning-rate factor, no weight
decay on norms, per-module overrides, gradient clipping); a learning-rate budget must keep all of that and
only multiply each parameter's learning rate by its layer's scale. :func:`split_groups` does this on plain
parameter-group dicts (pure, no framework); :func:`apply_lr_scales` rewrites a freshly built optimizer's
groups in place, so its class, defaults and any wrapping (gradient clipping) stay as the framework made them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ..errors import OpenTransError


def split_groups(groups: Sequence[Mapping[str, Any]], scale_of: Callable[[torch.Tensor], float]
                 ) -> list[dict[str, Any]]:
    """Each group split by its parameters' scales: ``lr`` (and ``lr_scale``, 1.0 when absent) multiplied by the
    scale, every other option of the group kept. Groups keep their order, parameters theirs within a group;
    a group whose parameters share one scale stays one group."""
    out: list[dict[str, Any]] = []
    for group in groups:
        by_scale: dict[float, list[torch.Tensor]] = {}
        for param in group["params"]:
            by_scale.setdefault(float(scale_of(param)), []).append(param)
        for scale, params in by_scale.items():
            new = {**group, "params": params, "lr_scale": group.get("lr_scale", 1.0) * scale}
            new["lr"] = group["lr"] * scale
            out.append(new)
    return out


def apply_lr_scales(optimizer: torch.optim.Optimizer, scales: Mapping[torch.Tensor, float] | Mapping[int, float]
                    ) -> int:
    """Multiply the learning rate of each parameter in ``scales`` (a parameter or its ``id`` -> scale) by its
    scale, in ``optimizer``'s groups, in place; returns how many of the optimizer's parameters changed rate.

    Only a fresh optimizer: one that has stepped (its state would sit under the old groups) or that a
    learning-rate scheduler already wraps (it keeps each group's ``initial_lr`` by position) is refused.
    """
    if optimizer.state:
        raise OpenTransError("the optimizer has already stepped: scale the learning rates right after building it")
    if any("initial_lr" in group for group in optimizer.param_groups):
        raise OpenTransError("a learning-rate scheduler was already built on this optimizer: scale the learning "
                             "rates first, then build the scheduler (it keeps each group's initial_lr by position)")
    by_id = {(key if isinstance(key, int) else id(key)): float(value) for key, value in scales.items()}
    changed = sum(1 for group in optimizer.param_groups for p in group["params"] if by_id.get(id(p), 1.0) != 1.0)
    optimizer.param_groups[:] = split_groups(optimizer.param_groups, lambda p: by_id.get(id(p), 1.0))
    return changed
