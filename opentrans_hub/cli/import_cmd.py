"""``opentrans-hub import CHECKPOINT --out PATH``: masks from research-code checkpoints."""

from __future__ import annotations

import argparse

from ._common import add_overwrite, check_out, print_json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("import", help="build a subnetwork from a torch.prune/OpenTrans checkpoint")
    parser.add_argument("checkpoint", help=".pth (loaded weights_only) or .safetensors")
    parser.add_argument("--out", required=True, help="subnetwork file to write (.safetensors)")
    parser.add_argument("--arch", default="unknown", help="architecture id, e.g. open_clip/RN50")
    parser.add_argument("--prefix", default="", help="take only the masks under this prefix and strip it to reach "
                        "canonical names, e.g. backbone.clip_model.visual. (DDP's module. is always stripped)")
    parser.add_argument("--from-zeros", action="store_true", help="the checkpoint is baked: masks = weight != 0")
    parser.add_argument("--include", default=None, help="with --from-zeros: regex of tensor names to take")
    parser.add_argument("--encoding", choices=["packbits", "zstd"], default="packbits")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_overwrite(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..io.checkpoints import read_state_dict
    from ..methods.importers import from_zeros, import_pruned_checkpoint

    check_out(args, args.out, args.checkpoint)
    if args.from_zeros:
        sub = from_zeros(read_state_dict(args.checkpoint), arch=args.arch, include=args.include, prefix=args.prefix)
    else:
        sub = import_pruned_checkpoint(args.checkpoint, arch=args.arch, prefix=args.prefix)
    sub.save(args.out, encoding=args.encoding)
    summary = {"out": args.out, "arch": sub.arch, "sha256": sub.sha256, "layers": len(sub), "sparsity": sub.sparsity}
    if args.json:
        print_json(summary)
    else:
        print(f"wrote {args.out}: {len(sub)} layers, sparsity {sub.sparsity:.2%}, sha256 {sub.sha256[:16]}")
    return 0
