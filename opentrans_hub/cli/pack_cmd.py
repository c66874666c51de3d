"""``opentrans-hub pack CKPT (--subnetwork REF | --zeros) --out FILE`` and ``unpack FILE --out CKPT``.

Pack writes a pruned checkpoint as a compact sparse file (mask bits + kept values); unpack gives the dense
checkpoint back bit-identical, after checking both hashes, and refuses a file that would decode to more than the
decode limit (``--max-bytes``). Neither ever writes over its input.
"""

from __future__ import annotations

import argparse

from ._common import add_max_bytes, add_overwrite, check_out, print_json


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("pack", help="write a pruned checkpoint as a compact sparse file (bits + kept values)")
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint file (.pth/.pt/.safetensors, weights-only)")
    masks = p.add_mutually_exclusive_group(required=True)
    masks.add_argument("--subnetwork", metavar="REF", help="registry name, hf:// reference or file of the masks")
    masks.add_argument("--zeros", action="store_true", help="infer the masks from the weights' exact zeros")
    p.add_argument("--out", required=True, metavar="FILE", help="packed file to write (.safetensors)")
    p.add_argument("--dtype", choices=["bf16", "fp16"], help="cast the kept values (recorded; lossy)")
    p.add_argument("--force-zero", action="store_true", help="zero pruned positions that are not zero yet")
    p.add_argument("--encoding", choices=["packbits", "zstd"], default="packbits", help="mask bits encoding")
    p.add_argument("--prefix", help="where the tower sits in the checkpoint's state dict (default: detected)")
    p.add_argument("--include", metavar="REGEX", help="with --zeros: only tensors whose name matches")
    p.add_argument("--arch", help="architecture id to record (--zeros) or to require (--subnetwork)")
    add_overwrite(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_pack)

    p = subparsers.add_parser("unpack", help="write the dense checkpoint of a packed file (bit-identical)")
    p.add_argument("packed", metavar="FILE")
    p.add_argument("--out", required=True, metavar="CKPT", help=".pth (any checkpoint) or .safetensors (flat)")
    add_overwrite(p)
    add_max_bytes(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_unpack)


def run_pack(args: argparse.Namespace) -> int:
    from ..zoo.packing import pack_checkpoint

    check_out(args, args.out, args.checkpoint)
    info = pack_checkpoint(args.checkpoint, args.out, subnetwork=args.subnetwork, zeros=args.zeros, dtype=args.dtype,
                           force_zero=args.force_zero, encoding=args.encoding, prefix=args.prefix,
                           include=args.include, arch=args.arch)
    if args.json:
        print_json(info)
        return 0
    cast = f", values as {info['dtype']}" if info["dtype"] else ""
    print(f"wrote {info['out']}: {info['packed_bytes']:,} bytes for {info['dense_bytes']:,} dense "
          f"({info['ratio']:.1%}); {info['masked_tensors']} masked tensors, {info['sparsity']:.2%} sparse{cast}; "
          f"content sha256 {info['content_sha256'][:16]}, subnetwork {info['subnetwork_sha256'][:16]}")
    if info["forced_zero"]:
        print("note: --force-zero set pruned positions that were not zero to 0.0")
    return 0


def run_unpack(args: argparse.Namespace) -> int:
    from ..io.limits import decode_limit
    from ..zoo.packing import unpack

    check_out(args, args.out, args.packed)
    with decode_limit(args.max_bytes):
        info = unpack(args.packed, args.out)
    if args.json:
        print_json(info)
        return 0
    checked = f"content sha256 {info['content_sha256'][:16]}"
    if info["subnetwork_sha256"]:
        checked += f" and subnetwork sha256 {info['subnetwork_sha256'][:16]}"
    print(f"wrote {info['out']}: {info['bytes']:,} bytes, {info['tensors']} tensors "
          f"({info['masked_tensors']} unpacked from masks), {checked} verified")
    return 0
