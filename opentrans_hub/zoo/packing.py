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
import secrets
import shutil
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
from ..io.gcpause import gc_paused
from ..io.limits import check_decode
from ..io.tree import TreeEncoder, decode_tree, tensor_nodes, view_of
from .pack_masks import (
    check_cast,
    check_zero,
    element_bits,
    include_pattern,
    locate,
    masks_from_zeros,
    signed_zeros,
    stored_keys,
)

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


# ----------------------------------------------------------------------------------------- pack
@gc_paused()
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
    pattern = include_pattern(include)
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
    _check_names([*encoder.tensors, *encoder.aliases], source)
    _, trail = find_state_dict(obj, source)
    head = f"{trail}." if trail else ""
    tensors = encoder.tensors  # what is stored, once storage sharing is resolved below

    if zeros:
        encoder.share()  # masks are found on what is stored
        data = _TensorBytes(tensors)
        keeps = masks_from_zeros({k: v for k, v in tensors.items() if k.startswith(head) and "::" not in k}, data,
                                 pattern)
        if not keeps:
            raise OpenTransError("no weight tensor has enough exact zeros to pack (nothing looks pruned)",
                                 path=source)
        provenance = {k: v for k, v in default_provenance("import", kind="zeros", include=include).items()
                      if k != "created"}  # the same input packs to the same bytes
        sub = Subnetwork({k[len(head):]: torch.from_numpy(keep.reshape(tensors[k].shape)) for k, keep in keeps.items()},
                         arch=arch or "unknown", provenance=provenance)
        key_of = {key[len(head):]: key for key in keeps}  # subnetwork name -> stored tensor key
        negative_zeros: set[str] = set()  # masks of exact +0.0: every pruned position already is one
    else:
        from .registry import load_subnetwork

        sub = load_subnetwork(subnetwork, registry)
        if arch is not None and arch != sub.arch:
            raise OpenTransError(f"the subnetwork was found on {sub.arch!r}, not {arch!r}")
        state = {k[len(head):]: v for k, v in tensors.items() if k.startswith(head)}
        state.update({k[len(head):]: tensors[first] for k, first in encoder.aliases.items() if k.startswith(head)})
        located = locate(sub, state, prefix, source)  # tied names too
        check_zero(sub, located, state, force_zero, source)
        key_of = stored_keys(encoder, {name: head + key for name, key in located.items()}, source)
        negative_zeros = signed_zeros(sub, located, state)
        data = _TensorBytes(tensors)
        keeps = {key: sub[name].reshape(-1).numpy() for name, key in key_of.items()}
    mask_names = {key: name for name, key in key_of.items()}
    sub_meta, blobs = encode_parts(sub.masks, sub.arch, sub.provenance, sub.sha256, encoding)
    cast = sf.CASTS.get(dtype) if dtype else None

    specs, sizes, hashes = [], {}, {}
    for key in sorted(tensors):
        tensor, raw = tensors[key], data[key]
        name, dtype_name, shape = mask_names.get(key), sf.dtype_name(tensor.dtype, key, source), tuple(tensor.shape)
        if name is None:
            specs.append(sf.TensorSpec(key, dtype_name, shape))
            sizes[key] = raw.nbytes
            hashes[key] = sf.raw_hash(key, dtype_name, shape, raw)
            continue
        keep = keeps[key]
        stored = cast if cast is not None and cast != tensor.dtype else None
        if stored is not None:
            check_cast(tensor, torch.from_numpy(keep), stored, dtype, key, source)
        spec = sf.TensorSpec(key, dtype_name, shape, int(np.count_nonzero(keep)),
                             sf.dtype_name(stored, key) if stored is not None else None)
        sizes[key + sf.KEPT_SUFFIX] = spec.kept * (stored or tensor.dtype).itemsize
        sizes[key + sf.MASK_SUFFIX] = len(blobs[name])
        if stored is None and (zeros or not force_zero) and name not in negative_zeros:  # packing changes no bit
            hashes[key] = sf.raw_hash(key, dtype_name, shape, raw)
        else:
            hashes[key] = sf.tensor_hash(key, _dense(tensor, torch.from_numpy(keep), stored))
        specs.append(spec)
    content_sha256 = sf.content_sha256(hashes, tree, sf.bound_fields(mask_names, sub.sha256, source_meta or {}, trail))

    def parts(spec: sf.TensorSpec):
        raw = data[spec.key]
        if not spec.masked:
            yield raw
            return
        tensor = tensors[spec.key]
        values = element_bits(raw, tensor.element_size())[keeps[spec.key]]
        if spec.stored:
            values = sf.as_bytes(torch.from_numpy(values).view(tensor.dtype).to(sf.torch_dtype(spec.stored)))
        yield values.view(np.uint8)
        yield blobs[mask_names[spec.key]]

    from ..version import __version__

    metadata = {"format": sf.FORMAT, "format_version": str(sf.FORMAT_VERSION), "content_sha256": content_sha256,
                "state": trail, "arch": sub.arch, "cast": dtype or "", "library": f"opentrans-hub {__version__}",
                "masks": json.dumps(mask_names, sort_keys=True), "subnetwork": json.dumps(sub_meta, sort_keys=True),
                "source_metadata": json.dumps(source_meta or {}, sort_keys=True),
                "method": "zeros" if zeros else "subnetwork"}  # sorted keys: the same input, the same bytes
    size = _spool_to(out, lambda handle: sf.write(handle, specs, parts, sizes, metadata, tree=tree))
    dense = sum(s.dense_bytes for s in specs)
    masked = [s for s in specs if s.masked]
    kept, numel = sum(s.kept for s in masked), sum(s.numel for s in masked)
    return {"out": str(out), "content_sha256": content_sha256, "subnetwork_sha256": sub.sha256, "arch": sub.arch,
            "dense_bytes": dense, "packed_bytes": size, "ratio": size / dense if dense else 0.0,
            "masked_tensors": len(masked), "sparsity": 1 - kept / numel if numel else 0.0, "dtype": dtype,
            "encoding": encoding, "forced_zero": bool(force_zero and not zeros)}


class _TensorBytes:
    """Each tensor's bytes in C order (:func:`~opentrans_hub.io.packed_spec.as_bytes`), taken once and kept when
    they are the tensor's own memory; a copy (of a non-contiguous or GPU tensor) is made again when asked, so it
    lives only while it is used."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self.tensors = tensors
        self.kept: dict[str, np.ndarray] = {}

    def __getitem__(self, key: str) -> np.ndarray:
        data = self.kept.get(key)
        if data is None:
            tensor = self.tensors[key]
            data = sf.as_bytes(tensor.cpu())
            if tensor.device.type == "cpu" and tensor.is_contiguous():
                self.kept[key] = data
        return data


def _check_names(keys: list[str], source: str) -> None:
    """Refuse names the format cannot hold: ``::`` (its own suffixes) and unpaired surrogates (not UTF-8)."""
    for key in keys:
        if "::" in key:
            raise OpenTransError("tensor names with '::' cannot be packed", path=source, tensor=key)
        try:
            key.encode("utf-8")
        except UnicodeEncodeError:
            raise OpenTransError("tensor name is not valid UTF-8 (it holds an unpaired surrogate)", path=source,
                                 tensor=ascii(key)[1:-1]) from None


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


def _bytes(tensor: torch.Tensor) -> np.ndarray | bytes:
    return sf.as_bytes(tensor) if tensor.numel() else b""


def packed_stats(reader: PackedReader) -> dict[str, Any]:
    """Dense vs packed bytes and per-tensor sparsity (what ``inspect`` prints), from the header alone: nothing is
    decoded, so nothing here is verified yet (the architecture and hashes are the ones the file records);
    ``tensors`` counts what is stored, ``shared_tensors`` the names stored with another (the same object again, or a
    view of its storage)."""
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
            "shared_tensors": sum(1 for node in tensor_nodes(reader.tree) if "a" in node or "v" in node),
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
@gc_paused()
def load_sparse(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The dense model state dict (zeros at pruned positions) of a packed file, verified."""
    reader = open_packed(path)
    obj = reader.checkpoint()
    state, _ = find_state_dict(obj, path) if isinstance(obj, Mapping) else ({}, "")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


@gc_paused()
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
    """torch.save the dense checkpoint, its tensors held in scratch files (page cache) instead of memory.

    The scratch folder's name is chosen before it is made and removed in ``finally``: a Ctrl-C at any moment, even
    while ``mkdtemp`` would still be returning, leaves nothing behind."""
    scratch = os.path.join(folder, f".opentrans-hub-unpack-{secrets.token_hex(16)}")
    try:
        os.mkdir(scratch, 0o700)
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
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
