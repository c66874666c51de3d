"""Spectral (ESD) metrics of a tower's weights: alpha and the spectrum's statistics per layer, cached.

:func:`compute_metrics` is the entry point: it collects the matrices (:mod:`~opentrans_hub.methods.spectra`:
which weights, q/k/v splits, eigenvalues on CPU or CUDA), fits a power law to each spectrum
(:mod:`~opentrans_hub.methods.powerlaw`: the Hill estimator, the ``x_min`` search and the research code's quirks)
and returns one :class:`LayerMetrics` per matrix in network order. Results are cached in memory by tensor
identity and by content hash (sha256), optionally on disk.
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

import torch
from torch import nn

from ..errors import OpenTransError
from ..io.atomic import atomic_write_text
from .powerlaw import BINS, EVALS_THRESH, XMIN_METHODS, fit_power_laws
from .spectra import CONV_NORM, MAX_ASPECT, WeightMatrix, collect_matrices, eigenvalues

__all__ = ["BINS", "CONV_NORM", "EVALS_THRESH", "MAX_ASPECT", "XMIN_METHODS", "LayerMetrics", "check_settings",
           "clear_cache", "collect_matrices", "compute_metrics", "default_cache_dir", "eigenvalues", "fit_power_laws",
           "metrics_settings", "tensor_sha256"]
_CACHE_VERSION = "opentrans-hub/spectral/v1"


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


def _identity_key(matrices: list[WeightMatrix]) -> tuple:
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


def _remember(ident: tuple, matrices: list[WeightMatrix], metrics: list[LayerMetrics], cache: bool) -> None:
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
