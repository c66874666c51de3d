"""The weight matrices whose spectra OpenTrans measures, and their eigenvalues.

For every Conv1d/Conv2d/Linear weight the eigenvalues of the empirical spectral density are the squared
singular values of the weight; a convolution ``out x in x kh x kw`` counts as ``kh*kw`` matrices ``out x in``
scaled by ``sqrt(conv_norm)`` whose spectra are pooled. Linear layers with aspect ratio ``>= 8`` are skipped
(classifier heads); convolutions never are. Linear weights inside attention (name contains
``attn``/``attention``) whose one side is three times the other are split into q/k/v;
``nn.MultiheadAttention.in_proj_weight`` is split the same way (the research code missed it because it is
not a Linear module; we include it on purpose).

Speed: the eigen-decomposition dominates and is done once per weight: on CPU through the Gram matrix of
the smaller side in float64 (``eigvalsh``; float32 would corrupt the small eigenvalues), on CUDA with
``svdvals`` in float32 as the research code does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import OpenTransError

CONV_NORM = 0.5
MAX_ASPECT = 8.0


@dataclass
class WeightMatrix:
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
def is_attention(name: str) -> bool:
    """Whether a module name says attention (``attn``/``attention``): its fused q/k/v weights are split."""
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


def _add_weight(out: list[WeightMatrix], param: str, weight: torch.Tensor, kind: str, split: bool,
                max_aspect: float | None) -> None:
    shape = tuple(weight.shape)
    dim = _split_spec(shape) if split else None
    if dim is not None:
        for index, part in enumerate("qkv"):
            part_shape = list(shape)
            part_shape[dim] //= 3
            out.append(WeightMatrix(f"{param}:{part}", param, "attn", tuple(part_shape), weight, (dim, index, 3),
                               weight.numel() // 3))
        return
    if kind == "linear" and max_aspect is not None and min(shape) > 0 and max(shape) / min(shape) >= max_aspect:
        return
    out.append(WeightMatrix(param, param, kind, shape, weight, None, weight.numel()))


def collect_matrices(source: nn.Module | Mapping[str, torch.Tensor], max_aspect: float | None = MAX_ASPECT,
                     split_qkv: bool = True) -> list[WeightMatrix]:
    """The weights to analyse, in network order.

    A module contributes the ``weight`` of every Conv1d/Conv2d/Linear and the ``in_proj_weight`` of every
    ``nn.MultiheadAttention``; a state dict contributes every tensor whose name ends in ``weight``: 4-D
    (and 3-D) ones as convolutions, 2-D ones as linear layers.
    """
    out: list[WeightMatrix] = []
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
                        and is_attention(module_name), max_aspect)
        return out
    if not isinstance(source, Mapping):
        raise OpenTransError(f"expected an nn.Module or a state dict, got {type(source).__name__}")
    for name, tensor in source.items():
        if not isinstance(tensor, torch.Tensor) or not name.endswith("weight") or not tensor.is_floating_point():
            continue
        if tensor.dim() in (3, 4):
            _add_weight(out, name, tensor, "conv", False, max_aspect)
        elif tensor.dim() == 2:
            split = split_qkv and (name.endswith("in_proj_weight") or is_attention(name))
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
