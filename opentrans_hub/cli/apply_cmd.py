"""``opentrans-hub apply --plugin P --subnetwork S --checkpoint IN --out OUT``: transfer onto a checkpoint.

With ``--subnetwork`` the checkpoint is rewritten with the pruned weights zeroed (everything else
bit-identical); with ``--selection`` a JSON manifest of the framework's parameter names that train and that
stay frozen is written instead, for trainers that freeze by name.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ._common import add_overwrite, check_out, print_json, printable
from .plugins_cmd import add_tower_option, plugin_for


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("apply", help="transfer a subnetwork (or layer selection) onto a framework "
                                   "checkpoint through a plugin")
    parser.add_argument("--plugin", required=True, help="plugin name (see 'plugins list')")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--subnetwork", help="subnetwork name or .safetensors file")
    what.add_argument("--selection", help="layer selection name or .json file")
    parser.add_argument("--checkpoint", required=True, help="framework checkpoint (.pth via weights_only, "
                        ".safetensors)")
    parser.add_argument("--out", required=True, help="checkpoint to write (subnetwork; .pth keeps the input's "
                        "nesting, .safetensors holds its tensor dict) or JSON manifest (selection)")
    parser.add_argument("--arch", default=None, help="architecture id to map with (default: the subnetwork's or "
                        "selection's own, e.g. open_clip/RN50)")
    parser.add_argument("--strict", action="store_true", help="fail (write nothing) when a name finds no destination")
    parser.add_argument("--allow-partial", action="store_true", help="apply even when the checkpoint's tower has "
                        "Conv/Linear weights the subnetwork's architecture does not cover (they stay dense, listed)")
    add_tower_option(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_overwrite(parser)
    parser.set_defaults(func=run)


def _print_report(report_dict: dict[str, Any], header: str) -> None:
    counts = report_dict["counts"]
    print(printable(f"{header}: mapped {counts['mapped']}, dropped {counts['dropped']}, unmapped {counts['unmapped']}"))
    for item in report_dict["dropped"]:
        print(printable(f"  dropped   {item['source']}: {item['reason']}"))
    for item in report_dict["unmapped"]:
        print(printable(f"  unmapped  {item['source']}: {item['reason']}"))
    for name in report_dict.get("uncovered", []):
        print(printable(f"  dense     {name}: no counterpart in the subnetwork's architecture (--allow-partial)"))


def _say_inferred(plugin: Any) -> None:
    """What the ``auto`` plugin inferred, on stderr, one line per rule: an apply never maps unseen rules."""
    report, name_map = getattr(plugin, "last_report", None), getattr(plugin, "last_map", None)
    if report is None or name_map is None:
        return
    print(printable(f"opentrans-hub apply: auto: tower {report.tower or '(top level)'!r}, {len(report.tensors)} "
                    f"tensors mapped, {len(report.unmapped)} unmapped; {len(name_map.rules)} rules:"), file=sys.stderr)
    for rule in name_map.rules:
        print(printable(f"opentrans-hub apply: auto rule: {rule}"), file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from ..io.atomic import atomic_write_text
    from ..io.checkpoints import read_state_dict
    from ..zoo.registry import load_selection, load_subnetwork

    check_out(args, args.out, args.checkpoint, args.subnetwork, args.selection)
    plugin = plugin_for(args.plugin, args.tower)
    if args.subnetwork:
        subnetwork = load_subnetwork(args.subnetwork)
        report = plugin.apply_checkpoint(args.checkpoint, subnetwork, args.out, strict=args.strict, arch=args.arch,
                                         allow_partial=args.allow_partial)
        _say_inferred(plugin)
        info = {"plugin": plugin.name, "arch": args.arch or subnetwork.arch, "subnetwork": subnetwork.sha256,
                "sparsity": subnetwork.sparsity, "checkpoint": args.checkpoint, "out": args.out, **report.to_dict()}
        if args.json:
            print_json(info)
        else:
            _print_report(info, f"{plugin.name}: wrote {args.out}")
        return 0
    selection = load_selection(args.selection)
    state = read_state_dict(args.checkpoint)
    flags, report = plugin.map_selection(selection, state, arch=args.arch)
    _say_inferred(plugin)
    report.check(strict=args.strict, source=args.checkpoint)
    manifest = {"format": "opentrans-hub/mapped-selection", "plugin": plugin.name, "arch": args.arch or selection.arch,
                "selection": selection.sha256, "checkpoint": args.checkpoint,
                "trainable": sorted(n for n, t in flags.items() if t),
                "frozen": sorted(n for n, t in flags.items() if not t), "report": report.to_dict()}
    atomic_write_text(args.out, json.dumps(manifest, indent=1) + "\n")
    if args.json:
        print_json({**manifest, "out": args.out})
    else:
        _print_report(manifest["report"], f"{plugin.name}: wrote {args.out} ({len(manifest['trainable'])} trainable, "
                      f"{len(manifest['frozen'])} frozen)")
    return 0
