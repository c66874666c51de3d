"""``opentrans-hub list | info NAME | verify NAME|PATH | add PATH --name NAME | materialise NAME``: the registry."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from ._common import add_max_bytes, print_json, printable, table

if TYPE_CHECKING:
    from ..zoo.registry import Registry


def _registry(args: argparse.Namespace) -> Registry:
    from ..zoo.registry import Registry

    return Registry(args.registry) if getattr(args, "registry", None) else Registry()


def _common(parser: argparse.ArgumentParser, json_flag: bool = True) -> None:
    parser.add_argument("--registry", metavar="DIR", help="registry folder (default: $OPENTRANS_HUB_HOME or the "
                        "platform's user data folder)")
    if json_flag:
        parser.add_argument("--json", action="store_true", help="print one JSON object")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("list", help="list registry entries and built-in recipes")
    _common(p)
    p.set_defaults(func=run_list)

    p = subparsers.add_parser("info", help="show one registry entry or built-in recipe")
    p.add_argument("name")
    _common(p)
    p.set_defaults(func=run_info)

    p = subparsers.add_parser("verify", help="re-check the hashes of a registry entry, hf:// ref or file")
    p.add_argument("ref", metavar="NAME|PATH")
    _common(p)
    add_max_bytes(p)
    p.set_defaults(func=run_verify)

    p = subparsers.add_parser("add", help="add a subnetwork (.safetensors) or selection (.json) file by name")
    p.add_argument("path")
    p.add_argument("--name", required=True, help="registry name: [a-z0-9][a-z0-9._-]*")
    p.add_argument("--overwrite", action="store_true", help="replace an entry of that name")
    _common(p)
    p.set_defaults(func=run_add)

    p = subparsers.add_parser("materialise", help="run a built-in recipe on its base weights into the registry")
    p.add_argument("name")
    p.add_argument("--weights", metavar="FILE", help="base weights file (its sha256 must match the recipe)")
    p.add_argument("--download", action="store_true", help="download the base weights if not cached")
    _common(p)
    p.set_defaults(func=run_materialise)


def run_list(args: argparse.Namespace) -> int:
    rows = _registry(args).list()
    if args.json:
        print_json({"registry": str(_registry(args).root), "entries": rows})
        return 0
    out = []
    for row in rows:
        detail = f"{row['sparsity']:.2%} sparse" if isinstance(row.get("sparsity"), float) else row.get("method", "")
        out.append([row["name"], row["kind"], row.get("arch", "?"), row["status"], detail,
                    row.get("sha256", "")[:12]])
    print(table(out, ["name", "kind", "arch", "status", "detail", "sha256"]))
    return 0


def run_info(args: argparse.Namespace) -> int:
    info = _registry(args).info(args.name)
    if args.json:
        print_json(info)
        return 0
    for key, value in info.items():
        print(printable(f"{key}: {value}"))
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from ..io.limits import decode_limit

    with decode_limit(args.max_bytes):
        result = _registry(args).verify(args.ref)
    if args.json:
        print_json(result)
    else:
        print(f"ok: {args.ref} ({result['kind']}, sha256 {result['sha256']})")
        if result.get("unhashed_fields"):
            print(f"note: this packed file's format version does not hash its header's "
                  f"{', '.join(result['unhashed_fields'])}: those are not verified (pack the file again to cover them)")
    return 0


def run_add(args: argparse.Namespace) -> int:
    entry = _registry(args).add(args.path, args.name, overwrite=args.overwrite)
    if args.json:
        print_json(entry.to_dict())
    else:
        print(f"added {entry.name}: {entry.kind}, sha256 {entry.sha256}")
    return 0


def run_materialise(args: argparse.Namespace) -> int:
    entry = _registry(args).materialise(args.name, weights=args.weights, download=args.download, progress=True)
    if args.json:
        print_json(entry.to_dict())
    else:
        print(f"materialised {entry.name}: sha256 {entry.sha256}")
    return 0
