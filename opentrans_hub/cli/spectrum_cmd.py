"""``opentrans-hub spectrum TARGET``: power-law alpha (and friends) of every layer, optionally a selection.

TARGET is an architecture id (``open_clip/RN50``; weights from ``--weights FILE|TAG``) or a bare state-dict
file (safetensors, or ``.pth`` read with weights_only): there 4-D tensors are convolutions, 2-D ones linear.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any

from ..errors import OpenTransError
from ._common import add_overwrite, check_out, print_json, table


def add_metric_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``spectrum`` and ``select``."""
    parser.add_argument("target", help="architecture id (open_clip/RN50) or a state-dict file")
    parser.add_argument("--weights", help="weights file or tag for an architecture id (default: random init)")
    parser.add_argument("--arch", help="architecture id to record when TARGET is a bare state-dict file")
    parser.add_argument("--xmin", choices=("peak", "mid", "scan"), default="peak",
                        help="x_min method: peak (OpenTrans, default), mid, scan (weightwatcher's default)")
    parser.add_argument("--conv-norm", type=float, default=0.5, help="conv slices are scaled by sqrt(this)")
    parser.add_argument("--max-aspect", type=float, default=8.0,
                        help="skip Linear layers with this aspect ratio or more (0: keep all)")
    parser.add_argument("--device", default=None, help="where to compute spectra (cpu, cuda; default cpu)")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the metrics cache")


def add_policy_options(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--policy", choices=("median", "fraction", "count", "budget", "alpha-lr"), required=required,
                        help="selection policy (median = the paper; alpha-lr: every layer trains, its learning rate "
                        "scaled by its alpha)")
    parser.add_argument("--fraction", type=float, help="fraction policy: share of layers to train")
    parser.add_argument("--count", type=int, help="count policy: number of layers to train")
    parser.add_argument("--max-params", type=int, help="budget policy: most trainable weights")
    parser.add_argument("--lr-range", type=float, nargs=2, metavar=("LO", "HI"),
                        help="learning-rate scales linear in alpha from LO (lowest alpha) to HI (highest); with "
                        "alpha-lr the default is 0.5 1.5, with another policy it adds the scales to its flags")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("spectrum", help="power-law alpha per layer of a model or state dict")
    add_metric_options(parser)
    add_policy_options(parser, required=False)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--plot", metavar="FILE", help="write alpha per layer (median, selected layers) to a PNG, "
                        "SVG or PDF file")
    add_overwrite(parser)
    parser.set_defaults(func=run)


def load_target(args: argparse.Namespace) -> tuple[Any, str, str | None]:
    """(module or state dict, arch id, weights sha256 or None) for the command's TARGET."""
    from ..io.checkpoints import read_state_dict
    from ..io.sniff import sniff_file
    from ..towers.backbones import build_visual, weights_sha256

    target = args.target
    if Path(target).is_dir():
        raise OpenTransError("is a directory, expected an architecture id or a state-dict file", path=target)
    if Path(target).is_file():
        if args.weights:
            raise OpenTransError("--weights goes with an architecture id; TARGET is already a weights file",
                                 path=target)
        state = read_state_dict(target)
        if sniff_file(target).kind == "safetensors":  # safetensors sorts names: restore a network order
            state = {name: state[name] for name in _network_order(state, args.arch)}
        return state, args.arch or "unknown", weights_sha256(state)
    if Path(target).suffix in {".safetensors", ".pth", ".pt", ".bin", ".ckpt"}:
        raise OpenTransError("no such file", path=target)
    if args.weights is None:
        print(f"opentrans-hub: no --weights given, measuring a randomly initialised {target}", file=sys.stderr)
    visual = build_visual(target, pretrained=args.weights)
    return visual, target, (weights_sha256(visual) if args.weights else None)


def _natural_key(name: str) -> list:
    return [(0, int(part), "") if part.isdecimal() else (1, 0, part) for part in re.split(r"(\d+)", name)]


def _network_order(state: dict, arch: str | None) -> list[str]:
    """Names in the order the architecture's tower defines them (with ``--arch``), else natural order."""
    names = sorted(state, key=_natural_key)
    if arch:
        from ..towers.backbones import build_visual

        try:
            order = {name: i for i, name in enumerate(build_visual(arch).state_dict())}
        except OpenTransError:
            return names
        names.sort(key=lambda name: order.get(name, len(order)))
    return names


def measure(args: argparse.Namespace) -> tuple[list, str, str | None]:
    from ..methods.spectral import check_settings, compute_metrics, default_cache_dir

    if args.max_aspect is not None and (args.max_aspect != args.max_aspect or args.max_aspect < 0):
        raise OpenTransError(f"--max-aspect must be >= 0 (0: keep every Linear layer), got {args.max_aspect}")
    check_settings(conv_norm=args.conv_norm, device=args.device)  # before building or reading anything
    source, arch, sha = load_target(args)
    metrics = compute_metrics(source, args.xmin, conv_norm=args.conv_norm,
                              max_aspect=args.max_aspect if args.max_aspect and args.max_aspect > 0 else None,
                              device=args.device, cache=not args.no_cache,
                              cache_dir=None if args.no_cache else default_cache_dir(), progress=True)
    if not metrics:
        raise OpenTransError("no Conv/Linear weight found to measure", path=args.target)
    return metrics, arch, sha


def build_selection(args: argparse.Namespace, metrics: list, arch: str, sha: str | None):
    from ..methods.select import select_layers
    from ..methods.spectral import metrics_settings
    from ..version import __version__

    provenance = {"method": "spectral", "library_version": __version__,
                  "settings": metrics_settings(args.xmin, args.conv_norm, args.max_aspect or None),
                  "source": os.path.basename(args.target) if Path(args.target).is_file() else args.target}
    return select_layers(metrics, args.policy, arch=arch, weights_sha256=sha, provenance=provenance,
                         fraction=args.fraction, count=args.count, max_params=args.max_params,
                         lr_range=getattr(args, "lr_range", None))


def run(args: argparse.Namespace) -> int:
    from ..methods.plots import plot_alpha

    if args.plot:
        from ..methods.plots import check_plot_path

        check_plot_path(args.plot)
        check_out(args, args.plot, args.target, args.weights)
    metrics, arch, sha = measure(args)
    selection = build_selection(args, metrics, arch, sha) if args.policy else None
    rows = selection.layers if selection is not None else [m.to_dict() for m in metrics]
    if args.plot:
        plot_alpha(selection if selection is not None else metrics, args.plot,
                   title=f"{arch}: alpha per layer (x_min {args.xmin})")
    if args.json:
        keys = ("name", "param", "kind", "shape", "alpha", "D", "num_eigs", "xmin", "spectral_norm", "stable_rank",
                "num_params", "trainable", "lr_scale")
        out: dict[str, Any] = {"arch": arch, "weights_sha256": sha, "xmin": args.xmin,
                               "layers": [{k: r[k] for k in keys if k in r} for r in rows]}
        if selection is not None:
            out.update({"policy": selection.policy, "selection_sha256": selection.sha256,
                        "trainable": len(selection.trainable), "frozen": len(selection.frozen)})
        if args.plot:
            out["plot"] = args.plot
        print_json(out)
        return 0
    print(f"{arch}: {len(metrics)} layers, x_min method {args.xmin}")
    scaled = selection is not None and "lr_range" in selection.policy
    headers = (["layer", "alpha", "D", "eigs", "stable rank"] + (["train"] if selection is not None else [])
               + (["lr scale"] if scaled else []))
    table_rows = []
    for r in rows:
        alpha = "-" if r.get("alpha") is None else f"{r['alpha']:.3f}"
        dist = "-" if r.get("D") is None else f"{r['D']:.4f}"
        stable = "-" if r.get("stable_rank") is None else f"{r['stable_rank']:.1f}"
        row = [r["name"], alpha, dist, r["num_eigs"], stable]
        if selection is not None:
            row.append("yes" if r["trainable"] else "frozen")
        if scaled:
            row.append(f"{r.get('lr_scale', 1.0):.3f}")
        table_rows.append(row)
    print(table(table_rows, headers))
    if selection is not None:
        print(f"policy {selection.policy}: {len(selection.trainable)} trainable, {len(selection.frozen)} frozen")
    if args.plot:
        print(f"plot written to {args.plot}")
    return 0
