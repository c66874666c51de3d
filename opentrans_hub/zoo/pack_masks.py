"""Which tensors a pack masks, and the checks on them before anything is written.

Masks come from a Subnetwork, located in the checkpoint under one prefix (:func:`locate`) and resolved to the
tensors that are stored once shared storage is (:func:`stored_keys`), or from the exact zeros of the weights
(:func:`masks_from_zeros`, on each tensor's bytes). A subnetwork's pruned positions must hold zeros
(:func:`check_zero`), and a cast of the kept values must keep them finite and nonzero (:func:`check_cast`).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..errors import OpenTransError
from ..formats.subnetwork import Subnetwork
from ..io import packed_spec as sf
from ..io.checkpoints import find_prefixes
from ..io.tree import TreeEncoder

_INTS = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}


def saves_bytes(numel: int, itemsize: int, kept: int) -> bool:
    """Whether mask bits + kept values take fewer bytes than the dense tensor."""
    return (numel + 7) // 8 + kept * itemsize < numel * itemsize


def element_bits(data: np.ndarray, itemsize: int) -> np.ndarray:
    """A tensor's bytes (:func:`~opentrans_hub.io.packed_spec.as_bytes`) as one integer per element: exact
    compares and copies, -0.0 and NaN payloads included."""
    return data.view(_INTS[itemsize])


def masks_from_zeros(tensors: Mapping[str, torch.Tensor], data: Any, pattern: re.Pattern | None
                     ) -> dict[str, np.ndarray]:
    """Flat keep-masks from exact +0.0 (bitwise: a -0.0 or a NaN is a value to keep, so unpacking gives the file
    back bit-identical), for every floating 2-D+ ``*weight`` that packing makes smaller; ``pattern`` narrows them
    by name. ``data[key]``: each tensor's bytes."""
    masks = {}
    for key, tensor in tensors.items():
        if (not key.endswith("weight") or tensor.dim() < 2 or not tensor.is_floating_point()
                or (pattern is not None and not pattern.search(key))):
            continue
        keep = element_bits(data[key], tensor.element_size()) != 0
        if saves_bytes(keep.size, tensor.element_size(), int(np.count_nonzero(keep))):
            masks[key] = keep
    return masks


def _nonzero(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor != 0`` elementwise (-0.0 is zero, NaN is not), for every floating dtype a packed file holds."""
    tensor = tensor.detach()
    return (tensor.float() if tensor.element_size() == 1 else tensor) != 0


def include_pattern(include: str | None) -> re.Pattern | None:
    if not include:
        return None
    try:
        return re.compile(include)
    except re.error as exc:
        raise OpenTransError(f"--include {include!r} is not a regular expression ({exc})") from None


def locate(sub: Subnetwork, state: Mapping[str, torch.Tensor], prefix: str | None, source: str) -> dict[str, str]:
    """Subnetwork name -> state key: ``prefix + name``; without a prefix, the one prefix under which every
    mask finds a tensor of its shape (the bare tower, ``visual.``, ``module.``, a framework's tower path)."""
    names = list(sub.masks)
    if prefix is None:
        first = names[0]
        fits = find_prefixes(state, names)
        if not fits:
            raise OpenTransError(f"the subnetwork's tensors are not in the checkpoint under any one prefix "
                                 f"(first: {first!r}); pass prefix= (--prefix) naming where the tower sits",
                                 path=source, tensor=first)
        if len(fits) > 1:
            raise OpenTransError(f"the subnetwork fits the checkpoint under several prefixes ({fits[:3]}); "
                                 "pass prefix= (--prefix) to choose one", path=source)
        prefix = fits[0]
    located = {}
    for name, mask in sub.masks.items():
        key = prefix + name
        tensor = state.get(key)
        if tensor is None:
            raise OpenTransError(f"checkpoint has no tensor {key!r} for this mask; nothing was written",
                                 path=source, tensor=name)
        if tuple(tensor.shape) != tuple(mask.shape):
            raise OpenTransError(f"mask shape {tuple(mask.shape)} != tensor shape {tuple(tensor.shape)}; "
                                 "nothing was written", path=source, tensor=key)
        if not tensor.is_floating_point():
            raise OpenTransError(f"masks apply to floating tensors, this one is {tensor.dtype}", path=source,
                                 tensor=key)
        located[name] = key
    return located


def stored_keys(encoder: TreeEncoder, keys: Mapping[str, str], source: str) -> dict[str, str]:
    """Subnetwork name -> the key its masked tensor is stored under, once storage sharing is resolved: a tied
    name's first name; a mask may not cover two names of one tensor, nor a view that another tensor stores."""
    stored = {name: encoder.aliases.get(key, key) for name, key in keys.items()}
    twice = [key for key, n in Counter(stored.values()).items() if n > 1]
    if twice:
        names = sorted(k for k, v in keys.items() if stored[k] == twice[0])
        raise OpenTransError(f"the subnetwork masks one tensor twice, under the tied names {names}", path=source,
                             tensor=twice[0])
    views = encoder.share(prefer=set(stored.values()))
    for name, key in stored.items():
        if key in views:
            raise OpenTransError(f"the tensor shares its storage with {views[key]['of']!r}, which is stored for "
                                 "both; a mask applies to a tensor stored on its own or to the one spanning the "
                                 "others", path=source, tensor=keys[name])
    return stored


def check_zero(sub: Subnetwork, located: Mapping[str, str], state: Mapping[str, torch.Tensor], force_zero: bool,
                source: str) -> None:
    """Refuse (before writing anything) a checkpoint whose pruned positions are not zero (+0.0 or -0.0)."""
    offenders = []
    for name, key in located.items():
        pruned = ~sub[name].reshape(-1)
        count = int(_nonzero(state[key]).reshape(-1)[pruned].sum())
        if count:
            offenders.append((key, count))
    if offenders and not force_zero:
        key, count = offenders[0]
        total = sum(c for _, c in offenders)
        raise OpenTransError(f"{count:,} pruned positions are not zero (in {len(offenders)} tensor(s), {total:,} in "
                             "all): this checkpoint was not trained with this subnetwork's masks; pass force_zero "
                             "(--force-zero) to zero them", path=source, tensor=key)


def check_cast(tensor: torch.Tensor, keep: torch.Tensor, stored: torch.dtype, dtype: str, key: str,
                source: str) -> None:
    """Refuse a cast of the kept values that turns a finite value into inf or a nonzero one into zero (more than
    the dtype's rounding): the packed file would not hold the weights that were trained."""
    values = tensor.detach().reshape(-1)[keep]
    cast = values.to(stored)
    overflow = int((torch.isfinite(values) & ~torch.isfinite(cast)).sum())
    underflow = int(((values != 0) & (cast == 0)).sum())
    if overflow or underflow:
        biggest = float(values[torch.isfinite(values)].abs().max()) if overflow else 0.0
        what = [f"{overflow:,} finite value(s) into inf (largest |value| {biggest:.4g})"] if overflow else []
        what += [f"{underflow:,} nonzero value(s) into 0"] if underflow else []
        raise OpenTransError(f"casting the kept values to {dtype} turns {' and '.join(what)}; nothing was written "
                             "(keep the dtype, or bf16, which has float32's range)", path=source, tensor=key)


def signed_zeros(sub: Subnetwork, located: Mapping[str, str], state: Mapping[str, torch.Tensor]) -> set[str]:
    """Masks whose pruned positions hold a -0.0 somewhere: packing stores them as +0.0, the one pruned value."""
    return {name for name, key in located.items()
            if bool((sf.bits(state[key].detach().cpu()) != 0)[~sub[name].reshape(-1)].any())}
