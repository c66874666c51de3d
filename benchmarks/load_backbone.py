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

import sys
import tempfile
from pathlib import Path

import _bench
import torch


def main() -> int:
    parser = _bench.options(__doc__, repeats=7, quick="3 repeats", threads=1,
                            threads_help="torch threads (default 1: on a shared 2-core machine every OpenMP region "
                                         "otherwise waits for a descheduled worker, ~30 ms per small op; 0 = "
                                         "torch's default)")
    args = _bench.parse(parser, repeats=3)
    repeats = args.repeats
    _bench.set_threads(args.threads)

    from safetensors.torch import save_file

    from opentrans_hub.sparsity.masks import bake
    from opentrans_hub.towers.backbones import build_visual
    from opentrans_hub.transfer.apply import apply_subnetwork
    from opentrans_hub.transfer.backbone import load_backbone
    from opentrans_hub.zoo.registry import Registry

    with tempfile.TemporaryDirectory(prefix="oth-bench-") as tmp:
        tmp = Path(tmp)
        tower = _bench.rn50_tower()
        weights = tmp / "rn50.safetensors"
        save_file(tower.state_dict(), str(weights))
        sub = _bench.imp_subnetwork(tower)
        registry = Registry(tmp / "registry", index_dir=tmp / "no-index")
        entry = registry.add(sub, "bench-rn50")
        del tower
        print(f"subnetwork: {len(sub)} tensors, {sub.sparsity:.2%} sparse, {entry.path.stat().st_size:,} bytes",
              file=sys.stderr)

        times = _bench.Timings("plain", "with", "decode", "apply")
        for i in range(repeats):
            for which in _bench.order(["plain", "with"], i):
                if which == "plain":
                    with times.time("plain"):
                        build_visual("open_clip/RN50", weights)
                else:
                    with times.time("with"):
                        model = load_backbone("RN50", pretrained=weights, subnetwork="bench-rn50", registry=registry)
                    assert model.opentrans_subnetwork["sha256"] == sub.sha256
            # the subnetwork's own steps, on a tower built outside the timer
            model = build_visual("open_clip/RN50", weights)
            with times.time("decode"):
                loaded = registry.get_subnetwork("bench-rn50")
            with times.time("apply"):
                apply_subnetwork(model, loaded, strict=True)
                bake(model)
            print(f"repeat {i + 1}/{repeats}: plain {times.last('plain'):.3f}s with {times.last('with'):.3f}s "
                  f"decode+verify {times.last('decode'):.3f}s apply+bake {times.last('apply'):.3f}s", file=sys.stderr)

    plain, with_sub, decode, apply = (times.wall[k] for k in ("plain", "with", "decode", "apply"))
    paired = [w - p for w, p in zip(with_sub, plain)]
    med = _bench.median
    _bench.emit({
        "benchmark": "load_backbone", "arch": "open_clip/RN50", "repeats": repeats,
        "torch_threads": torch.get_num_threads(),
        "plain_s": round(med(plain), 4),
        "with_subnetwork_s": round(med(with_sub), 4),
        "apply_overhead_s": round(med(paired), 4),
        "decode_verify_s": round(med(decode), 4),
        "apply_bake_s": round(med(apply), 4),
        "subnetwork_steps_s": round(med(d + a for d, a in zip(decode, apply)), 4),
        "overhead_ratio": round(med(with_sub) / med(plain), 3),
        "target_apply_overhead_s": 0.3,
    }, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
