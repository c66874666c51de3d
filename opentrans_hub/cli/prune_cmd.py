"""``opentrans-hub prune --arch open_clip/RN50 --sparsity 0.89 --out rn50.safetensors``: one-shot magnitude pruning.

``--rounds R --rate r`` runs the compounding schedule (``1 - (1 - r)^R``) round by round without retraining;
every round is nested in the one before. Weights come from an open_clip tag or a local file
(``--pretrained``), or a seeded random init; their sha256 goes into the subnetwork's provenance.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import OpenTransError, OpenTransWarning
from ._common import add_overwrite, check_out, print_json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("prune", help="magnitude-prune a CLIP image encoder into a subnetwork file")
    parser.add_argument("--arch", required=True, help="architecture id, e.g. open_clip/RN50")
    parser.add_argument("--pretrained", default=None, help="open_clip tag (e.g. openai) or a local weights file "
                        "(.safetensors/.pt/.pth/.bin); default: random init with --seed")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random init (without --pretrained)")
    amount = parser.add_mutually_exclusive_group(required=True)
    amount.add_argument("--sparsity", type=float, help="fraction of the scope to prune in one shot, e.g. 0.89")
    amount.add_argument("--rounds", type=int, help="number of compounding rounds (with --rate)")
    parser.add_argument("--rate", type=float, default=0.1, help="fraction of live weights pruned per round")
    parser.add_argument("--out", required=True, help="subnetwork file to write (.safetensors)")
    parser.add_argument("--linear", action="store_true", help="also prune Linear weights (ViT / ConvNeXt towers)")
    parser.add_argument("--no-conv", action="store_true", help="do not prune Conv2d weights (with --linear)")
    parser.add_argument("--prune-first", action="store_true", help="prune the first conv too (default: left dense)")
    parser.add_argument("--include", default=None, help="regex: only canonical names matching it")
    parser.add_argument("--exclude", default=None, help="regex: leave canonical names matching it dense")
    parser.add_argument("--layerwise", action="store_true", help="rank per layer instead of globally")
    parser.add_argument("--min-density", type=float, default=0.0,
                        help="keep at least this fraction of every layer (global pruning cannot empty a layer)")
    parser.add_argument("--device", default="cpu", help="where to rank the weights (cpu, cuda)")
    parser.add_argument("--encoding", choices=["packbits", "zstd"], default="packbits")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_overwrite(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from ..methods.imp import PruneScope, imp_sparsity, magnitude_prune
    from ..towers.backbones import build_visual, weights_sha256

    check_out(args, args.out, args.pretrained)
    if args.rounds is not None and args.rounds < 1:
        raise OpenTransError(f"--rounds must be >= 1, got {args.rounds}")
    if args.rounds is not None and not 0.0 < args.rate < 1.0:
        raise OpenTransError(f"--rate must lie in (0, 1), got {args.rate}")
    if args.sparsity is not None and not 0.0 <= args.sparsity <= 1.0:
        raise OpenTransError(f"--sparsity must lie in [0, 1], got {args.sparsity}")
    types = (() if args.no_conv else ("conv",)) + (("linear",) if args.linear else ())
    if not types:
        raise OpenTransError("--no-conv leaves nothing to prune: add --linear")
    scope = PruneScope(layer_types=types, exclude_first=not args.prune_first, include=args.include,
                       exclude=args.exclude, ranking="layerwise" if args.layerwise else "global",
                       min_density=args.min_density)
    rounds = args.rounds or 1
    bar = tqdm(total=rounds + 1, desc="prune", unit="step", file=sys.stderr, disable=None)
    bar.set_postfix_str("building tower")
    if args.pretrained is None:
        torch.manual_seed(args.seed)
    visual = build_visual(args.arch, pretrained=args.pretrained)
    base_sha = weights_sha256(visual)
    visual = visual.to(args.device)
    bar.update(1)
    source = {"arch": args.arch, "pretrained": args.pretrained,
              "seed": args.seed if args.pretrained is None else None, "base_weights_sha256": base_sha}
    sub = None
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", OpenTransWarning)  # emptied layers: said once, after the summary line
        for k in range(1, rounds + 1):
            target = args.sparsity if args.rounds is None else imp_sparsity(args.rate, k)
            bar.set_postfix_str(f"round {k}/{rounds}" if args.rounds else "ranking")
            sub = magnitude_prune(visual, sparsity=target, scope=scope, arch=args.arch, provenance=source)
            bar.update(1)
    bar.close()
    if args.rounds is not None:
        sub.provenance["method"] = "imp-oneshot"
        sub.provenance["settings"] = {"rate": args.rate, "rounds": args.rounds, "retraining": False,
                                      "scope": scope.to_dict()}
    sub.save(args.out, encoding=args.encoding)
    empty = [layer.name for layer in sub.layers() if layer.kept == 0]
    summary = {"out": args.out, "arch": sub.arch, "sha256": sub.sha256, "layers": len(sub), "sparsity": sub.sparsity,
               "kept_params": sub.kept, "total_params": sub.numel, "empty_layers": len(empty),
               "base_weights_sha256": base_sha, "encoding": args.encoding}
    if args.json:
        print_json(summary)
    else:
        print(f"wrote {args.out}: {len(sub)} layers, sparsity {sub.sparsity:.2%} ({sub.kept:,} of {sub.numel:,} "
              f"kept), sha256 {sub.sha256[:16]}")
        if empty:
            print(f"warning: {len(empty)} layer(s) pruned away entirely (e.g. {empty[0]}); consider --min-density",
                  file=sys.stderr)
    return 0
