"""Selection policies: which layers fine-tune, from per-layer metrics (alpha), as a LayerSelection."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import OpenTransError
from ..formats.selection import LayerSelection
from .lr_budget import DEFAULT_LR_RANGE, alpha_lr_scales

POLICIES = ("median", "fraction", "count", "budget", "alpha-lr")


def _number(value: Any) -> float | None:
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def _layer_dict(metric: Any) -> dict[str, Any]:
    data = metric.to_dict() if hasattr(metric, "to_dict") else dict(metric)
    for key, value in list(data.items()):  # JSON has no NaN: unknown metrics are null
        if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
            data[key] = None
    return data


def select_layers(metrics: Sequence[Any], policy: str = "median", *, arch: str = "unknown",
                  weights_sha256: str | None = None, provenance: Mapping[str, Any] | None = None,
                  fraction: float | None = None, count: int | None = None,
                  max_params: int | None = None, lr_range: Sequence[float] | None = None) -> LayerSelection:
    """A LayerSelection from per-layer metrics (``LayerMetrics`` or dicts with ``name``/``alpha``).

    Policies (layers with a higher alpha, the lighter tail, are the ones fine-tuned):

    * ``median`` (the paper): freeze layers with ``alpha < median(alpha)``; the others train, so with an
      odd number of layers the median layer trains (numpy's median: the mean of the middle two otherwise);
    * ``fraction``: train ``round(fraction * layers)`` layers with the highest alpha;
    * ``count``: train the ``count`` layers with the highest alpha;
    * ``budget``: walk layers from the highest alpha down, train each that still fits in ``max_params``
      trainable weights (a layer too large is skipped, smaller ones after it may still fit);
    * ``alpha-lr``: every layer trains, each with a learning-rate scale from its alpha over ``lr_range``
      (default 0.5 to 1.5; see :func:`~opentrans_hub.methods.lr_budget.alpha_lr_scales`).

    ``lr_range=(lo, hi)`` with any other policy adds the same scales on top of its flags (frozen layers keep
    ``trainable: false`` and carry their scale, unused while they are frozen). The scales spread over every
    layer with an alpha, frozen or not, so a selection's budget does not depend on the policy. Ties keep
    network order. Layers without an alpha (fewer than two eigenvalues) train under every policy, get scale
    1.0 and do not count towards the median, fraction, count or budget.
    """
    if policy not in POLICIES:
        raise OpenTransError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    layers = [_layer_dict(m) for m in metrics]
    for layer in layers:
        layer.pop("trainable", None)
        layer.pop("lr_scale", None)
    known = [i for i, layer in enumerate(layers) if _number(layer.get("alpha")) is not None]
    ranked = sorted(known, key=lambda i: -_number(layers[i]["alpha"]))  # stable: ties in network order
    chosen: set[int] = set()
    record: dict[str, Any] = {"name": policy}
    if policy == "median":
        if known:
            alphas = sorted(_number(layers[i]["alpha"]) for i in known)
            mid = len(alphas) // 2
            median = alphas[mid] if len(alphas) % 2 else (alphas[mid - 1] + alphas[mid]) / 2
            chosen = {i for i in known if _number(layers[i]["alpha"]) >= median}
            record["median"] = median
    elif policy == "fraction":
        if fraction is None or not 0 <= fraction <= 1:
            raise OpenTransError(f"policy 'fraction' needs 0 <= fraction <= 1, got {fraction!r}")
        take = int(round(fraction * len(known)))
        chosen = set(ranked[:take])
        record["fraction"] = fraction
    elif policy == "count":
        if count is None or count < 0:
            raise OpenTransError(f"policy 'count' needs count >= 0, got {count!r}")
        chosen = set(ranked[:count])
        record["count"] = int(count)
    elif policy == "alpha-lr":
        chosen = set(known)
        lr_range = DEFAULT_LR_RANGE if lr_range is None else lr_range
    else:
        if max_params is None or max_params < 0:
            raise OpenTransError(f"policy 'budget' needs max_params >= 0, got {max_params!r}")
        used = 0
        for i in ranked:
            size = int(layers[i].get("num_params") or 0)
            if used + size <= max_params:
                chosen.add(i)
                used += size
        record["max_params"] = int(max_params)
        record["used_params"] = used
    for i, layer in enumerate(layers):
        layer["trainable"] = i in chosen or i not in known
    if lr_range is not None:
        scales = alpha_lr_scales([_number(layer.get("alpha")) for layer in layers], lr_range)
        for layer, scale in zip(layers, scales):
            layer["lr_scale"] = scale
        record["lr_range"] = [float(x) for x in lr_range]
        alphas = [_number(layers[i]["alpha"]) for i in known]
        record["alpha_range"] = [min(alphas), max(alphas)] if alphas else None
    record["trainable_layers"] = sum(layer["trainable"] for layer in layers)
    record["trainable_params"] = sum(int(layer.get("num_params") or 0) for layer in layers if layer["trainable"])
    return LayerSelection(layers, arch=arch, policy=record, weights_sha256=weights_sha256, provenance=provenance)
