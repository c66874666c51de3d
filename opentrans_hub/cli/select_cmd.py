"""``opentrans-hub select TARGET --policy median --out FILE``: derive and save a LayerSelection (JSON).

``--policy alpha-lr [--lr-range LO HI]`` trains every layer with a learning-rate scale from its alpha (a
budget for ``oth.param_groups``); ``--lr-range`` with another policy adds the scales to that policy's flags.
"""

from __future__ import annotations

import argparse

from ._common import add_overwrite, check_out, print_json
from .spectrum_cmd import add_metric_options, add_policy_options, build_selection, measure


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("select", help="choose the layers to fine-tune by alpha; write a selection")
    add_metric_options(parser)
    add_policy_options(parser, required=False)
    parser.add_argument("--out", required=True, help="where to write the selection JSON")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_overwrite(parser)
    parser.set_defaults(func=run, policy="median")


def run(args: argparse.Namespace) -> int:
    check_out(args, args.out, args.target, args.weights)
    metrics, arch, sha = measure(args)
    selection = build_selection(args, metrics, arch, sha)
    path = selection.save(args.out)
    if args.json:
        print_json({"path": str(path), "sha256": selection.sha256, "arch": selection.arch,
                    "weights_sha256": selection.weights_sha256, "policy": selection.policy,
                    "trainable": selection.trainable, "frozen": selection.frozen,
                    "lr_scales": {layer["name"]: layer["lr_scale"] for layer in selection.layers
                                  if "lr_scale" in layer} or None})
        return 0
    print(f"{path}: {selection.arch}, policy {selection.policy.get('name')}: {len(selection.trainable)} of "
          f"{len(selection.layers)} layers trainable ({selection.policy.get('trainable_params', 0):,} weights); "
          f"sha256 {selection.sha256[:16]}")
    if "lr_range" in selection.policy:
        from ..methods.lr_budget import budget_summary

        print(budget_summary(selection))
    return 0
