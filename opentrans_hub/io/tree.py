"""A checkpoint's nesting and non-tensor entries as JSON, its tensors collected by key (packed files).

:class:`TreeEncoder` turns dicts (``OrderedDict`` and torch's ``_metadata`` included), lists, tuples, sets, scalars
(floats and complex exactly, through ``repr``), bytes, dtypes, devices and sizes (what ``torch.load`` with
``weights_only=True`` gives) into JSON nodes, each tensor into a tensor node ``{"t": key}``, the key being its
dotted path; anything else is refused, naming the entry. A tensor node also carries what torch restores:
``"p": 1`` for an ``nn.Parameter``, ``"g": 1`` for ``requires_grad``.

Sharing is kept, as ``torch.save`` keeps it. The same tensor object met again gives an alias node
``{"t": key, "a": first key}`` (stored once, one object again after decoding). Distinct tensors over one storage
(tied weights saved from a state dict, slices of one buffer) become views of one stored tensor
(:meth:`TreeEncoder.share`): ``"v": {"of": stored key, "at": byte offset, "dtype", "shape", "stride"}``.
``decode_tree`` rebuilds the object, refusing any view that would reach outside its stored tensor.
"""

from __future__ import annotations

import base64
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any

import torch

from ..errors import OpenTransError
from .packed_spec import dtype_name, torch_dtype

#: the name a stored tensor gets when no tensor of a shared storage spans the others (``::`` is never a tensor key's)
STORAGE_SUFFIX = "::storage"
_TENSOR_FIELDS = frozenset({"t", "p", "g", "v"})
_ALIAS_FIELDS = frozenset({"t", "a"})
_MAX_NDIM = 16


class TreeEncoder:
    """Encode one checkpoint: :meth:`encode` gives the JSON tree and fills :attr:`tensors` (key -> tensor, each
    tensor object once); :meth:`share` then stores each shared storage once."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.nodes: dict[str, dict[str, Any]] = {}  # key -> its tensor node (views are recorded into it)
        self.aliases: dict[str, str] = {}  # key -> the key the same tensor object was first met under
        self._seen: dict[int, dict[str, Any]] = {}  # id(tensor) -> its node: the same object, the same node

    def encode(self, obj: Any, path: tuple = ()) -> Any:
        """JSON node for ``obj``; tensors become tensor nodes and are collected into :attr:`tensors`."""
        if isinstance(obj, torch.Tensor):
            return self._tensor(obj, path)
        if isinstance(obj, Mapping) and type(obj) in (dict, OrderedDict):
            node: dict[str, Any] = {"d": [[_plain(k, (*path, "<key>")), self.encode(v, (*path, k))]
                                          for k, v in obj.items()]}
            if isinstance(obj, OrderedDict):
                node["o"] = 1
            meta = getattr(obj, "_metadata", None)  # module versions torch keeps on state dicts
            if isinstance(meta, Mapping):
                node["m"] = _plain(dict(meta), (*path, "_metadata"))
            return node
        if type(obj) in (list, tuple):
            items = [self.encode(v, (*path, i)) for i, v in enumerate(obj)]
            return {"l" if isinstance(obj, list) else "u": items}
        return _scalar(obj, path)

    def _tensor(self, obj: torch.Tensor, path: tuple) -> dict[str, Any]:
        key = self._key(path)
        first = self._seen.get(id(obj))
        if first is not None:  # the same object under another name
            self.aliases[key] = first["t"]
            return {"t": key, "a": first["t"]}
        if obj.layout is not torch.strided or obj.is_quantized or obj.is_meta:
            where = ".".join(map(str, path)) or "<top level>"
            raise OpenTransError(f"entry {where!r} is a {obj.layout} {'quantized ' if obj.is_quantized else ''}"
                                 f"tensor on {obj.device.type}; packed files hold dense strided tensors with data")
        node = {"t": key}
        if isinstance(obj, torch.nn.Parameter):
            node["p"] = 1
        if obj.requires_grad:
            node["g"] = 1
        self.tensors[key] = obj
        self.nodes[key] = node
        self._seen[id(obj)] = node
        return node

    def _key(self, path: tuple) -> str:
        """The tensor's dotted path, made unique (``#2``...) where two paths read the same."""
        key = ".".join(map(str, path)) or "tensor"
        base, n = key, 1
        while key in self.tensors or key in self.aliases:
            n += 1
            key = f"{base}#{n}"
        return key

    def share(self, prefer: Collection[str] = ()) -> dict[str, dict[str, Any]]:
        """Store every storage that several tensors view once: one of them (a contiguous one spanning the others,
        ``prefer``'s first) or, when none spans them, the bytes they span under ``KEY::storage``; the others become
        views of it, recorded in their nodes and dropped from :attr:`tensors`. Returns view key -> view record."""
        groups: dict[tuple[torch.device, int], list[str]] = {}
        for key, tensor in self.tensors.items():
            if tensor.numel():  # the storage's address, without making a storage object per tensor
                start = tensor.data_ptr() - tensor.storage_offset() * tensor.element_size()
                groups.setdefault((tensor.device, start), []).append(key)
        views: dict[str, dict[str, Any]] = {}
        for keys in groups.values():
            if len(keys) > 1:
                keys = [k for k in keys if not _overlaps(self.tensors[k])]  # expanded views are stored as values
            if len(keys) > 1:
                views.update(self._share_group(keys, prefer))
        return views

    def _share_group(self, keys: list[str], prefer: Collection[str]) -> dict[str, dict[str, Any]]:
        spans = {k: _span(self.tensors[k]) for k in keys}
        low, high = min(s for s, _ in spans.values()), max(e for _, e in spans.values())
        spanning = [k for k in keys if spans[k] == (low, high) and self.tensors[k].is_contiguous()
                    and all((spans[o][0] - low) % self.tensors[o].element_size() == 0 for o in keys)]
        if spanning:
            base = next((k for k in spanning if k in prefer), spanning[0])
        else:  # the bytes the views span, from an 8-byte boundary so every view's offset divides its item size
            low -= low % 8
            base = keys[0] + STORAGE_SUFFIX
            storage = self.tensors[keys[0]].untyped_storage()
            self.tensors[base] = torch.empty(0, dtype=torch.uint8, device=self.tensors[keys[0]].device).set_(
                storage, low, (high - low,), (1,))
        views = {}
        for key in keys:
            if key == base:
                continue
            tensor = self.tensors.pop(key)
            record = {"of": base, "at": spans[key][0] - low, "dtype": dtype_name(tensor.dtype, key),
                      "shape": list(tensor.shape), "stride": list(tensor.stride())}
            self.nodes[key]["v"] = record
            views[key] = record
        return views


def tensor_nodes(tree: Any) -> Iterator[dict[str, Any]]:
    """Every tensor node of a tree (each time it occurs)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if not isinstance(node, dict):
            continue
        if "t" in node:
            yield node
            continue
        for tag, value in node.items():
            if tag == "d" and isinstance(value, list):
                stack.extend(v for pair in value if isinstance(pair, list) for v in pair)
            elif tag in ("l", "u") and isinstance(value, list):
                stack.extend(value)


def _plain(obj: Any, path: tuple) -> Any:
    """A node that holds no tensor of the checkpoint (dict keys, set items, ``_metadata``)."""
    return {"s": obj} if type(obj) is str else TreeEncoder().encode(obj, path)


def _scalar(obj: Any, path: tuple) -> Any:
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
        items = sorted((_plain(v, (*path, "<item>")) for v in obj), key=lambda n: repr(n))
        return {"set" if isinstance(obj, set) else "fset": items}
    where = ".".join(map(str, path)) or "<top level>"
    raise OpenTransError(f"entry {where!r} holds a {type(obj).__name__}, which a packed file cannot carry")


def _overlaps(tensor: torch.Tensor) -> bool:
    """Whether elements of ``tensor`` share memory (an expanded or strided-over-itself view)."""
    return _strides_overlap(tensor.shape, tensor.stride())


def _strides_overlap(shape: Collection[int], stride: Collection[int]) -> bool:
    extent = 1
    for step, size in sorted((st, s) for s, st in zip(shape, stride) if s > 1):
        if step < extent:
            return True
        extent += step * (size - 1)
    return False


def _span(tensor: torch.Tensor) -> tuple[int, int]:
    """[first, last + 1) byte of the tensor's storage its elements occupy."""
    item = tensor.element_size()
    start = tensor.storage_offset() * item
    last = sum((s - 1) * st for s, st in zip(tensor.shape, tensor.stride()))
    return start, start + (last + 1) * item


# ----------------------------------------------------------------------------------------- decoding
def decode_tree(node: Any, tensor: Callable[[str], torch.Tensor], source: str) -> Any:
    """Rebuild the object from its JSON node, asking ``tensor(key)`` for each stored tensor; an alias is the same
    object again, views are rebuilt over their stored tensor's storage."""
    return _Decoder(tensor, source).decode(node)


class _Decoder:
    def __init__(self, tensor: Callable[[str], torch.Tensor], source: str):
        self.tensor = tensor
        self.source = source
        self.built: dict[str, torch.Tensor] = {}  # key -> the object decoded for it (aliases: the same one)

    def error(self, node: Any) -> OpenTransError:
        return OpenTransError(f"bad tree node {str(node)[:60]}", path=self.source)

    def decode(self, node: Any) -> Any:
        if isinstance(node, dict) and "t" in node:
            return self._tensor(node)
        if not isinstance(node, dict) or len(set(node) - {"o", "m"}) != 1:
            raise self.error(node)
        (tag,) = set(node) - {"o", "m"}
        value = node[tag]
        try:
            if tag in ("l", "u") and isinstance(value, list):
                items = [self.decode(v) for v in value]
                return items if tag == "l" else tuple(items)
            if tag == "d" and isinstance(value, list):
                out = (OrderedDict if node.get("o") else dict)((self.decode(k), self.decode(v)) for k, v in value)
                if "m" in node:
                    out._metadata = self.decode(node["m"])  # type: ignore[attr-defined]
                return out
            if tag in ("set", "fset") and isinstance(value, list):
                items = [self.decode(v) for v in value]
                return set(items) if tag == "set" else frozenset(items)
            return _decode_scalar(tag, value)
        except (TypeError, ValueError, OverflowError, RuntimeError):  # RuntimeError: torch.device("nonsense")
            raise self.error(node) from None

    def _tensor(self, node: dict[str, Any]) -> torch.Tensor:
        key = node["t"]
        if "a" in node and set(node) == _ALIAS_FIELDS and isinstance(key, str) and isinstance(node["a"], str):
            if node["a"] not in self.built or key in self.built:
                raise OpenTransError("the tree names an alias of a tensor it has not given before, or a name twice",
                                     path=self.source, tensor=key)
            self.built[key] = self.built[node["a"]]
            return self.built[key]
        if not isinstance(key, str) or not set(node) <= _TENSOR_FIELDS or key in self.built or not all(
                node.get(flag, 0) in (0, 1) and not isinstance(node.get(flag, 0), float) for flag in ("p", "g")):
            raise self.error(node)
        obj = view_of(self.tensor, node["v"], key, self.source) if "v" in node else self.tensor(key)
        try:
            if node.get("p"):
                obj = torch.nn.Parameter(obj, requires_grad=bool(node.get("g")))
            elif node.get("g"):
                obj.requires_grad_(True)
        except RuntimeError:  # requires_grad on an integer tensor
            raise OpenTransError(f"a {obj.dtype} tensor cannot require grad", path=self.source, tensor=key) from None
        self.built[key] = obj
        return obj

def view_of(tensor: Callable[[str], torch.Tensor], record: Any, key: str, source: str) -> torch.Tensor:
    """The view a node's ``record`` describes, over the storage of the stored tensor it names (``tensor(name)``
    gives that one); refused when it is malformed, misaligned, or reaches outside that tensor or over itself."""
    try:
        fields = (record["of"], record["at"], torch_dtype(record["dtype"]), record["shape"], record["stride"])
    except (TypeError, KeyError):
        raise OpenTransError(f"bad view record {str(record)[:80]}", path=source, tensor=key) from None
    of, at, dtype, shape, stride = fields
    numbers = [at, *shape, *stride] if isinstance(shape, list) and isinstance(stride, list) else [None]
    if (not isinstance(of, str) or len(record) != 5 or len(shape) != len(stride) or len(shape) > _MAX_NDIM
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in numbers)):
        raise OpenTransError(f"bad view record {str(record)[:80]}", path=source, tensor=key)
    base = tensor(of).detach()
    item = dtype.itemsize
    first = base.storage_offset() * base.element_size()
    start, end = first + at, first + base.numel() * base.element_size()
    if not base.is_contiguous() or start % item:
        raise OpenTransError(f"view at byte {at} of {of!r} is not aligned to its {dtype}", path=source, tensor=key)
    reach = start + (1 + sum((s - 1) * st for s, st in zip(shape, stride))) * item if 0 not in shape else start
    if reach > end or _strides_overlap(shape, stride):
        raise OpenTransError(f"view {shape} (stride {stride}) at byte {at} reaches outside {of!r} or over itself",
                             path=source, tensor=key)
    return torch.empty(0, dtype=dtype).set_(base.untyped_storage(), start // item, shape, stride)


def _decode_scalar(tag: str, value: Any) -> Any:
    """The value of a scalar node; ValueError when the tag or its value is not one the encoder writes."""
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
    raise ValueError(tag)
