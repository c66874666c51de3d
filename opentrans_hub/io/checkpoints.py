"""Reading and writing framework checkpoints safely, whatever the file's name says.

Checkpoints are untrusted input. What a file holds is sniffed from its bytes (:mod:`opentrans_hub.io.sniff`):
safetensors is read with the safetensors library, a packed sparse checkpoint of ours is decoded dense and
verified (:mod:`opentrans_hub.io.packed`), anything else only ever goes through
``torch.load(weights_only=True)``; every failure is re-raised as :class:`OpenTransError` naming the file.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import OpenTransError
from .atomic import atomic_write_bytes, map_file
from .gcpause import gc_paused
from .packed import PackedContainer
from .sniff import PACKED_FORMAT, sniff

#: keys under which training frameworks nest the model's state dict (detectron2: "model"; OpenTrans: "backbone")
NESTING_KEYS = ("model", "state_dict", "module", "backbone")


@gc_paused()
def _read(path: Path) -> tuple[Any, dict[str, str] | None]:
    """(the object a checkpoint file holds, the safetensors metadata its dense form had), by its content."""
    if path.is_dir():
        raise OpenTransError("is a directory, expected a checkpoint file", path=path)
    if not path.is_file():
        raise OpenTransError("no such file", path=path)
    data = map_file(path)  # opened once: sniffed, and a packed file decoded, from the same map
    found = sniff(data)
    if found.format == PACKED_FORMAT:  # decoded dense, its content hash verified
        container = PackedContainer(data, str(path))
        return container.checkpoint(), container.source_metadata()
    if found.ours or found.kind == "json":
        raise OpenTransError(f"this is {found.describe()}, not a checkpoint", path=path)
    if found.kind == "safetensors":
        return read_safetensors(path), found.metadata
    return read_weights_only(path), None


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a plain safetensors file (the safetensors library's reader)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return dict(load_file(str(path)))
    except (SafetensorError, OSError, ValueError) as exc:
        raise OpenTransError(f"not a readable safetensors file ({exc})", path=path) from None


def read_weights_only(path: str | os.PathLike) -> Any:
    """What ``torch.load(weights_only=True)`` gives for a file (tensors and plain containers, no code)."""
    try:
        # through an open file, not the path: torch picks a reader by the name's suffix when it gets a path
        with open(path, "rb") as handle, warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # protocol notes on an untrusted pickle: the error says it
            return torch.load(handle, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise OpenTransError(f"cannot read ({exc.strerror or exc})", path=path) from None
    except Exception as exc:  # torch raises many types for bad or unsafe pickles
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OpenTransError(f"cannot load as a weights-only checkpoint ({first[:300]})", path=path) from None


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint file as a dict, by what it holds: safetensors, a packed file, or via weights_only."""
    path = Path(path)
    obj, _ = _read(path)
    if not isinstance(obj, Mapping):
        raise OpenTransError(f"checkpoint holds a {type(obj).__name__}, expected a dict of tensors", path=path)
    return dict(obj)


def find_state_dict(obj: Mapping[str, Any], path: str | os.PathLike | None = None) -> tuple[dict[str, Any], str]:
    """The tensor dict inside a checkpoint: itself, or nested under ``model``/``state_dict``/``backbone``.

    Returns the dict and the key path it was found at ("" for the top level).
    """
    trail = []
    current: Mapping[str, Any] = obj
    for _ in range(4):
        if any(isinstance(v, torch.Tensor) for v in current.values()):
            return _checked_tensors(dict(current), path), ".".join(trail)
        for key in NESTING_KEYS:
            if isinstance(current.get(key), Mapping):
                trail.append(key)
                current = current[key]
                break
        else:
            break
    raise OpenTransError(f"no tensors found (looked at the top level and under {', '.join(NESTING_KEYS)})",
                         path=path)


def find_prefixes(keys: Any, names: Any) -> list[str]:
    """Every prefix ``p`` (at a dot boundary, shortest first) under which all ``names`` are in ``keys``:
    where a tower sits inside a framework's state dict (``""``, ``visual.``, ``backbone.clip_model.visual.``)."""
    keys, names = set(keys), list(names)
    if not names:
        return []
    first = names[0]
    candidates = {key[: len(key) - len(first)] for key in keys
                  if key.endswith(first) and (len(key) == len(first) or key[-len(first) - 1] == ".")}
    return sorted((p for p in candidates if all(p + name in keys for name in names)), key=len)


def _checked_tensors(state: dict[Any, Any], path: str | os.PathLike | None) -> dict[str, Any]:
    """Refuse what every reader would trip over later: non-string names, and tensors that are not plain
    strided ones (sparse, quantized, nested), which cannot be masked or compared element by element."""
    for key, value in state.items():
        if not isinstance(key, str):
            raise OpenTransError(f"state-dict key {key!r} is a {type(key).__name__}, not a string name", path=path)
        if isinstance(value, torch.Tensor):
            if value.layout != torch.strided:
                raise OpenTransError(f"tensor has layout {value.layout}; only dense tensors are read (save it with "
                                     ".to_dense())", path=path, tensor=key)
            if value.is_quantized:
                raise OpenTransError(f"quantized tensor ({value.dtype}); only plain tensors are read", path=path,
                                     tensor=key)
    return state


def strip_prefix(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Drop ``prefix`` from the names that carry it (``module.`` from DDP checkpoints, say)."""
    if not prefix:
        return dict(state)
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def state_dict_of(obj: Mapping[str, Any], path: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """Flat tensor dict of a checkpoint object, un-nested and without DDP's ``module.`` prefix."""
    state, _ = find_state_dict(obj, path)
    if all(k.startswith("module.") for k in state):
        state = strip_prefix(state, "module.")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Flat tensor dict of a checkpoint file, un-nested and without DDP's ``module.`` prefix."""
    return state_dict_of(read_checkpoint(path), path)


def write_checkpoint(path: str | os.PathLike, obj: Mapping[str, Any],
                     metadata: Mapping[str, str] | None = None) -> Path:
    """Atomically write ``obj``: flat tensor dicts as safetensors for ``.safetensors`` (any case; with
    ``metadata``), else ``torch.save``."""
    path = Path(path)
    if is_safetensors_name(path):
        from safetensors.torch import save

        if not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise OpenTransError("safetensors holds only a flat dict of tensors", path=path)
        data = save({k: v.contiguous() for k, v in obj.items()}, metadata=dict(metadata) if metadata else None)
    else:
        buffer = io.BytesIO()
        torch.save(dict(obj), buffer)
        data = buffer.getvalue()
    return atomic_write_bytes(path, data)


def is_safetensors_name(path: str | os.PathLike) -> bool:
    """Whether an output's name asks for safetensors (``.safetensors`` in any case): what to write is all a
    name can say; what a file holds is read from its bytes."""
    return Path(path).suffix.lower() == ".safetensors"


@dataclass
class LoadedCheckpoint:
    """A checkpoint read for rewriting: the tensor dict, where it was nested and how to write it back."""

    path: Path
    obj: dict[str, Any]
    trail: tuple[str, ...]
    state: dict[str, Any]
    ddp_prefix: str
    metadata: dict[str, str] | None

    def write(self, path_out: str | os.PathLike, state: Mapping[str, Any]) -> Path:
        """Write ``state`` back at the same nesting; safetensors output holds the tensor dict only."""
        path_out = Path(path_out)
        if is_safetensors_name(path_out):
            # safetensors is flat: only the tensor dict travels (nesting and other entries cannot)
            tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
            return write_checkpoint(path_out, tensors, metadata=self.metadata)
        obj: Any = state
        for depth in range(len(self.trail), 0, -1):
            parent = self.obj
            for key in self.trail[:depth - 1]:
                parent = parent[key]
            rebuilt = dict(parent)
            rebuilt[self.trail[depth - 1]] = obj
            obj = rebuilt
        return write_checkpoint(path_out, obj)


def load_checkpoint(path: str | os.PathLike) -> LoadedCheckpoint:
    """Read a framework checkpoint (by content: safetensors, packed, weights_only) keeping what is needed to
    write it back (for a packed file, the metadata its dense safetensors form had)."""
    path = Path(path)
    obj, metadata = _read(path)
    if not isinstance(obj, Mapping):
        raise OpenTransError(f"checkpoint holds a {type(obj).__name__}, expected a dict of tensors", path=path)
    obj = dict(obj)
    state, trail = find_state_dict(obj, path)
    tensor_keys = [k for k, v in state.items() if isinstance(v, torch.Tensor)]
    ddp = "module." if tensor_keys and all(k.startswith("module.") for k in tensor_keys) else ""
    return LoadedCheckpoint(path, obj, tuple(k for k in trail.split(".") if k), state, ddp, metadata)


def target_state(target: Any) -> tuple[dict[str, Any], str | None]:
    """(state, the file it came from) of a model, a state dict or a checkpoint path: a live model gives its
    state dict with every parameter under each of its names (tied ones too), detached. Callers unwrap
    DDP/compile wrappers first (``sparsity.unwrap``)."""
    if isinstance(target, torch.nn.Module):
        module = target
        state = {k: v.detach() for k, v in module.state_dict(keep_vars=True).items()}
        state.update({k: v.detach() for k, v in module.named_parameters(remove_duplicate=False)})
        return state, None
    if isinstance(target, Mapping):
        return dict(target), None
    return load_checkpoint(target).state, os.fspath(target)
