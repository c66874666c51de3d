"""``opentrans-hub inspect SELECTION.json``: a layer selection's policy, flags and learning-rate budget."""

from __future__ import annotations

import argparse

from ._common import print_json, printable, table


def is_selection_file(path: str) -> bool:
    """Whether ``path`` declares the layer-selection format (other JSON goes on to the subnetwork reader's refusal)."""
    from ..errors import OpenTransError
    from ..io.sniff import SELECTION_FORMAT, sniff_file

    try:
        return sniff_file(path).format == SELECTION_FORMAT
    except OpenTransError:
        return False


def run_selection(args: argparse.Namespace) -> int:
    """Verify and describe the selection at ``args.path``: one line on its policy, its lr budget, a per-layer table."""
    from ..formats.selection import LayerSelection
    from ..methods.lr_budget import budget_summary, extreme_layers

    selection = LayerSelection.load(args.path)
    scaled = "lr_range" in selection.policy or selection.has_lr_scales
    if args.json:
        info = {"path": args.path, **selection.to_dict(), "trainable": len(selection.trainable),
                "frozen": len(selection.frozen), "lr_scales": selection.lr_scales if scaled else None}
        print_json(info)
        return 0
    print(printable(f"{args.path}: layer selection for {selection.arch}, sha256 {selection.sha256[:16]}"))
    print(printable(f"policy {selection.policy.get('name', '?')}: {len(selection.trainable)} of "
                    f"{len(selection.layers)} layers trainable"))
    if scaled:
        print(budget_summary(selection))
        top, bottom = extreme_layers(selection, 3)
        for what, layers in (("fastest", top), ("slowest", bottom)):
            print(printable(f"{what}: " + ", ".join(f"{x['name']} x{x.get('lr_scale', 1.0):.3f}" for x in layers)))
    rows = []
    for layer in selection.layers:
        alpha = "-" if layer.get("alpha") is None else f"{layer['alpha']:.3f}"
        row = [printable(layer["name"]), alpha, "yes" if layer["trainable"] else "frozen"]
        rows.append(row + ([f"{layer.get('lr_scale', 1.0):.3f}"] if scaled else []))
    print(table(rows, ["layer", "alpha", "train"] + (["lr scale"] if scaled else [])))
    return 0
