"""A checkpoint of very many small tensors: ``map``, ``pack``, ``inspect`` and ``unpack`` vs torch.load + safetensors.

Fixture (``--tensors``, default 200,000; ``--quick``: 20,000): one ``torch.save`` file ``{"model": ..., "iteration":
..., "trainer": {...}}`` whose ``model`` holds an open_clip RN50 visual tower under ``backbone.clip_model.visual.``
(random init, every conv weight but the first with 89 % of its entries set to zero by magnitude) and, filling up to
the count, a head of small blocks: ``norm.weight``/``norm.bias`` (16), ``proj.weight`` (16x16, 3/4 zeros) and
``proj.bias`` (16). ``pack --zeros`` therefore masks every pruned conv and one small weight in four.

Peers, in one process, interleaved per repeat (medians reported):

* baseline: ``torch.load(weights_only=True)`` of the file plus ``safetensors.torch.save_file`` of its ``model``
  dict (what any tool that reads this checkpoint and writes it back pays); ``baseline_gc_paused``: the same with
  Python's cyclic GC paused, as our commands run their bulk work (:mod:`opentrans_hub.io.gcpause`), to show how much
  of the difference that alone makes;
* each command through the CLI's own entry point (``opentrans_hub.cli.main``, output captured, exit code checked):
  ``map CKPT --arch open_clip/RN50 --json``, ``pack CKPT --zeros --out P``, ``inspect P --json``,
  ``unpack P --out CKPT2.pth``. Imports are paid once before timing (a warm-up on a small file).

Ratios are each command's median over the baseline's; the target is at most 1.5. Sharing, once: the fixture's
tower saved twice in one file (``model`` and an ``ema`` copy holding the same tensor objects, as a trainer that
keeps tied weights does): its file, packed and unpacked sizes (``tied_*_bytes``), each storage stored once. The
last line of stdout is one JSON object.

    python benchmarks/many_tensors.py [--quick] [--tensors N] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

TARGET_RATIO = 1.5


def build_checkpoint(count: int) -> dict:
    """The fixture: an RN50 tower with pruned convs and small head blocks, ``count`` tensors in all."""
    from opentrans_hub.towers.backbones import build_visual

    torch.manual_seed(0)
    tower = build_visual("open_clip/RN50")
    state = {}
    for name, tensor in tower.state_dict().items():
        tensor = tensor.detach().clone()
        if tensor.dim() == 4 and name != "conv1.weight":
            cut = tensor.abs().reshape(-1).kthvalue(int(0.89 * tensor.numel())).values
            tensor[tensor.abs() <= cut] = 0
        state[f"backbone.clip_model.visual.{name}"] = tensor
    gen = torch.Generator().manual_seed(1)
    block = 0
    while len(state) < count:
        weight = torch.randn(16, 16, generator=gen)
        weight[weight.abs() < 1.15] = 0  # about 3/4 zeros
        parts = {"norm.weight": torch.ones(16), "norm.bias": torch.zeros(16), "proj.weight": weight,
                 "proj.bias": torch.randn(16, generator=gen)}
        for leaf, tensor in parts.items():
            if len(state) < count:
                state[f"sem_seg_head.blocks.{block}.{leaf}"] = tensor
        block += 1
    return {"model": state, "iteration": 90000, "trainer": {"lr": 1e-4, "milestones": [60000, 80000]}}


def baseline(src: Path, out: Path) -> None:
    """torch.load the checkpoint and write its tensor dict with safetensors."""
    from safetensors.torch import save_file

    obj = torch.load(src, map_location="cpu", weights_only=True)
    save_file(obj["model"], str(out))


def baseline_gc_paused(src: Path, out: Path) -> None:
    from opentrans_hub.io.gcpause import gc_paused

    with gc_paused():
        baseline(src, out)


def tied_sizes(tmp: Path) -> dict[str, int]:
    """File, packed and unpacked bytes of a checkpoint holding every tensor of a pruned tower under two names."""
    from opentrans_hub.zoo.packing import pack_checkpoint, unpack

    state = {k: v for k, v in build_checkpoint(0)["model"].items()}
    src = tmp / "tied.pth"
    torch.save({"model": state, "ema": dict(state)}, src)  # the same tensor objects under both
    pack_checkpoint(src, tmp / "tied.sparse.safetensors", zeros=True)
    unpack(tmp / "tied.sparse.safetensors", tmp / "tied.dense.pth")
    return {"tied_source_bytes": src.stat().st_size,
            "tied_packed_bytes": (tmp / "tied.sparse.safetensors").stat().st_size,
            "tied_unpacked_bytes": (tmp / "tied.dense.pth").stat().st_size}


def command(argv: list[str]) -> str:
    """Run one CLI command in this process; its stdout, or SystemExit when it fails."""
    from opentrans_hub.cli import main

    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        code = main(argv)
    if code != 0:
        raise SystemExit(f"opentrans-hub {' '.join(argv)} exited {code}")
    return captured.getvalue()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="20,000 tensors, 3 repeats (a smoke run)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0 = torch's default)")
    args = parser.parse_args()
    count, repeats = (20_000, 3) if args.quick else (args.tensors, args.repeats)
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="oth-bench-many-") as tmp:
        tmp = Path(tmp)
        os.environ.update({"OPENTRANS_HUB_HOME": str(tmp / "home"), "OPENTRANS_HUB_CACHE": str(tmp / "cache")})
        src = tmp / "model_final.pth"
        started = time.perf_counter()
        torch.save(build_checkpoint(count), src)
        print(f"fixture: {count:,} tensors, {src.stat().st_size / 2**20:.1f} MB, "
              f"{time.perf_counter() - started:.1f}s", file=sys.stderr)
        warm = tmp / "warm.pth"
        torch.save(build_checkpoint(400), warm)  # imports and first-use costs, paid once before timing
        warm_packed = tmp / "warm.sparse.safetensors"
        command(["map", str(warm), "--arch", "open_clip/RN50", "--json"])
        command(["pack", str(warm), "--zeros", "--out", str(warm_packed)])
        command(["inspect", str(warm_packed), "--json"])
        command(["unpack", str(warm_packed), "--out", str(tmp / "warm.dense.pth")])

        packed, dense = tmp / "model_final.sparse.safetensors", tmp / "model_final.dense.pth"
        steps = {
            "baseline": lambda: baseline(src, tmp / "baseline.safetensors"),
            "baseline_gc_paused": lambda: baseline_gc_paused(src, tmp / "baseline.safetensors"),
            "map": lambda: command(["map", str(src), "--arch", "open_clip/RN50", "--json"]),
            "pack": lambda: command(["pack", str(src), "--zeros", "--out", str(packed), "--overwrite"]),
            "inspect": lambda: command(["inspect", str(packed), "--json"]),
            "unpack": lambda: command(["unpack", str(packed), "--out", str(dense), "--overwrite"]),
        }
        times: dict[str, list[float]] = {name: [] for name in steps}
        for i in range(repeats):
            order = list(steps) if i % 2 == 0 else list(steps)[::-1]  # drifting load hits every peer alike
            for name in order:
                times[name].append(timed(steps[name]))
            print(f"repeat {i + 1}/{repeats}: " + " ".join(f"{n} {times[n][-1]:.2f}s" for n in steps),
                  file=sys.stderr)

        original = torch.load(src, weights_only=True)["model"]
        again = torch.load(dense, weights_only=True)["model"]
        identical = list(original) == list(again) and all(
            torch.equal(a.view(-1).view(torch.uint8), again[k].view(-1).view(torch.uint8))
            for k, a in original.items())
        info = json.loads(command(["inspect", str(packed), "--json"]))
        source_bytes, packed_bytes = src.stat().st_size, packed.stat().st_size
        tied = tied_sizes(tmp)

    med = {name: statistics.median(values) for name, values in times.items()}
    ratios = {name: round(med[name] / med["baseline"], 3) for name in steps if not name.startswith("baseline")}
    result = {
        "benchmark": "many_tensors", "tensors": count, "masked_tensors": info["masked_tensors"], "repeats": repeats,
        "torch_threads": torch.get_num_threads(), "source_bytes": source_bytes, "packed_bytes": packed_bytes,
        "bit_identical": identical, **{f"{name}_s": round(value, 3) for name, value in med.items()},
        **{f"{name}_ratio": value for name, value in ratios.items()},
        "worst_ratio": max(ratios.values()), "target_ratio": TARGET_RATIO, **tied,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
