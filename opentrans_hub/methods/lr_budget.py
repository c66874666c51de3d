"""Learning-rate budgets from the spectrum: each layer's learning rate scaled linearly with its alpha.

A layer with a larger alpha (a lighter-tailed spectrum, less shaped by training) learns faster, as in
TempBalance: over the layers that have an alpha, ``scale = lo + (hi - lo) * (alpha - alpha_min) /
(alpha_max - alpha_min)``, so the lowest alpha gets ``lo`` and the highest ``hi``. When every alpha is the
same (or only one layer has one) there is no spread to follow and each of them gets the midpoint
``(lo + hi) / 2``. Layers without an alpha (fewer than two eigenvalues) get 1.0: no evidence, no change.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ..errors import OpenTransError

#: the default ``(lo, hi)`` of ``--policy alpha-lr``
DEFAULT_LR_RANGE = (0.5, 1.5)


def check_lr_range(lr_range: Sequence[float]) -> tuple[float, float]:
    """``(lo, hi)`` as floats: two finite numbers with ``0 < lo <= hi``, else :class:`OpenTransError`."""
    try:
        lo, hi = (float(x) for x in lr_range)
    except (TypeError, ValueError, OverflowError):
        raise OpenTransError(f"the lr range must be two numbers LO HI, got {lr_range!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo <= 0 or lo > hi:
        raise OpenTransError(f"the lr range needs finite 0 < LO <= HI, got {lo:g} {hi:g}")
    return lo, hi


def alpha_lr_scales(alphas: Sequence[float | None], lr_range: Sequence[float] = DEFAULT_LR_RANGE) -> list[float]:
    """One learning-rate scale per alpha (``None`` or NaN: no alpha, scale 1.0), linear in alpha over ``lr_range``."""
    lo, hi = check_lr_range(lr_range)
    known = [a for a in alphas if a is not None and not math.isnan(a)]
    low, high = (min(known), max(known)) if known else (0.0, 0.0)
    scales = []
    for alpha in alphas:
        if alpha is None or math.isnan(alpha):
            scales.append(1.0)
        elif high == low:
            scales.append((lo + hi) / 2)
        else:
            scales.append(lo + (hi - lo) * (alpha - low) / (high - low))
    return scales


def budget_summary(selection: Any) -> str:
    """One line on a selection's learning-rate scales: their range, the layers at 1.0, the weights' mean scale."""
    layers = selection.layers
    scales = [layer.get("lr_scale", 1.0) for layer in layers]
    no_alpha = sum(1 for layer in layers if layer.get("alpha") is None)
    trained = [(layer.get("lr_scale", 1.0), int(layer.get("num_params") or 0)) for layer in layers
               if layer["trainable"]]
    weights = sum(n for _, n in trained)
    mean = math.fsum(s * n for s, n in trained) / weights if weights else float("nan")
    span = f"{min(scales):.3f}..{max(scales):.3f}" if scales else "-"
    return (f"lr budget: scales {span} over {len(layers)} layers ({no_alpha} without an alpha at 1.0), "
            f"{len(trained)} trainable; weight-weighted mean scale of the trainable layers {mean:.3f}")


def extreme_layers(selection: Any, count: int = 3) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The ``count`` layers with the highest and the lowest learning-rate scale (ties in network order)."""
    layers = list(selection.layers)
    top = sorted(layers, key=lambda layer: -layer.get("lr_scale", 1.0))[:count]
    bottom = sorted(layers, key=lambda layer: layer.get("lr_scale", 1.0))[:count]
    return top, bottom
