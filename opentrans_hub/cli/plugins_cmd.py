"""``opentrans-hub plugins list|check``: installed framework plugins, and how one fits a real checkpoint."""

from __future__ import annotations

import argparse

from ._common import print_json, table


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("plugins", help="list framework plugins; check one against a checkpoint")
    sub = parser.add_subparsers(dest="plugins_command", metavar="ACTION", required=True)

    listing = sub.add_parser("list", help="plugins found through the 'opentrans_hub.plugins' entry points")
    listing.add_argument("--json", action="store_true", help="print one JSON object")
    listing.set_defaults(func=run_list)

    check = sub.add_parser("check", help="map a plugin's names onto a real checkpoint and report the fit")
    check.add_argument("plugin", help="plugin name (see 'plugins list')")
    check.add_argument("--checkpoint", required=True, help="framework checkpoint (.pth via weights_only, "
                       ".safetensors)")
    check.add_argument("--arch", default=None, help="architecture id, e.g. open_clip/RN50 (default: the plugin's "
                       "first, or the subnetwork's)")
    check.add_argument("--subnetwork", default=None, help="also map this subnetwork (name or file) and report the "
                       "sparsity it would leave")
    check.add_argument("--strict", action="store_true", help="exit 2 when names stay unmapped")
    check.add_argument("--json", action="store_true", help="print one JSON object")
    check.set_defaults(func=run_check)


def run_list(args: argparse.Namespace) -> int:
    from ..transfer.discovery import list_plugins

    plugins, errors = list_plugins()
    if args.json:
        print_json({"plugins": [p.describe() for p in plugins], "errors": [e.to_dict() for e in errors]})
        return 0
    if plugins:
        rows = [[p.name, ", ".join(p.frameworks), ", ".join(p.archs), p.tower_path if p.tower_path is not None
                 else "(locator)", p.source] for p in plugins]
        print(table(rows, ["plugin", "frameworks", "archs", "tower", "from"]))
    else:
        print("no plugins installed (install e.g. ./plugins/* with pip)")
    print("auto (built in): infers the name map from each checkpoint or model; 'opentrans-hub map' shows it")
    for error in errors:
        print(f"BROKEN {error.name} ({error.value}, {error.source or '?'}): {error.error}")
    return 0


def run_check(args: argparse.Namespace) -> int:
    from ..errors import OpenTransError
    from ..transfer.discovery import get_plugin
    from ..zoo.registry import load_subnetwork

    plugin = get_plugin(args.plugin)
    subnetwork = load_subnetwork(args.subnetwork) if args.subnetwork else None
    info = plugin.check(args.checkpoint, arch=args.arch, subnetwork=subnetwork)
    counts = info["counts"]
    if args.json:
        print_json(info)
    else:
        print(f"{plugin.name} on {args.checkpoint} ({info['arch']}): mapped {counts['mapped']}, dropped "
              f"{counts['dropped']}, unmapped {counts['unmapped']}, shape mismatches {counts['mismatched']}; "
              f"kept sparsity {info['kept_sparsity']:.2%} over {info['mapped_params']:,} mapped weights")
        for item in info["dropped"]:
            print(f"  dropped   {item['source']}: {item['reason']}")
        for item in info["unmapped"]:
            print(f"  unmapped  {item['source']}: {item['reason']}")
        for item in info["mismatched"]:
            print(f"  MISMATCH  {item['source']} -> {item['target']}: {tuple(item['expected'])} vs "
                  f"{tuple(item['got'])}")
    if counts["mismatched"]:
        raise OpenTransError(f"{counts['mismatched']} shape mismatch(es): the plugin does not fit this checkpoint",
                             path=args.checkpoint)
    if args.strict and counts["unmapped"]:
        raise OpenTransError(f"strict: {counts['unmapped']} name(s) found no destination", path=args.checkpoint)
    return 0
