"""Spectral (ESD) metrics of weight matrices: the power-law exponent alpha that OpenTrans selects layers by.

For every Conv1d/Conv2d/Linear weight the eigenvalues of the empirical spectral density are the squared
singular values of the weight; a convolution ``out x in x kh x kw`` counts as ``kh*kw`` matrices ``out x in``
scaled by ``sqrt(conv_norm)`` whose spectra are pooled. Eigenvalues ``<= 1e-5`` are dropped (all kept when
none is left). A power law ``p(x) ~ x^-alpha`` is fitted to the tail above ``x_min`` with the Hill/MLE

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
4. Linear layers with aspect ratio ``>= 8`` are skipped (classifier heads); convolutions never are.
5. Linear weights inside attention (name contains ``attn``/``attention``) whose one side is three times
   the other are split into q/k/v; ``nn.MultiheadAttention.in_proj_weight`` is split the same way (the
   research code missed it because it is not a Linear module; we include it on purpose).

Speed: the eigen-decomposition dominates and is done once per weight: on CPU through the Gram matrix of
the smaller side in float64 (``eigvalsh``; float32 would corrupt the small eigenvalues), on CUDA with
``svdvals`` in float32 as the research code does. The fit is vectorised over all candidates of all layers.
Results are cached in memory by tensor identity and by content hash (sha256), optionally on disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import OpenTransError
from ..io.atomic import atomic_write_text

XMIN_METHODS = ("peak", "mid", "scan")
CONV_NORM = 0.5
EVALS_THRESH = 1e-5
MAX_ASPECT = 8.0
BINS = 100
_CACHE_VERSION = "opentrans-hub/spectral/v1"
_CHUNK_ELEMENTS = 1 << 22


@dataclass
class LayerMetrics:
    """ESD metrics of one weight matrix (or one q/k/v part of an attention in-projection).

    ``name`` is the layer's key in a LayerSelection: the parameter name, with ``:q``/``:k``/``:v``
    appended for the parts of a split attention projection; ``param`` is the parameter it belongs to.
    """

    name: str
    param: str
    kind: str  # conv | linear | attn
    shape: tuple[int, ...]
    alpha: float
    D: float
    xmin: float
    xmax: float
    num_eigs: int
    spectral_norm: float
    stable_rank: float
    norm: float
    alpha_weighted: float
    num_params: int

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["shape"] = list(self.shape)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerMetrics:
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        fields["shape"] = tuple(fields.get("shape", ()))
        return cls(**fields)


@dataclass
class _Matrix:
    """A matrix stack ``(k, m, n)`` to analyse, with where it came from."""

    name: str
    param: str
    kind: str
    shape: tuple[int, ...]
    source: torch.Tensor  # the parameter as stored (for hashing)
    part: tuple[int, int, int] | None  # (dim, index, parts) for q/k/v splits
    num_params: int

    def stack(self, conv_norm: float) -> torch.Tensor:
        w = self.source.detach()
        if self.part is not None:
            dim, index, parts = self.part
            w = w.chunk(parts, dim=dim)[index]
        if w.dim() > 2:  # conv: (out, in, *k) -> (prod k, out, in), scaled
            w = w.flatten(start_dim=2).permute(2, 0, 1) * math.sqrt(conv_norm)
        else:
            w = w.unsqueeze(0)
        return w


# ----------------------------------------------------------------------------------------- collection
def _is_attention(name: str) -> bool:
    lowered = name.lower()
    return "attn" in lowered or "attention" in lowered


def _split_spec(shape: tuple[int, ...]) -> int | None:
    """Dimension along which a 2-D weight holds q, k and v (one side three times the other), else None."""
    if len(shape) != 2:
        return None
    rows, cols = shape
    if rows == 3 * cols:
        return 0
    if cols == 3 * rows:
        return 1
    return None


def _add_weight(out: list[_Matrix], param: str, weight: torch.Tensor, kind: str, split: bool,
                max_aspect: float | None) -> None:
    shape = tuple(weight.shape)
    dim = _split_spec(shape) if split else None
    if dim is not None:
        for index, part in enumerate("qkv"):
            part_shape = list(shape)
            part_shape[dim] //= 3
            out.append(_Matrix(f"{param}:{part}", param, "attn", tuple(part_shape), weight, (dim, index, 3),
                               weight.numel() // 3))
        return
    if kind == "linear" and max_aspect is not None and min(shape) > 0 and max(shape) / min(shape) >= max_aspect:
        return
    out.append(_Matrix(param, param, kind, shape, weight, None, weight.numel()))


def collect_matrices(source: nn.Module | Mapping[str, torch.Tensor], max_aspect: float | None = MAX_ASPECT,
                     split_qkv: bool = True) -> list[_Matrix]:
    """The weights to analyse, in network order.

    A module contributes the ``weight`` of every Conv1d/Conv2d/Linear and the ``in_proj_weight`` of every
    ``nn.MultiheadAttention``; a state dict contributes every tensor whose name ends in ``weight``: 4-D
    (and 3-D) ones as convolutions, 2-D ones as linear layers.
    """
    out: list[_Matrix] = []
    if isinstance(source, nn.Module):
        seen: set[int] = set()
        for module_name, module in source.named_modules():
            prefix = f"{module_name}." if module_name else ""
            if isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
                _add_weight(out, prefix + "in_proj_weight", module.in_proj_weight, "linear", split_qkv, max_aspect)
                continue
            if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
                continue
            weight = module.weight
            if weight is None or id(weight) in seen:
                continue
            seen.add(id(weight))
            kind = "linear" if isinstance(module, nn.Linear) else "conv"
            _add_weight(out, prefix + "weight", weight, kind, split_qkv and kind == "linear"
                        and _is_attention(module_name), max_aspect)
        return out
    if not isinstance(source, Mapping):
        raise OpenTransError(f"expected an nn.Module or a state dict, got {type(source).__name__}")
    for name, tensor in source.items():
        if not isinstance(tensor, torch.Tensor) or not name.endswith("weight") or not tensor.is_floating_point():
            continue
        if tensor.dim() in (3, 4):
            _add_weight(out, name, tensor, "conv", False, max_aspect)
        elif tensor.dim() == 2:
            split = split_qkv and (name.endswith("in_proj_weight") or _is_attention(name))
            _add_weight(out, name, tensor, "linear", split, max_aspect)
    return out


# ----------------------------------------------------------------------------------------- eigenvalues
def eigenvalues(stack: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """Squared singular values of every matrix in ``stack`` (k, m, n), pooled, ascending, float64 on CPU.

    CPU: ``eigvalsh`` of the smaller Gram matrix in float64. CUDA: ``svdvals`` in float32 (the research
    code's route), squared after the move back to float64.
    """
    device = torch.device(device) if device is not None else stack.device
    if device.type == "cuda":
        s = torch.linalg.svdvals(stack.to(device=device, dtype=torch.float32))
        eigs = s.double().square().flatten().cpu()
    else:
        a = stack.detach().to(device="cpu", dtype=torch.float64).contiguous()
        eigs = _gram_eigenvalues_scipy(a) if _HAVE_SCIPY else None
        if eigs is None:
            gram = a @ a.transpose(1, 2) if a.shape[1] <= a.shape[2] else a.transpose(1, 2) @ a
            eigs = torch.linalg.eigvalsh(gram).flatten()
        eigs = eigs.clamp_min(0.0)
    return torch.sort(eigs).values


try:  # LAPACK through scipy when present: dsyrk (half a matmul) + dsyev is ~30 % faster than mm + syevd;
    # only together with threadpoolctl, which keeps scipy's BLAS pool from oversubscribing busy cores
    import threadpoolctl  # noqa: F401
    from scipy.linalg import blas as _blas
    from scipy.linalg import eigh as _eigh

    _HAVE_SCIPY = True
except ImportError:  # pragma: no cover - scipy is optional
    _HAVE_SCIPY = False


def _gram_eigenvalues_scipy(a: torch.Tensor) -> torch.Tensor | None:
    """Eigenvalues of the smaller Gram matrix of every (m, n) slice of ``a`` (float64, C-contiguous)."""
    arrays = a.numpy()
    wide = a.shape[1] <= a.shape[2]
    out = []
    for x in arrays:
        # x is C-ordered, so x.T is a Fortran-ordered view: trans=1 gives x @ x.T, trans=0 gives x.T @ x
        gram = _blas.dsyrk(1.0, x.T, trans=1 if wide else 0)
        out.append(_eigh(gram, lower=False, eigvals_only=True, driver="ev", check_finite=False, overwrite_a=True))
    return torch.from_numpy(np.concatenate(out)) if out else None


# ----------------------------------------------------------------------------------------- the fit
def _peak_window(eigs: torch.Tensor, bins: int) -> tuple[float, float]:
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
            low, high = _peak_window(eigs, bins)
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


# ----------------------------------------------------------------------------------------- caching
_IDENTITY_MEMO: dict[tuple, tuple[list[weakref.ref], list[LayerMetrics]]] = {}
_EIGS_BY_CONTENT: dict[str, torch.Tensor] = {}
_EIGS_LIMIT = 4096


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 over dtype, shape and bytes of one tensor."""
    t = tensor.detach().to("cpu").contiguous()
    digest = hashlib.sha256(f"{t.dtype}\0{tuple(t.shape)}\0".encode())
    if t.numel():
        digest.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def default_cache_dir() -> Path:
    """Where metrics are cached on disk: ``$OPENTRANS_HUB_CACHE/spectral``, else ``$OPENTRANS_HUB_HOME/cache/spectral``
    (a user who moved the registry elsewhere gets nothing written under ``~/.cache``), else the platform's user
    cache folder."""
    root = os.environ.get("OPENTRANS_HUB_CACHE")
    if root:
        return Path(root).expanduser() / "spectral"
    home = os.environ.get("OPENTRANS_HUB_HOME")
    if home:
        return Path(home).expanduser() / "cache" / "spectral"
    import platformdirs

    return Path(platformdirs.user_cache_dir("opentrans-hub")) / "spectral"


def clear_cache() -> None:
    """Forget everything cached in memory (the disk cache stays)."""
    _IDENTITY_MEMO.clear()
    _EIGS_BY_CONTENT.clear()


def _identity_key(matrices: list[_Matrix]) -> tuple:
    return tuple((m.name, id(m.source), m.source._version, m.source.data_ptr(), tuple(m.source.shape),
                  str(m.source.dtype), str(m.source.device)) for m in matrices)


@contextlib.contextmanager
def _thread_limit(threads: int | None) -> Iterator[None]:
    """torch intra-op and BLAS/OpenMP pools at ``threads`` for the duration (restored afterwards)."""
    if threads is None:
        yield
        return
    previous = torch.get_num_threads()
    limiter = None
    try:
        from threadpoolctl import threadpool_limits

        limiter = threadpool_limits(threads)
    except ImportError:  # pragma: no cover - threadpoolctl is optional
        pass
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
        if limiter is not None:
            limiter.restore_original_limits()


# ----------------------------------------------------------------------------------------- entry point
def compute_metrics(source: nn.Module | Mapping[str, torch.Tensor], xmin: str = "peak", *,
                    conv_norm: float = CONV_NORM, max_aspect: float | None = MAX_ASPECT,
                    evals_thresh: float = EVALS_THRESH, bins: int = BINS, split_qkv: bool = True,
                    device: torch.device | str | None = None, cache: bool = True,
                    cache_dir: str | os.PathLike | None = None, progress: bool = False,
                    threads: int | None = 1) -> list[LayerMetrics]:
    """Metrics for every analysed weight of ``source`` (a module or a state dict), in network order.

    ``cache`` keeps results in memory (by tensor identity and content hash); ``cache_dir`` also stores them
    on disk as JSON keyed by the sha256 of the analysed weights and the settings. ``device`` picks where
    the eigenvalues are computed (default: where the weights are). ``threads`` caps torch's and BLAS's
    thread pools meanwhile (restored afterwards; ``None`` leaves them alone): one thread is the default
    because on shared, busy cores the pools' spinning made the same work 10-50x slower, while a free
    second core saved only about 15 %.
    """
    if xmin not in XMIN_METHODS:
        raise OpenTransError(f"unknown x_min method {xmin!r}; choose one of {', '.join(XMIN_METHODS)}")
    check_settings(conv_norm=conv_norm, device=device, max_aspect=max_aspect)
    matrices = collect_matrices(source, max_aspect=max_aspect, split_qkv=split_qkv)
    if not matrices:
        raise OpenTransError(_nothing_to_measure(source))
    settings = {"xmin": xmin, "conv_norm": conv_norm, "max_aspect": max_aspect, "evals_thresh": evals_thresh,
                "bins": bins, "split_qkv": split_qkv}
    settings_key = json.dumps(settings, sort_keys=True)
    ident = (_identity_key(matrices), settings_key)
    if cache and ident in _IDENTITY_MEMO:
        refs, cached = _IDENTITY_MEMO[ident]
        if all(ref() is m.source for ref, m in zip(refs, matrices)):
            return [LayerMetrics(**{**vars(c)}) for c in cached]
    hashes: dict[int, str] = {}
    if cache or cache_dir is not None:
        for m in matrices:
            if id(m.source) not in hashes:
                hashes[id(m.source)] = tensor_sha256(m.source)
    disk_path = None
    if cache_dir is not None:
        overall = hashlib.sha256(f"{_CACHE_VERSION}\0{settings_key}\0".encode())
        for m in matrices:
            overall.update(f"{m.name}\0{hashes[id(m.source)]}\0".encode())
        disk_path = Path(cache_dir) / f"{overall.hexdigest()}.json"
        if disk_path.is_file():
            try:
                data = json.loads(disk_path.read_text(encoding="utf-8"))
                metrics = [LayerMetrics.from_dict(d) for d in data["layers"]]
                if [m.name for m in metrics] == [m.name for m in matrices]:
                    _remember(ident, matrices, metrics, cache)
                    return metrics
            except (OSError, ValueError, KeyError, TypeError):
                pass  # a damaged cache entry is recomputed and overwritten
    spectra: list[torch.Tensor | None] = [None] * len(matrices)
    keys: list[str | None] = [None] * len(matrices)
    todo = []
    for i, m in enumerate(matrices):
        if cache:
            keys[i] = f"{hashes[id(m.source)]}:{m.part}:{conv_norm}:{device}"
            if keys[i] in _EIGS_BY_CONTENT:
                spectra[i] = _EIGS_BY_CONTENT[keys[i]]
                continue
        todo.append(i)
    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="spectra", unit="layer", leave=False, disable=None)  # off without a TTY
    checked: set[int] = set()
    for i in todo:
        weight = matrices[i].source
        if id(weight) not in checked:
            checked.add(id(weight))
            if not bool(torch.isfinite(weight.detach()).all()):
                raise OpenTransError("weight holds NaN or inf values: no spectrum to measure", tensor=matrices[i].param)
    with _thread_limit(threads):
        for i in todo:
            spectra[i] = eigenvalues(matrices[i].stack(conv_norm), device=device)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    for i in todo:
        if keys[i] is not None and len(_EIGS_BY_CONTENT) < _EIGS_LIMIT:
            _EIGS_BY_CONTENT[keys[i]] = spectra[i]
    if todo and all(not bool((spectra[i] > 0).any()) for i in range(len(matrices))):
        raise OpenTransError(f"every one of the {len(matrices)} weights to measure is all zeros: no spectrum to fit")
    with _thread_limit(threads):
        fits = fit_power_laws(spectra, xmin=xmin, bins=bins, evals_thresh=evals_thresh)
    metrics = []
    for m, fit in zip(matrices, fits):
        alpha = fit["alpha"]
        weighted = alpha * math.log10(fit["spectral_norm"]) if fit["spectral_norm"] > 0 else float("nan")
        metrics.append(LayerMetrics(name=m.name, param=m.param, kind=m.kind, shape=m.shape, alpha=alpha, D=fit["D"],
                                    xmin=fit["xmin"], xmax=fit["xmax"], num_eigs=int(fit["num_eigs"]),
                                    spectral_norm=fit["spectral_norm"], stable_rank=fit["stable_rank"],
                                    norm=fit["norm"], alpha_weighted=weighted, num_params=m.num_params))
    _remember(ident, matrices, metrics, cache)
    if disk_path is not None:
        atomic_write_text(disk_path, json.dumps({"settings": settings, "layers": [x.to_dict() for x in metrics]}))
    return metrics


def _remember(ident: tuple, matrices: list[_Matrix], metrics: list[LayerMetrics], cache: bool) -> None:
    if not cache:
        return
    if len(_IDENTITY_MEMO) > 64:
        _IDENTITY_MEMO.pop(next(iter(_IDENTITY_MEMO)))
    _IDENTITY_MEMO[ident] = ([weakref.ref(m.source) for m in matrices], [LayerMetrics(**vars(x)) for x in metrics])


def check_settings(conv_norm: float = CONV_NORM, device: torch.device | str | None = None,
                   max_aspect: float | None = MAX_ASPECT) -> None:
    """Refuse settings that would fail late or silently: a non-positive or NaN ``conv_norm``, a negative
    ``max_aspect``, a device torch does not know or that is not available here."""
    if not isinstance(conv_norm, (int, float)) or not math.isfinite(conv_norm) or conv_norm <= 0:
        raise OpenTransError(f"conv_norm must be a positive number, got {conv_norm}")
    if max_aspect is not None and (not math.isfinite(max_aspect) or max_aspect <= 0):
        raise OpenTransError(f"max_aspect must be positive (or None to keep every Linear layer), got {max_aspect}")
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise OpenTransError(f"unknown device {str(device)!r}; use cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OpenTransError(f"device {str(device)!r}: CUDA is not available here; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise OpenTransError(f"device {str(device)!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    if dev.type not in ("cpu", "cuda"):
        raise OpenTransError(f"device {str(device)!r}: spectra are computed on cpu or cuda only")


def _nothing_to_measure(source: Any) -> str:
    """Why a source holds no weight to measure (integer tensors, no Conv/Linear, an empty dict)."""
    if isinstance(source, Mapping):
        tensors = {k: v for k, v in source.items() if isinstance(v, torch.Tensor)}
        weights = [k for k in tensors if k.endswith("weight") and tensors[k].dim() in (2, 3, 4)]
        non_float = [k for k in weights if not tensors[k].is_floating_point()]
        if non_float:
            return (f"no floating-point Conv/Linear weight to measure: {len(non_float)} weight(s) of dtype "
                    f"{tensors[non_float[0]].dtype} (e.g. {non_float[0]!r})")
        return f"no Conv/Linear weight (a 2-D to 4-D tensor named *weight) among {len(tensors)} tensor(s)"
    return f"no Conv/Linear weight found in the {type(source).__name__}"


def metrics_settings(xmin: str = "peak", conv_norm: float = CONV_NORM, max_aspect: float | None = MAX_ASPECT,
                     evals_thresh: float = EVALS_THRESH, bins: int = BINS) -> dict[str, Any]:
    """The settings dict recorded in a LayerSelection's provenance."""
    return {"xmin": xmin, "conv_norm": conv_norm, "max_aspect": max_aspect, "evals_thresh": evals_thresh,
            "bins": bins}
