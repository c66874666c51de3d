"""A checkpoint's nesting and non-tensor entries as JSON, its tensors collected by key (packed files).

``encode_tree`` turns dicts (``OrderedDict`` and torch's ``_metadata`` included), lists, tuples, sets, scalars
(floats and complex exactly, through ``repr``), bytes, dtypes, devices and sizes (what ``torch.load`` with
``weights_only=True`` gives) into JSON nodes, each tensor into ``{"t": key}``
with the key being its dotted path; anything else is refused, naming the entry. ``decode_tree`` rebuilds it.
"""

from __future__ import annotations

import base64
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..errors import OpenTransError


def encode_tree(obj: Any, tensors: dict[str, torch.Tensor], path: tuple = ()) -> Any:
    """JSON node for ``obj``; tensors are replaced by ``{"t": key}`` and collected into ``tensors``."""
    where = ".".join(map(str, path)) or "<top level>"
    if isinstance(obj, torch.Tensor):
        if obj.layout != torch.strided or obj.is_quantized or obj.device.type == "meta":
            raise OpenTransError(f"entry {where!r} is a {obj.layout} {'quantized ' if obj.is_quantized else ''}"
                                 f"tensor on {obj.device.type}; packed files hold dense strided tensors with data")
        key = ".".join(map(str, path)) or "tensor"
        base, n = key, 1
        while key in tensors:
            n += 1
            key = f"{base}#{n}"
        tensors[key] = obj
        return {"t": key}
    if isinstance(obj, bool):
        return {"b": obj}
    if isinstance(obj, int):
        return {"i": str(obj)}
    if isinstance(obj, float):
        return {"f": repr(obj)}
    if isinstance(obj, str):
        return {"s": obj}
    if obj is None:
        return {"z": 0}
    if isinstance(obj, bytes):
        return {"x": base64.b64encode(obj).decode("ascii")}
    if isinstance(obj, torch.dtype):
        return {"dt": str(obj).removeprefix("torch.")}
    if isinstance(obj, torch.Size):
        return {"sz": list(obj)}
    if isinstance(obj, torch.device):
        return {"dev": str(obj)}
    if isinstance(obj, complex):
        return {"c": [repr(obj.real), repr(obj.imag)]}
    if type(obj) in (set, frozenset):
        items = sorted((encode_tree(v, {}, (*path, "<item>")) for v in obj), key=lambda n: repr(n))
        return {"set" if isinstance(obj, set) else "fset": items}
    if isinstance(obj, Mapping) and type(obj) in (dict, OrderedDict):
        node: dict[str, Any] = {"d": [[encode_tree(k, {}, (*path, "<key>")), encode_tree(v, tensors, (*path, k))]
                                      for k, v in obj.items()]}
        if isinstance(obj, OrderedDict):
            node["o"] = 1
        meta = getattr(obj, "_metadata", None)  # module versions torch keeps on state dicts
        if isinstance(meta, Mapping):
            node["m"] = encode_tree(dict(meta), {}, (*path, "_metadata"))
        return node
    if type(obj) in (list, tuple):
        return {"l" if isinstance(obj, list) else "u": [encode_tree(v, tensors, (*path, i)) for i, v in enumerate(obj)]}
    raise OpenTransError(f"entry {where!r} holds a {type(obj).__name__}, which a packed file cannot carry")


def decode_tree(node: Any, tensor: Callable[[str], torch.Tensor], source: str) -> Any:
    """Rebuild the object from its JSON node, asking ``tensor(key)`` for each tensor."""
    if not isinstance(node, dict) or len(set(node) - {"o", "m"}) != 1:
        raise OpenTransError(f"bad tree node {str(node)[:60]}", path=source)
    (tag,) = set(node) - {"o", "m"}
    value = node[tag]
    try:
        if tag == "t":
            return tensor(value)
        if tag == "b" and isinstance(value, bool):
            return value
        if tag == "i" and isinstance(value, str):
            return int(value)
        if tag == "f" and isinstance(value, str):
            return float(value)
        if tag == "s" and isinstance(value, str):
            return value
        if tag == "z":
            return None
        if tag == "x":
            return base64.b64decode(value, validate=True)
        if tag == "dt" and isinstance(getattr(torch, value, None), torch.dtype):
            return getattr(torch, value)
        if tag == "sz":
            return torch.Size([int(v) for v in value])
        if tag == "dev" and isinstance(value, str):
            return torch.device(value)
        if tag == "c" and isinstance(value, list) and len(value) == 2:
            return complex(float(value[0]), float(value[1]))
        if tag in ("set", "fset") and isinstance(value, list):
            items = [decode_tree(v, tensor, source) for v in value]
            return set(items) if tag == "set" else frozenset(items)
        if tag in ("l", "u") and isinstance(value, list):
            items = [decode_tree(v, tensor, source) for v in value]
            return items if tag == "l" else tuple(items)
        if tag == "d" and isinstance(value, list):
            out = (OrderedDict if node.get("o") else dict)(
                (decode_tree(k, tensor, source), decode_tree(v, tensor, source)) for k, v in value)
            if "m" in node:
                out._metadata = decode_tree(node["m"], tensor, source)  # type: ignore[attr-defined]
            return out
    except (TypeError, ValueError, OverflowError, RuntimeError):  # RuntimeError: torch.device("nonsense")
        pass
    raise OpenTransError(f"bad tree node {str(node)[:60]}", path=source)
