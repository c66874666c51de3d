"""Pack pruned checkpoints into compact sparse files and back: ``pack_checkpoint``, ``unpack``, ``load_sparse``.

A pruned checkpoint saved densely is as large as the unpruned one. :func:`pack_checkpoint` stores each
masked tensor as its keep-mask bits (the Subnetwork codec) plus its kept values, every other tensor and
entry unchanged (format: :mod:`opentrans_hub.io.packed_spec`). The masks come from a Subnetwork (``subnetwork=``,
whose pruned positions must already be zero unless ``force_zero``) or from the exact zeros of the weights
(``zeros=True``). :func:`unpack` gives the dense checkpoint back bit-identical (``-0.0`` and NaN included);
:func:`load_sparse` gives the dense state dict. Packed files are also read wherever a checkpoint or weights
file is (``checkpoints.read_checkpoint``), so backbones, plugins and the registry take them as they are.

Streaming: beyond the input checkpoint, packing holds the bool masks and one dense tensor at a time; the
output is spooled to a temporary file and written through the library's atomic writer, never over the input.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import tempfile
from collections import Counter
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import OpenTransError
from ..formats.packed import PackedReader, open_packed
from ..formats.subnetwork import ENCODINGS, Subnetwork, default_provenance
from ..formats.subnetwork_codec import encode_parts
from ..io import packed_spec as sf
from ..io.atomic import atomic_write_bytes, new_folders
from ..io.atomic import check_output as check_safe_output
from ..io.checkpoints import find_prefixes, find_state_dict, is_safetensors_name, load_checkpoint
from ..io.limits import check_decode
from ..io.tree import TreeEncoder, decode_tree, tensor_nodes, view_of

__all__ = ["load_sparse", "pack_checkpoint", "unpack"]


# ----------------------------------------------------------------------------------------- small helpers
def check_output(out: str | os.PathLike, *inputs: str | os.PathLike | None) -> Path:
    """Refuse an output that is one of the inputs (hard links included) or not a regular file (the library's
    safe-write rules): a pack or unpack never writes over what it reads."""
    out = check_safe_output(out, inputs=inputs)
    for src in inputs:
        try:
            same = src is not None and out.exists() and os.path.samefile(src, out)
        except OSError:
            same = False
        if same:
            raise OpenTransError("output is also an input (the same file); write to another file", path=out)
    return out


def _spool_to(out: Path, write) -> int:
    """Run ``write(handle)`` into a nameless spool file next to ``out`` (same disk; gone on any failure), then
    hand its mapped bytes to the library's atomic writer: readers see the old file or the whole new one."""
    with new_folders(out.parent):
        try:
            spool = tempfile.TemporaryFile(prefix=f".{out.name}.", suffix=".spool", dir=out.parent)
        except OSError as exc:
            raise OpenTransError(f"cannot write ({exc.strerror or exc})", path=out) from None
        with spool:
            size = write(spool)
            spool.flush()
            with mmap.mmap(spool.fileno(), 0, access=mmap.ACCESS_READ) if size else nullcontext(b"") as mapped:
                atomic_write_bytes(out, mapped)
            return size


# ----------------------------------------------------------------------------------------- masks
def _savings(tensor: torch.Tensor, kept: int) -> bool:
    """Whether bits + kept values are smaller than the dense tensor."""
    return (tensor.numel() + 7) // 8 + kept * tensor.element_size() < tensor.numel() * tensor.element_size()


def _masks_from_zeros(state: Mapping[str, torch.Tensor], pattern: re.Pattern | None) -> dict[str, torch.Tensor]:
    """Keep-masks from exact +0.0 (bitwise: a -0.0 or a NaN is a value to keep, so unpacking gives the file back
    bit-identical), for every floating 2-D+ weight that packing makes smaller; ``pattern`` narrows them by name."""
    masks = {}
    for key, tensor in state.items():
        if (not tensor.is_floating_point() or tensor.dim() < 2 or not key.endswith("weight")
                or (pattern is not None and not pattern.search(key))):
            continue
        keep = (sf.bits(tensor) != 0).reshape(tensor.shape)
        if _savings(tensor, sf.count(keep)):
            masks[key] = keep
    return masks


def _nonzero(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor != 0`` elementwise (-0.0 is zero, NaN is not), for every floating dtype a packed file holds."""
    tensor = tensor.detach()
    return (tensor.float() if tensor.element_size() == 1 else tensor) != 0


def _include_pattern(include: str | None) -> re.Pattern | None:
    if not include:
        return None
    try:
        return re.compile(include)
    except re.error as exc:
        raise OpenTransError(f"--include {include!r} is not a regular expression ({exc})") from None


def _locate(sub: Subnetwork, state: Mapping[str, torch.Tensor], prefix: str | None, source: str) -> dict[str, str]:
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


def _stored_keys(encoder: TreeEncoder, keys: Mapping[str, str], source: str) -> dict[str, str]:
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


# ----------------------------------------------------------------------------------------- pack
def pack_checkpoint(checkpoint: str | os.PathLike | Mapping[str, Any], out: str | os.PathLike, *,
                    subnetwork: str | os.PathLike | Subnetwork | None = None, zeros: bool = False,
                    dtype: str | None = None, force_zero: bool = False, encoding: str = "packbits",
                    prefix: str | None = None, include: str | None = None, arch: str | None = None,
                    registry: Any = None) -> dict[str, Any]:
    """Write ``checkpoint`` (a file or an in-memory dict) as a packed sparse file at ``out``.

    Exactly one of ``subnetwork`` (registry name, ``hf://`` reference, path or object; its pruned positions
    must be zero in the checkpoint, else the first offending tensor is named, unless ``force_zero`` zeroes
    them) or ``zeros=True`` (masks from exact zeros of floating ``*weight`` tensors of 2-D and up, where that
    saves bytes; ``include`` narrows them by regex) picks the masks. ``dtype`` (``bf16``/``fp16``) casts the
    kept values, recorded so unpacking restores the original dtype. ``encoding``: ``packbits`` or ``zstd``.
    Returns a summary (bytes, ratio, hashes).
    """
    if (subnetwork is None) == (not zeros):
        raise OpenTransError("choose the masks: a subnetwork or zeros=True (exactly one)")
    if include is not None and not zeros:
        raise OpenTransError("include (--include) narrows the masks found from zeros; a subnetwork's masks are "
                             "its own (drop --include, or use --zeros)")
    if dtype is not None and dtype not in sf.CASTS:
        raise OpenTransError(f"unknown dtype {dtype!r}; choose one of {', '.join(sf.CASTS)}")
    if encoding not in ENCODINGS:
        raise OpenTransError(f"unknown encoding {encoding!r}; choose one of {', '.join(ENCODINGS)}")
    source = "<checkpoint>" if isinstance(checkpoint, Mapping) else os.fspath(checkpoint)
    out = check_output(out, None if isinstance(checkpoint, Mapping) else checkpoint)
    if not is_safetensors_name(out):
        raise OpenTransError("a packed file is safetensors: name it *.safetensors (e.g. model.sparse.safetensors)",
                             path=out)
    pattern = _include_pattern(include)
    try:
        if isinstance(checkpoint, Mapping):
            obj, source_meta = dict(checkpoint), None
        else:  # read by content; a safetensors input's metadata (a packed one's: its dense form's) is carried over
            loaded = load_checkpoint(checkpoint)
            obj, source_meta = loaded.obj, loaded.metadata
        encoder = TreeEncoder()
        tree = encoder.encode(obj)
    except RecursionError:
        raise OpenTransError("the checkpoint nests too deeply to be packed", path=source) from None
    for key in encoder.tensors:
        if "::" in key:
            raise OpenTransError("tensor names with '::' cannot be packed", path=source, tensor=key)
        try:
            key.encode("utf-8")
        except UnicodeEncodeError:
            raise OpenTransError("tensor name is not valid UTF-8 (it holds an unpaired surrogate)", path=source,
                                 tensor=ascii(key)[1:-1]) from None
    _, trail = find_state_dict(obj, source)
    head = f"{trail}." if trail else ""
    state = {k[len(head):]: v for k, v in encoder.tensors.items() if k.startswith(head)}
    state.update({k[len(head):]: encoder.tensors[first] for k, first in encoder.aliases.items() if k.startswith(head)})

    if zeros:
        encoder.share()  # what shares storage is stored once: masks are found on what is stored
        state = {k[len(head):]: v for k, v in encoder.tensors.items() if k.startswith(head) and "::" not in k}
        masks = _masks_from_zeros(state, pattern)
        if not masks:
            raise OpenTransError("no weight tensor has enough exact zeros to pack (nothing looks pruned)",
                                 path=source)
        provenance = {k: v for k, v in default_provenance("import", kind="zeros", include=include).items()
                      if k != "created"}  # the same input packs to the same bytes
        sub = Subnetwork(masks, arch=arch or "unknown", provenance=provenance)
        located = {name: name for name in masks}
        key_of = {name: head + name for name in masks}  # subnetwork name -> stored tensor key
    else:
        from .registry import load_subnetwork

        sub = load_subnetwork(subnetwork, registry)
        if arch is not None and arch != sub.arch:
            raise OpenTransError(f"the subnetwork was found on {sub.arch!r}, not {arch!r}")
        located = _locate(sub, state, prefix, source)
        _check_zero(sub, located, state, force_zero, source)
        key_of = _stored_keys(encoder, {name: head + key for name, key in located.items()}, source)
    tensors = encoder.tensors
    negative_zeros = _signed_zeros(sub, located, state)
    mask_names = {key: name for name, key in key_of.items()}
    sub_meta, blobs = encode_parts(sub.masks, sub.arch, sub.provenance, sub.sha256, encoding)
    cast = sf.CASTS.get(dtype) if dtype else None

    specs, sizes, hashes = [], {}, {}
    for key in sorted(tensors):
        tensor = tensors[key]
        dtype_name = sf.dtype_name(tensor.dtype, key, source)
        if key not in mask_names:
            spec = sf.TensorSpec(key, dtype_name, tuple(tensor.shape))
            sizes[key] = tensor.numel() * tensor.element_size()
            hashes[key] = sf.tensor_hash(key, tensor.detach().cpu())
        else:
            name = mask_names[key]
            keep = sub[name].reshape(-1)
            stored = cast if cast is not None and cast != tensor.dtype else None
            if stored is not None:
                _check_cast(tensor, keep, stored, dtype, key, source)
            spec = sf.TensorSpec(key, dtype_name, tuple(tensor.shape), sf.count(keep),
                                 sf.dtype_name(stored, key) if stored is not None else None)
            sizes[key + sf.KEPT_SUFFIX] = spec.kept * (stored or tensor.dtype).itemsize
            sizes[key + sf.MASK_SUFFIX] = len(blobs[name])
            zero_already = stored is None and (zeros or not force_zero) and name not in negative_zeros
            hashes[key] = sf.tensor_hash(key, tensor.detach().cpu() if zero_already else _dense(tensor, keep, stored))
        specs.append(spec)
    content_sha256 = sf.content_sha256(hashes, tree, sf.bound_fields(mask_names, sub.sha256, source_meta or {}, trail))

    def parts(spec: sf.TensorSpec):
        tensor = tensors[spec.key].detach().cpu()
        if not spec.masked:
            yield _bytes(tensor)
            return
        name = mask_names[spec.key]
        values = sf.bits(tensor)[sub[name].reshape(-1)].view(tensor.dtype)
        if spec.stored:
            values = values.to(sf.torch_dtype(spec.stored))
        yield _bytes(values)
        yield blobs[name]

    from ..version import __version__

    metadata = {"format": sf.FORMAT, "format_version": str(sf.FORMAT_VERSION), "content_sha256": content_sha256,
                "state": trail, "arch": sub.arch, "cast": dtype or "", "library": f"opentrans-hub {__version__}",
                "masks": json.dumps(mask_names, sort_keys=True), "subnetwork": json.dumps(sub_meta, sort_keys=True),
                "source_metadata": json.dumps(source_meta or {}, sort_keys=True),
                "method": "zeros" if zeros else "subnetwork"}  # sorted keys: the same input, the same bytes
    size = _spool_to(out, lambda handle: sf.write(handle, specs, parts, sizes, metadata, tree=tree))
    dense = sum(s.dense_bytes for s in specs)
    masked = [s for s in specs if s.masked]
    return {"out": str(out), "content_sha256": content_sha256, "subnetwork_sha256": sub.sha256, "arch": sub.arch,
            "dense_bytes": dense, "packed_bytes": size, "ratio": size / dense if dense else 0.0,
            "masked_tensors": len(masked), "sparsity": sub.sparsity, "dtype": dtype, "encoding": encoding,
            "forced_zero": bool(force_zero and not zeros)}


def _dense(tensor: torch.Tensor, keep: torch.Tensor, stored: torch.dtype | None) -> torch.Tensor:
    """What unpacking will give for a masked tensor: kept values (through the cast) and +0.0 elsewhere."""
    tensor = tensor.detach().cpu()
    source = sf.bits(tensor)
    out = torch.zeros_like(source)
    values = source[keep]
    if stored is not None:
        values = sf.bits(values.view(tensor.dtype).to(stored).to(tensor.dtype))
    out.masked_scatter_(keep, values)
    return out.view(tensor.dtype).reshape(tensor.shape)


def _bytes(tensor: torch.Tensor) -> memoryview:
    if not tensor.numel():
        return memoryview(b"")
    return memoryview(sf.bits(tensor.contiguous()).numpy()).cast("B")


def _check_zero(sub: Subnetwork, located: Mapping[str, str], state: Mapping[str, torch.Tensor], force_zero: bool,
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


def _check_cast(tensor: torch.Tensor, keep: torch.Tensor, stored: torch.dtype, dtype: str, key: str,
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


def _signed_zeros(sub: Subnetwork, located: Mapping[str, str], state: Mapping[str, torch.Tensor]) -> set[str]:
    """Masks whose pruned positions hold a -0.0 somewhere: packing stores them as +0.0, the one pruned value."""
    return {name for name, key in located.items()
            if bool((sf.bits(state[key])[~sub[name].reshape(-1)] != 0).any())}


def packed_stats(reader: PackedReader) -> dict[str, Any]:
    """Dense vs packed bytes and per-tensor sparsity (what ``inspect`` prints), from the header alone: nothing is
    decoded, so nothing here is verified yet (the architecture and hashes are the ones the file records)."""
    layers = []
    for key in reader.mask_names:
        spec = reader.specs[key]
        packed = reader.stored_bytes(spec)
        layers.append({"name": key, "shape": list(spec.shape), "numel": spec.numel, "kept": spec.kept,
                       "sparsity": 1 - spec.kept / spec.numel if spec.numel else 0.0,
                       "dense_bytes": spec.dense_bytes, "packed_bytes": packed,
                       "stored": spec.stored or spec.dtype})
    dense = sum(s.dense_bytes for s in reader.specs.values())
    masked_dense = sum(layer["dense_bytes"] for layer in layers)
    masked_packed = sum(layer["packed_bytes"] for layer in layers)
    return {"path": reader.source, "format_version": reader.version, "content_sha256": reader.content_sha256,
            "subnetwork_sha256": reader.sub_meta.get("sha256") if reader.mask_names else None,
            "unhashed_fields": list(reader.unverified_fields), "file_bytes": reader.size,
            "dense_bytes": dense, "ratio": reader.size / dense if dense else 0.0, "tensors": len(reader.specs),
            "masked_tensors": len(layers), "masked_dense_bytes": masked_dense,
            "masked_packed_bytes": masked_packed,
            "masked_sparsity": (1 - sum(x["kept"] for x in layers) / max(sum(x["numel"] for x in layers), 1)),
            "encoding": reader.sub_meta.get("encoding"), "arch": reader.arch, "cast": reader.cast,
            "state": reader.state_trail, "layers": layers}


def tower_masks(packed: str | os.PathLike | PackedReader, names: Any) -> dict[str, torch.Tensor]:
    """The packed file's keep-masks keyed by a model's parameter ``names``, verified (the embedded subnetwork's
    sha256): the file holds the model under one prefix (the state trail, ``visual.``, a tower path: where every
    name is found), and the masks under it are the model's; masks of other modules in the file (a pruned
    decoder) are not. ``packed``: a path, or a reader already open."""
    reader = packed if isinstance(packed, PackedReader) else open_packed(packed)
    names = set(names)
    prefixes = find_prefixes({*reader.specs, *(node["t"] for node in tensor_nodes(reader.tree))}, names)
    if len(prefixes) != 1:
        what = "no" if not prefixes else f"{len(prefixes)} ({prefixes[:3]})"
        raise OpenTransError(f"the packed file's masks do not fit the model: {what} prefix holds every one of its "
                             f"{len(names)} parameters", path=reader.source)
    prefix = prefixes[0]
    return {key[len(prefix):]: mask for key, mask in reader.masks().items()
            if key.startswith(prefix) and key[len(prefix):] in names}


# ----------------------------------------------------------------------------------------- unpack / load
def load_sparse(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The dense model state dict (zeros at pruned positions) of a packed file, verified."""
    reader = open_packed(path)
    obj = reader.checkpoint()
    state, _ = find_state_dict(obj, path) if isinstance(obj, Mapping) else ({}, "")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def unpack(path: str | os.PathLike, out: str | os.PathLike) -> dict[str, Any]:
    """Write the dense checkpoint of a packed file to ``out`` (``.safetensors`` when it is a flat tensor dict,
    else ``torch.save``), bit-identical to what was packed; verified (the content hash, then the embedded
    subnetwork's own sha256) before the output is committed. What it would write is checked against the decode limit
    (:mod:`opentrans_hub.io.limits`) before anything is decoded."""
    out = check_output(out, path)
    reader = open_packed(path)
    check_decode(reader.dense_bytes, f"unpacking {len(reader.specs)} tensors dense", reader.source)
    flat: list | None = None
    if is_safetensors_name(out):
        flat = reader.tree.get("d") if isinstance(reader.tree, dict) else None
        if not isinstance(flat, list) or not all(isinstance(k, dict) and set(k) == {"s"} and isinstance(v, dict)
                                                 and "t" in v for k, v in flat):
            raise OpenTransError("this checkpoint nests entries beyond a flat tensor dict; unpack it to a .pth "
                                 "file (safetensors holds only a flat dict of tensors)", path=out)
    checked: list[str | None] = []

    def write(handle) -> int:
        size = (_write_dense_safetensors(handle, reader, flat) if is_safetensors_name(out)
                else _torch_save(handle, reader, out.parent))
        checked.append(reader.verify_subnetwork())  # after the content hash, before the output is committed
        return size

    size = _spool_to(out, write)
    subnetwork_sha256 = checked[0]
    return {"out": str(out), "bytes": size, "content_sha256": reader.content_sha256,
            "subnetwork_sha256": subnetwork_sha256, "format_version": reader.version,
            "unhashed_fields": list(reader.unverified_fields),
            "tensors": len({node["t"] for node in tensor_nodes(reader.tree)}),
            "masked_tensors": len(reader.mask_names)}


def _write_dense_safetensors(handle, reader: PackedReader, flat: list) -> int:
    """Every name of a flat checkpoint as its own dense tensor (safetensors shares no storage: a tied tensor is
    written under each of its names), decoded one stored tensor at a time."""
    by_key = {v["t"]: v for _, v in flat if isinstance(v["t"], str) and "a" not in v}
    nodes = {k["s"]: by_key.get(v["a"], v) if isinstance(v.get("a"), str) else v for k, v in flat}  # alias: its
    # tensor's node
    dense, source = [], {}
    for name, node in nodes.items():
        view = node.get("v")
        if view is None:
            source[name] = node["t"]
            spec = reader.specs.get(node["t"]) if isinstance(node["t"], str) else None
            if spec is None:
                raise OpenTransError("the tree names a tensor the header does not describe", path=reader.source,
                                     tensor=str(node["t"]))
            dense.append(sf.TensorSpec(name, spec.dtype, spec.shape))
        else:
            if not isinstance(view, dict) or not isinstance(view.get("of"), str):
                raise OpenTransError(f"bad view record {str(view)[:80]}", path=reader.source, tensor=name)
            source[name] = view["of"]
            dense.append(sf.TensorSpec.from_json(name, {"dtype": view.get("dtype"), "shape": view.get("shape")},
                                                 reader.source))
    order = sf.write_order(dense)
    uses = Counter(source.values())
    needed = list(dict.fromkeys(source[spec.key] for spec in order))
    stream = reader.tensors(order=needed + [k for k in reader.specs if k not in uses])  # the writer's order
    held: dict[str, torch.Tensor] = {}

    def stored(key: str) -> torch.Tensor:
        if key not in held:
            got, tensor = next(stream)
            assert got == key
            held[key] = tensor
        tensor = held[key]
        uses[key] -= 1
        if not uses[key]:
            del held[key]
        return tensor

    def parts(spec: sf.TensorSpec):
        node = nodes[spec.key]
        tensor = (view_of(stored, node["v"], node["t"], reader.source) if "v" in node
                  else stored(node["t"]))
        yield _bytes(tensor)

    written = sf.write(handle, dense, parts, {s.key: s.dense_bytes for s in dense}, reader.source_metadata() or {})
    for _ in stream:  # finish the hash check before the spool is committed
        pass
    return written


def _torch_save(handle, reader: PackedReader, folder: Path) -> int:
    """torch.save the dense checkpoint, its tensors held in scratch files (page cache) instead of memory."""
    with tempfile.TemporaryDirectory(prefix=".opentrans-hub-unpack-", dir=folder) as scratch:
        dense: dict[str, torch.Tensor] = {}
        for i, (key, tensor) in enumerate(reader.tensors()):
            nbytes = tensor.numel() * tensor.element_size()
            if nbytes < (1 << 16):
                dense[key] = tensor
                continue
            mapped = np.memmap(os.path.join(scratch, str(i)), dtype=np.uint8, mode="w+", shape=(nbytes,))
            mapped[:] = _bytes(tensor)
            dense[key] = torch.from_numpy(mapped).view(tensor.dtype).reshape(tensor.shape)
            del tensor
        obj = decode_tree(reader.tree, dense.__getitem__, reader.source)
        start = handle.tell()
        try:
            torch.save(obj, handle)
        except RuntimeError as exc:  # torch's writer wraps a Ctrl-C: report it as the interrupt it is
            if isinstance(exc.__context__, KeyboardInterrupt) or "KeyboardInterrupt" in str(exc):
                raise KeyboardInterrupt from None
            raise
        return handle.tell() - start
