"""``opentrans-hub demo``: the whole pipeline end to end on embedded defaults (see opentrans_hub.demo.run)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ._common import print_json, table


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="run IMP + spectral selection + registry + 3 framework transfers "
                                   "end to end (about 3 minutes of CPU time)")
    parser.add_argument("--out", default="opentrans-demo", help="output folder (registry, plots, summary.json)")
    parser.add_argument("--weights", default=None, help="real CLIP RN50 weights file (default: random init)")
    parser.add_argument("--quick", action="store_true", help="smaller images and fewer steps (tests, smoke runs)")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..demo.run import run_demo

    log = (lambda message: print(message, file=sys.stderr)) if args.json else print
    summary = run_demo(args.out, weights=args.weights, quick=args.quick, progress=not args.no_progress, log=log)
    if args.json:
        print_json(summary)
        return 0
    print()
    print(format_table(summary))
    print()
    print(f"plots: {summary['plots']['alpha']}, {summary['plots']['sparsity']}; summary: {args.out}/summary.json "
          f"({summary['timings']['total_s']:.0f} s)")
    return 0


def format_table(summary: dict[str, Any]) -> str:
    """The per-framework table the demo prints."""
    def giga(flops: int) -> str:
        return f"{flops / 1e9:.2f}G"

    rows = []
    for fw in summary["frameworks"]:
        rows.append([
            fw["framework"], f"{fw['params_kept']:,}/{fw['params_total']:,}",
            f"{fw['sparsity_before']:.2%}->{fw['sparsity_after']:.2%}", f"{fw['trainable_params']:,}",
            f"{giga(fw['inference_flops_sparse'])}/{giga(fw['inference_flops_dense'])}",
            f"{giga(fw['train_flops_selected'])}/{giga(fw['train_flops_full'])} ({fw['train_flops_ratio']:.2f}x)",
            f"{fw['mapped']}/{fw['unmapped']}",
        ])
    return table(rows, ["framework", "params kept/total", "sparsity before->after train", "trainable params",
                        "inference FLOPs kept/dense", "train FLOPs/step selected/full", "mapped/unmapped"])
