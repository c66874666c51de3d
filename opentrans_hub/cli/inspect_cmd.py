"""``opentrans-hub inspect PATH``: what a subnetwork file, a packed sparse checkpoint or a layer selection holds.

A subnetwork file is decoded and verified. A packed file is described from its header alone (sizes checked
against the file, nothing decoded, so a few KB that claim gigabytes cost nothing) and says so: its hashes are
checked by ``opentrans-hub verify PATH`` and by ``unpack``.
"""

from __future__ import annotations

import argparse
import os

from ..io.gcpause import gc_paused
from ._common import print_json, printable, table


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("inspect", help="show a subnetwork, packed file or layer selection: "
                                   "sparsity, size, lr budget, per-layer table")
    parser.add_argument("path", help="subnetwork or packed .safetensors file, or a layer selection .json")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def describe(path: str) -> dict:
    """``Subnetwork.stats()`` plus what the file costs on disk."""
    from ..formats.subnetwork import Subnetwork

    sub = Subnetwork.load(path)
    info = sub.stats()
    size = os.path.getsize(path)
    info.update({"path": path, "bytes": size, "bits_per_weight": 8 * size / max(sub.numel, 1),
                 "provenance": sub.provenance, "noncanonical": sub.noncanonical()})
    return info


@gc_paused()  # a header of many tensors is millions of small objects, none in a cycle
def run(args: argparse.Namespace) -> int:
    from ..formats.packed import is_packed

    if is_packed(args.path):
        return _run_packed(args)
    from .inspect_selection import is_selection_file, run_selection

    if is_selection_file(args.path):
        return run_selection(args)
    info = describe(args.path)
    if args.json:
        print_json(info)
        return 0
    print(f"{printable(info['path'])}: {info['arch']}, sha256 {info['sha256'][:16]}")
    print(f"sparsity {info['sparsity']:.2%}: {info['kept_params']:,} kept of {info['total_params']:,} weights in "
          f"{info['num_layers']} layers; {info['bytes']:,} bytes ({info['bits_per_weight']:.3f} bits/weight)")
    method = info["provenance"].get("method", "?")
    print(printable(f"method: {method} {info['provenance'].get('settings', '')}"))
    rows = [[layer["name"], "x".join(map(str, layer["shape"])), f"{layer['kept']:,}", f"{layer['sparsity']:.2%}"]
            for layer in info["layers"]]
    print(table(rows, ["layer", "shape", "kept", "sparsity"]))
    return 0


def _run_packed(args: argparse.Namespace) -> int:
    from ..formats.packed import open_packed
    from ..zoo.packing import packed_stats

    reader = open_packed(args.path)  # the header, checked; no mask or tensor is decoded
    info = {**packed_stats(reader), "verified": False}
    if args.json:
        print_json(info)
        return 0
    print(printable(f"{info['path']}: packed {info['arch']} checkpoint, format version {info['format_version']}, "
                    f"content sha256 {info['content_sha256'][:16]} (header only, not verified: "
                    f"`opentrans-hub verify {info['path']}` checks it)"))
    print(f"{info['file_bytes']:,} bytes packed vs {info['dense_bytes']:,} dense ({info['ratio']:.1%}); masked tensors "
          f"{info['masked_packed_bytes']:,} vs {info['masked_dense_bytes']:,} bytes, {info['masked_sparsity']:.2%} "
          f"sparse; mask bits {info['encoding']}, values {info['cast'] or 'in their own dtype'}")
    rows = [[layer["name"], "x".join(map(str, layer["shape"])), f"{layer['kept']:,}", f"{layer['sparsity']:.2%}",
             f"{layer['dense_bytes']:,}", f"{layer['packed_bytes']:,}"] for layer in info["layers"]]
    print(table(rows, ["tensor", "shape", "kept", "sparsity", "dense bytes", "packed bytes"]))
    if info["unhashed_fields"]:
        print(f"note: format version {info['format_version']}: its content sha256 does not cover the header's "
              f"{', '.join(info['unhashed_fields'])} (pack the file again to cover them)")
    return 0
