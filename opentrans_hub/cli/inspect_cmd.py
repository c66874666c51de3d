"""``opentrans-hub inspect PATH``: what a subnetwork file holds."""

from __future__ import annotations

import argparse
import os

from ..subnetwork import Subnetwork
from ._common import print_json, printable, table


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("inspect", help="show a subnetwork file: sparsity, size, per-layer table")
    parser.add_argument("path", help="subnetwork .safetensors file")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def describe(path: str) -> dict:
    """``Subnetwork.stats()`` plus what the file costs on disk."""
    sub = Subnetwork.load(path)
    info = sub.stats()
    size = os.path.getsize(path)
    info.update({"path": path, "bytes": size, "bits_per_weight": 8 * size / max(sub.numel, 1),
                 "provenance": sub.provenance, "noncanonical": sub.noncanonical()})
    return info


def run(args: argparse.Namespace) -> int:
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
