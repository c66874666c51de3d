"""The power-law fit of a spectrum: the exponent alpha that OpenTrans selects layers by.

Eigenvalues ``<= 1e-5`` are dropped (all kept when none is left). A power law ``p(x) ~ x^-alpha`` is fitted
to the tail above ``x_min`` with the Hill/MLE

    alpha = 1 + n / (sum_{i>=k} log lambda_i - n log x_min),   n = number of eigenvalues >= x_min,

and ``D``, the Kolmogorov-Smirnov distance between the fitted and the empirical tail CDF, picks ``x_min``:

* ``peak`` (OpenTrans' ``xmin_peak``): only candidates in a window around the peak of a 100-bin histogram
  of ``log10(lambda)``; the lowest ``D`` wins;
* ``mid``: ``x_min`` is the eigenvalue at position ``N // 2`` (no search);
* ``scan``: every eigenvalue but the largest is a candidate (weightwatcher's default ``analyze()``).

Quirks of the research code reproduced on purpose, because they change which layers are frozen:

1. The peak window's lower bound is ``log10(0.95 * 10**edge)`` (a log10 value) but is compared with raw
   eigenvalues, while the upper bound ``1.5 * 10**edge`` is raw; ``edge`` is the *left* edge of the peak
   bin. With eigenvalues below 1 the lower bound is negative, so the window reaches down to the smallest
   eigenvalue.
2. Candidates outside the window, and candidates whose alpha is ``<= 1``, keep ``D = 1`` and (outside the
   window) ``alpha = 0``; the arg-min over all ``N - 1`` positions takes the *first* minimum. So when no
   candidate beats ``D = 1`` the result is the value at position 0, usually ``alpha = 0``.
3. ``D`` compares the fitted CDF with the lower step of the empirical CDF, ``(j - k) / n``.

The fit is vectorised over all candidates of all layers.
"""

from __future__ import annotations

import math

import torch

from ..errors import OpenTransError

XMIN_METHODS = ("peak", "mid", "scan")
EVALS_THRESH = 1e-5
BINS = 100
_CHUNK_ELEMENTS = 1 << 22


def peak_window(eigs: torch.Tensor, bins: int) -> tuple[float, float]:
    """The research code's candidate window around the histogram peak (quirk 1 of the module doc)."""
    logs = torch.log10(eigs)
    lo, hi = float(logs.min()), float(logs.max())
    counts = torch.histc(logs, bins=bins, min=lo, max=hi)
    edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
    peak = 10 ** float(edges[int(torch.argmax(counts))])
    return math.log10(0.95 * peak), 1.5 * peak


def fit_power_laws(spectra: list[torch.Tensor], xmin: str = "peak", bins: int = BINS,
                   evals_thresh: float = EVALS_THRESH) -> list[dict[str, float]]:
    """Fit every spectrum (ascending eigenvalues) at once; returns alpha, D, xmin and the spectrum stats."""
    if xmin not in XMIN_METHODS:
        raise OpenTransError(f"unknown x_min method {xmin!r}; choose one of {', '.join(XMIN_METHODS)}")
    kept = []
    for eigs in spectra:
        eigs = eigs.double()
        nz = eigs[eigs > evals_thresh]
        if not nz.numel():
            # the research code then keeps them all; an emptied (fully pruned) layer's zeros have no logarithm
            nz = eigs[eigs > 0]
        kept.append(nz)
    if not kept:
        return []
    if all(e.numel() < 2 for e in kept):
        return [_no_fit(e) for e in kept]
    sizes = torch.tensor([e.numel() for e in kept])
    layers, width = len(kept), int(sizes.max())
    x = torch.ones(layers, width, dtype=torch.float64)
    valid = torch.arange(width).unsqueeze(0) < sizes.unsqueeze(1)
    for row, eigs in enumerate(kept):
        x[row, : eigs.numel()] = eigs
    logx = torch.where(valid, torch.log(x), torch.zeros_like(x))
    suffix = logx.flip(1).cumsum(1).flip(1)  # sum_{j >= i} log x_j
    index = torch.arange(width, dtype=torch.float64).unsqueeze(0)
    n = sizes.unsqueeze(1).double() - index
    with torch.no_grad():
        alpha = 1 + n / (suffix - n * logx)
    positions = valid & (index < sizes.unsqueeze(1) - 1)  # every eigenvalue but the largest
    if xmin == "scan":
        candidate = positions.clone()
    elif xmin == "mid":
        candidate = torch.zeros_like(positions)
        candidate[torch.arange(layers), (sizes // 2).clamp_max(width - 1)] = True
        candidate &= valid
    else:
        candidate = torch.zeros_like(positions)
        for row, eigs in enumerate(kept):
            if eigs.numel() < 2:
                continue
            low, high = peak_window(eigs, bins)
            candidate[row] = positions[row] & (x[row] >= low) & (x[row] <= high)
    needs_d = candidate if xmin == "mid" else candidate & (alpha > 1)
    distance = torch.ones(layers, width, dtype=torch.float64)
    rows, cols = needs_d.nonzero(as_tuple=True)
    if rows.numel():
        if xmin == "mid":
            distance[rows, cols] = _ks_distance(x, logx, alpha, n, sizes, rows, cols)
        else:
            _min_distances(distance, x, logx, alpha, n, sizes, rows, cols)
    results = []
    for row, eigs in enumerate(kept):
        size = eigs.numel()
        if size < 2:
            results.append(_no_fit(eigs))
            continue
        spectral = float(eigs[-1])
        total = float(eigs.sum())
        stats = {"num_eigs": size, "spectral_norm": spectral, "norm": total,
                 "stable_rank": total / spectral if spectral > 0 else float("nan"), "xmax": spectral}
        if xmin == "mid":
            best = min(size // 2, size - 1)
        else:  # first minimum over the N - 1 positions (quirk 2)
            best = int(torch.argmin(distance[row, : size - 1]))
        a = float(alpha[row, best]) if bool(candidate[row, best]) else 0.0
        results.append({**stats, "alpha": a, "D": float(distance[row, best]), "xmin": float(x[row, best])})
    return results


def _no_fit(eigs: torch.Tensor) -> dict[str, float]:
    """Stats of a spectrum too short to fit (fewer than two positive eigenvalues): alpha, D, xmin are NaN."""
    nan = float("nan")
    spectral = float(eigs[-1]) if eigs.numel() else 0.0
    total = float(eigs.sum())
    return {"num_eigs": eigs.numel(), "spectral_norm": spectral, "norm": total,
            "stable_rank": total / spectral if spectral > 0 else nan, "xmax": spectral if eigs.numel() else nan,
            "alpha": nan, "D": nan, "xmin": nan}


def _ks_distance(x: torch.Tensor, logx: torch.Tensor, alpha: torch.Tensor, n: torch.Tensor, sizes: torch.Tensor,
                 rows: torch.Tensor, cols: torch.Tensor, samples: int | None = None) -> torch.Tensor:
    """KS distance of candidate (row, col) pairs: max_j |1 - (x_j/x_k)^(1-alpha) - (j-k)/n| over j >= k.

    With ``samples`` only that many tail positions per candidate are looked at (evenly spread, first and
    last included), which gives a lower bound. Candidates are processed in chunks sorted by layer size.
    """
    out = torch.empty(rows.numel(), dtype=torch.float64)
    order = torch.argsort(sizes[rows], stable=True)
    ordered = sizes[rows[order]]
    total, start = order.numel(), 0
    while start < total:
        end = min(total, start + max(1, _CHUNK_ELEMENTS // (samples or int(ordered[start]))))
        while samples is None and end > start + 1 and (end - start) * int(ordered[end - 1]) > _CHUNK_ELEMENTS:
            end = start + max(1, _CHUNK_ELEMENTS // int(ordered[end - 1]))
        pick = order[start:end]
        r, c = rows[pick], cols[pick]
        tail = n[r, c].unsqueeze(1)  # n_k = N - k
        if samples is None:
            j = torch.arange(int(ordered[end - 1])).unsqueeze(0).expand(r.numel(), -1)
        else:
            steps = torch.arange(samples, dtype=torch.float64).unsqueeze(0) / (samples - 1)
            j = c.unsqueeze(1) + torch.floor(steps * (tail - 1)).long()
        offset = (j - c.unsqueeze(1)).to(torch.float64)
        inside = (offset >= 0) & (j < sizes[r].unsqueeze(1))
        values = logx[r.unsqueeze(1), j.clamp_max(logx.shape[1] - 1)] - logx[r, c].unsqueeze(1)
        values.mul_((1 - alpha[r, c]).unsqueeze(1)).exp_().neg_().add_(1)
        values.sub_(offset / tail).abs_()
        values.masked_fill_(~inside, 0.0)
        out[pick] = values.amax(1)
        start = end
    return out


def _min_distances(distance: torch.Tensor, x: torch.Tensor, logx: torch.Tensor, alpha: torch.Tensor,
                   n: torch.Tensor, sizes: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> None:
    """Fill ``distance`` so that its first arg-min per layer is the one exact KS distances would give.

    Exact distances are computed only where needed: a sampled pass gives a lower bound for every
    candidate; the candidate with the smallest bound gets its exact distance ``U`` per layer; every
    candidate whose bound is ``<= U`` gets its exact distance too. The others keep their bound, which is
    ``> U >= min D``, so they can neither be nor tie with the minimum.
    """
    samples = 64
    if int(sizes.max()) <= samples:
        distance[rows, cols] = _ks_distance(x, logx, alpha, n, sizes, rows, cols)
        return
    bound = _ks_distance(x, logx, alpha, n, sizes, rows, cols, samples)
    distance[rows, cols] = bound
    masked = torch.full_like(distance, math.inf)
    masked[rows, cols] = bound
    best_col = masked.argmin(1)
    has = torch.isfinite(masked.gather(1, best_col.unsqueeze(1))).squeeze(1)
    best_rows = has.nonzero(as_tuple=True)[0]
    upper = torch.full((distance.shape[0],), math.inf, dtype=torch.float64)
    upper[best_rows] = _ks_distance(x, logx, alpha, n, sizes, best_rows, best_col[best_rows])
    survive = bound <= upper[rows]
    sr, sc = rows[survive], cols[survive]
    distance[sr, sc] = _ks_distance(x, logx, alpha, n, sizes, sr, sc)
