"""Spectra of the open_clip RN50 visual tower on CPU: opentrans-hub vs weightwatcher vs the research loop.

Peers run interleaved in one process, ``--repeats`` times (median reported):

* ours: ``compute_metrics(tower, "peak", cache=False)`` (Gram eigvalsh in float64, vectorised bounded fit);
* weightwatcher: ``WeightWatcher(model=tower).analyze()`` with default settings;
* research: a per-layer loop of the OpenTrans formula as the research code runs it (``svdvals`` in float32,
  a Python loop over x_min candidates, ``xmin_peak``).

Also measured: ``cached_s`` (a second call on the same tower), ``content_cached_s`` (a deep copy: content
hash + cached eigenvalues, fit recomputed), agreement of alphas with the research loop (peak) and with
weightwatcher (scan, layers with >= 20 eigenvalues). Random-init weights (no downloads here). The last line
of stdout is one JSON object.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings

import _bench
import torch


def research_loop(tower: torch.nn.Module, conv_norm: float = 0.5, thresh: float = 1e-5, bins: int = 100) -> dict:
    """OpenTrans' per-layer estimator, rewritten here: float32 svdvals, Python loop over peak-window candidates."""
    out = {}
    for name, module in tower.named_modules():
        if not isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            continue
        w = module.weight.detach().clone()
        if isinstance(module, torch.nn.Linear) and max(w.shape) / min(w.shape) >= 8:
            continue
        if w.dim() > 2:
            w = w.flatten(2).permute(2, 0, 1) * math.sqrt(conv_norm)
        eigs = torch.sort(torch.square(torch.linalg.svdvals(w.float()).flatten())).values
        nz = eigs[eigs > thresh]
        if nz.numel() == 0:
            nz = eigs
        count = nz.numel()
        logs = torch.log(nz)
        h = torch.log10(nz)
        lo, hi = h.min(), h.max()
        counts = torch.histc(h, bins, min=float(lo), max=float(hi))
        edges = torch.linspace(float(lo), float(hi), bins + 1)
        peak = 10 ** edges[torch.argmax(counts)]
        low, high = torch.log10(0.95 * peak), 1.5 * peak
        alphas, dists = torch.zeros(count - 1), torch.ones(count - 1)
        for i, x0 in enumerate(nz[:-1]):
            if x0 < low:
                continue
            if x0 > high:
                break
            n = float(count - i)
            a = 1 + n / (torch.sum(logs[i:]) - n * logs[i])
            alphas[i] = a
            if a > 1:
                dists[i] = torch.max(torch.abs(1 - (nz[i:] / x0) ** (-a + 1) - torch.arange(n) / n))
        out[f"{name}.weight"] = float(alphas[torch.argmin(dists)])
    return out


def weightwatcher_run(tower: torch.nn.Module) -> dict:
    import weightwatcher

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        details = weightwatcher.WeightWatcher(model=tower).analyze()
    return {f"{row.longname}.weight": (float(row.alpha), int(row.num_evals)) for row in details.itertuples()}


def main() -> None:
    parser = _bench.options(__doc__, repeats=3, quick="one repeat", threads=0,
                            threads_help="pin torch and BLAS threads for every peer (0: each peer's defaults, as "
                                         "users run them; opentrans-hub caps itself at 1 thread by default)")
    args = _bench.parse(parser, repeats=1)
    repeats = args.repeats
    logging.disable(logging.WARNING)
    if args.threads > 0:
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.threads)
        torch.set_num_threads(args.threads)
    from opentrans_hub.methods.spectral import clear_cache, compute_metrics

    tower = _bench.rn50_tower()
    times = _bench.Timings("ours", "weightwatcher", "research")
    for rep in range(repeats):
        clear_cache()
        with times.time("ours"):
            ours = compute_metrics(tower, "peak", cache=False, threads=args.threads or 1)
        with times.time("weightwatcher"):
            ww = weightwatcher_run(tower)
        with times.time("research"):
            research = research_loop(tower)
        print(f"repeat {rep + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.wall.items()), flush=True)
    compute_metrics(tower, "peak")  # fill the caches
    cached = _bench.median(_bench.timed(compute_metrics, tower, "peak")[0] for _ in range(5))
    clone = copy.deepcopy(tower)
    content_cached = _bench.timed(compute_metrics, clone, "peak")[0]
    scan = {m.name: m for m in compute_metrics(tower, "scan")}
    peak_diff = max(abs(m.alpha - research[m.name]) for m in ours)
    ours_alpha = {m.name: m.alpha for m in ours}
    med_ours = _bench.median(ours_alpha.values())
    med_research = _bench.median(research.values())
    frozen_agree = sum((ours_alpha[k] < med_ours) == (research[k] < med_research) for k in ours_alpha)
    ww_layers = [k for k in scan if k in ww and scan[k].num_eigs >= 20]
    ww_diff = max(abs(scan[k].alpha - ww[k][0]) for k in ww_layers)
    medians = times.medians()
    result = {
        "layers": len(ours), "repeats": repeats, "threads": args.threads or "default", **_bench.host(),
        "ours_s": round(medians["ours"], 3), "weightwatcher_s": round(medians["weightwatcher"], 3),
        "research_loop_s": round(medians["research"], 3),
        "ours_over_weightwatcher": round(medians["ours"] / medians["weightwatcher"], 3),
        "ours_over_research_loop": round(medians["ours"] / medians["research"], 3),
        "cached_s": round(cached, 5), "content_cached_s": round(content_cached, 3),
        "max_alpha_diff_vs_research_peak": round(peak_diff, 6),
        "frozen_set_agreement_vs_research": f"{frozen_agree}/{len(ours_alpha)}",
        "max_alpha_diff_scan_vs_weightwatcher": round(ww_diff, 5), "weightwatcher_layers_compared": len(ww_layers),
        "all_s": times.all_s(3),
    }
    _bench.emit(result, args)


if __name__ == "__main__":
    main()
