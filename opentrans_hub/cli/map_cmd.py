"""``opentrans-hub map CHECKPOINT --arch A``: infer the name map of a framework, optionally write its plugin.

Prints a table (canonical tensor, targets, transform, confidence, evidence), the unmapped tensors with reasons
and the rules; ``--json`` prints one JSON object (arch, tower, rules, mapping, unmapped, candidates). Exits 0 only
when a tower was found and mapped; an ambiguous layout exits 2 naming the candidates and ``--tower``.
"""

from __future__ import annotations

import argparse

from ._common import print_json, printable, table


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("map", help="infer how a framework names the CLIP tower (no rules written by "
                                   "hand); optionally write an installable plugin")
    parser.add_argument("checkpoint", help="framework checkpoint (.pth via weights_only, .safetensors)")
    parser.add_argument("--arch", required=True, help="architecture id, e.g. open_clip/RN50")
    parser.add_argument("--weights", default=None, help="the base tower's weights (open_clip names): a file "
                        "(.safetensors, OpenAI .pt) or an open_clip tag; values become evidence")
    parser.add_argument("--tower", default=None, help="only look under this prefix (to choose when two towers fit)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--write-plugin", metavar="DIR", default=None, help="write an installable plugin "
                        "distribution into DIR (must be new or empty)")
    parser.add_argument("--name", default=None, help="plugin name for --write-plugin")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import OpenTransError
    from ..transfer.inference import AmbiguousTowerError, infer_name_map
    from ..transfer.inference.report import target_tensors
    from ..transfer.scaffold import rule_lines, write_plugin

    if args.write_plugin and not args.name:
        raise OpenTransError("--write-plugin needs --name NAME (the plugin's name)")
    if args.name and not args.write_plugin:
        raise OpenTransError("--name is only used with --write-plugin DIR")
    try:
        name_map, report = infer_name_map(args.checkpoint, args.arch, weights=args.weights, tower=args.tower)
    except AmbiguousTowerError as exc:
        if args.json:
            print_json({"arch": args.arch, "tower": None, "ok": False, "error": str(exc),
                        "candidates": exc.candidates})
        raise
    written = None
    if args.write_plugin:
        names = list(target_tensors(args.checkpoint)[0])  # the plugin maps without DDP's prefix; apply adds it
        written = write_plugin(args.write_plugin, args.name, args.arch, name_map, report, names, args.checkpoint)
    if args.json:
        info = report.to_dict()
        info.update({"ok": True, "checkpoint": args.checkpoint, "plugin_dir": str(written) if written else None})
        print_json(info)
        return 0
    rows = [[t.source, ", ".join(t.targets), t.transform, t.confidence, "; ".join(t.evidence)]
            for t in report.tensors.values()]
    print(table(rows, ["canonical", "target", "transform", "confidence", "evidence"]))
    for source, reason in report.unmapped.items():
        print(printable(f"unmapped  {source}: {reason}"))
    print()
    print(printable(f"{args.arch}: tower {report.tower!r} ({report.structure}); mapped {len(report.tensors)}, "
                    f"unmapped {len(report.unmapped)}; rules:"))
    for line in rule_lines(name_map, report):
        print(printable(line))
    if written:
        where = str(written) if written.is_absolute() or str(written).startswith(".") else f"./{written}"
        print()
        print(printable(f"wrote plugin {args.name!r} to {written}: pip install {where}"))
    return 0
