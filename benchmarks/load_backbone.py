"""Time to load the RN50 visual tower from a local weights file, with and without a registry subnetwork.

Peers, interleaved in one process and repeated:
  plain           build_visual("open_clip/RN50", weights_file)
  with_subnetwork load_backbone("RN50", pretrained=weights_file, subnetwork=NAME): the same build, then the
                  registry entry is read, its file sha256 and content sha256 verified, the bits decoded,
                  the masks applied (shape-checked, all-or-nothing) and baked.
The subnetwork's own steps are timed too (decode + verify, apply + bake). Weights are random (no downloads
here); the mask is an 89 % global-magnitude subnetwork of them (21 rounds at 10 %), a test fixture.

Last line of stdout: one JSON object with plain_s, with_subnetwork_s, apply_overhead_s (medians; the
overhead is the median of paired differences) and the component medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="3 repeats")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-core machine every OpenMP region otherwise "
                             "waits for a descheduled worker, ~30 ms per small op; 0 = torch's default)")
    args = parser.parse_args()
    repeats = 3 if args.quick else args.repeats
    if args.threads:
        torch.set_num_threads(args.threads)

    from safetensors.torch import save_file

    from opentrans_hub.formats.subnetwork import Subnetwork, default_provenance
    from opentrans_hub.methods.imp import PruneScope, magnitude_masks
    from opentrans_hub.sparsity.masks import bake
    from opentrans_hub.towers.backbones import build_visual
    from opentrans_hub.transfer.apply import apply_subnetwork
    from opentrans_hub.transfer.backbone import load_backbone
    from opentrans_hub.zoo.registry import Registry

    with tempfile.TemporaryDirectory(prefix="oth-bench-") as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        tower = build_visual("open_clip/RN50")
        weights = tmp / "rn50.safetensors"
        save_file(tower.state_dict(), str(weights))
        selected = PruneScope().select(tower)
        tensors = {name: param.detach() for name, (_, param) in selected.items()}
        masks = None
        for _ in range(21):
            masks = magnitude_masks(tensors, masks, rate=0.1)
        sub = Subnetwork(masks, arch="open_clip/RN50", provenance=default_provenance("benchmark-fixture"))
        registry = Registry(tmp / "registry", index_dir=tmp / "no-index")
        entry = registry.add(sub, "bench-rn50")
        del tower
        print(f"subnetwork: {len(sub)} tensors, {sub.sparsity:.2%} sparse, {entry.path.stat().st_size:,} bytes",
              file=sys.stderr)

        plain, with_sub, decode, apply = [], [], [], []
        for i in range(repeats):
            order = ("plain", "with") if i % 2 == 0 else ("with", "plain")
            for which in order:
                t0 = time.perf_counter()
                if which == "plain":
                    build_visual("open_clip/RN50", weights)
                    plain.append(time.perf_counter() - t0)
                else:
                    model = load_backbone("RN50", pretrained=weights, subnetwork="bench-rn50", registry=registry)
                    with_sub.append(time.perf_counter() - t0)
                    assert model.opentrans_subnetwork["sha256"] == sub.sha256
            # the subnetwork's own steps, on a tower built outside the timer
            model = build_visual("open_clip/RN50", weights)
            t0 = time.perf_counter()
            loaded = registry.get_subnetwork("bench-rn50")
            t1 = time.perf_counter()
            apply_subnetwork(model, loaded, strict=True)
            bake(model)
            t2 = time.perf_counter()
            decode.append(t1 - t0)
            apply.append(t2 - t1)
            print(f"repeat {i + 1}/{repeats}: plain {plain[-1]:.3f}s with {with_sub[-1]:.3f}s "
                  f"decode+verify {decode[-1]:.3f}s apply+bake {apply[-1]:.3f}s", file=sys.stderr)

    paired = [w - p for w, p in zip(with_sub, plain)]
    result = {
        "benchmark": "load_backbone", "arch": "open_clip/RN50", "repeats": repeats,
        "torch_threads": torch.get_num_threads(),
        "plain_s": round(statistics.median(plain), 4),
        "with_subnetwork_s": round(statistics.median(with_sub), 4),
        "apply_overhead_s": round(statistics.median(paired), 4),
        "decode_verify_s": round(statistics.median(decode), 4),
        "apply_bake_s": round(statistics.median(apply), 4),
        "subnetwork_steps_s": round(statistics.median(d + a for d, a in zip(decode, apply)), 4),
        "overhead_ratio": round(statistics.median(with_sub) / statistics.median(plain), 3),
        "target_apply_overhead_s": 0.3,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
