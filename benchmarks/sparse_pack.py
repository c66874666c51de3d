"""Packed sparse checkpoints of a pruned RN50 tower: bytes on disk and seconds, vs dense files and torch CSR.

Fixture: the open_clip RN50 visual tower, random init, pruned to 89 % by global magnitude over every Conv2d
weight except the first conv (21 rounds at 10 %), zeros in place. Two inputs:
  tower      the tower's state dict as a dense safetensors file;
  framework  the same tower inside a framework checkpoint (.pth: ``model`` with the tower under
             ``backbone.clip_model.visual.``, a small decoder, ``iteration``).
Measured (medians over repeats, peers interleaved in one process):
  bytes      dense file vs packed (fp32 values, and ``dtype=bf16``); the conv part alone (masked tensors:
             dense bytes vs bits + kept values); torch CSR (``to_sparse_csr`` of each conv weight as a matrix:
             int64 row pointers and column indices + values) for the same tensors;
  seconds    pack and unpack of the tower file; load-to-model: ``load_backbone(pretrained=packed)`` (read,
             verify, decode, load, masks re-applied) vs ``build_visual(dense file)``, and the read alone
             (``load_sparse`` vs safetensors ``load_file``).
  memory     peak anonymous memory held beyond the start of a pack and of an unpack (streaming: about one
             dense tensor and its parts, not the whole checkpoint; the input and output files are mapped).
Last line of stdout: one JSON object (dense_bytes, packed_bytes, ratio, conv_ratio, pack_s, unpack_s,
load_ratio, ... and the targets conv_ratio <= 0.16, load_ratio <= 1.3).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import _bench
import torch

_MEMORY_PROBE = r"""
import ctypes, gc, sys, threading, time
import torch
torch.set_num_threads(1)
from opentrans_hub import Subnetwork
from opentrans_hub.zoo.packing import pack_checkpoint, unpack

def anon():
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) / 1024 for line in handle if line.startswith("RssAnon:"))

ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: freed tensors go back to the system
what, src, out = sys.argv[1:4]
sub = Subnetwork.load(sys.argv[4]) if what == "pack" else None
gc.collect()
base, peak, done = anon(), [0.0], threading.Event()

def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anon())
        time.sleep(0.002)

thread = threading.Thread(target=sample, daemon=True)
thread.start()
pack_checkpoint(src, out, subnetwork=sub) if what == "pack" else unpack(src, out)
done.set()
thread.join()
print(round(max(peak[0] - base, 0.0), 1))
"""


def _peak_anon_mb(*args: str) -> float | None:
    """Peak anonymous memory (MB) a fresh process holds beyond its start while it packs or unpacks (Linux;
    None elsewhere). The input and output files are memory-mapped, so this is what streaming keeps in RAM."""
    import subprocess

    if not Path("/proc/self/status").exists():
        return None
    done = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, *args], capture_output=True, text=True, timeout=600)
    return float(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None


def _csr_bytes(tensors: dict[str, torch.Tensor]) -> int:
    import warnings

    total = 0
    for tensor in tensors.values():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
            csr = tensor.reshape(tensor.shape[0], -1).to_sparse_csr()
        total += sum(t.numel() * t.element_size() for t in (csr.crow_indices(), csr.col_indices(), csr.values()))
    return total


def main() -> int:
    parser = _bench.options(__doc__, repeats=5, quick="3 repeats", threads=1,
                            threads_help="torch threads (default 1; 0 = torch's default)")
    args = _bench.parse(parser, repeats=3)
    repeats = args.repeats
    _bench.set_threads(args.threads)

    from safetensors.torch import load_file, save_file

    from opentrans_hub.formats.packed import open_packed
    from opentrans_hub.towers.backbones import build_visual
    from opentrans_hub.transfer.backbone import load_backbone
    from opentrans_hub.zoo.packing import load_sparse, pack_checkpoint, packed_stats, unpack

    with tempfile.TemporaryDirectory(prefix="oth-bench-pack-") as tmp:
        tmp = Path(tmp)
        tower = _bench.rn50_tower()
        sub = _bench.imp_subnetwork(tower)
        params = dict(tower.named_parameters())
        with torch.no_grad():
            for name, keep in sub.masks.items():
                params[name].masked_fill_(~keep, 0)
        state = {k: v.detach().clone() for k, v in tower.state_dict().items()}
        del tower
        dense_file = tmp / "rn50.safetensors"
        save_file(state, str(dense_file))
        gen = torch.Generator().manual_seed(1)
        decoder = {f"sem_seg_head.layer{i}.weight": torch.randn(256, 256, 3, 3, generator=gen) for i in range(4)}
        framework = {"model": {**{f"backbone.clip_model.visual.{k}": v for k, v in state.items()}, **decoder},
                     "iteration": 90000, "trainer": {"lr": 1e-4, "milestones": [60000, 80000]}}
        framework_file = tmp / "model_final.pth"
        torch.save(framework, framework_file)
        print(f"subnetwork: {len(sub)} conv tensors, {sub.sparsity:.2%} sparse", file=sys.stderr)

        packed = tmp / "rn50.sparse.safetensors"
        packed_bf16 = tmp / "rn50.bf16.sparse.safetensors"
        packed_framework = tmp / "model_final.sparse.safetensors"
        pack_checkpoint(dense_file, packed_bf16, subnetwork=sub, dtype="bf16")
        pack_checkpoint(framework_file, packed_framework, subnetwork=sub)

        times = _bench.Timings("pack", "unpack", "load_dense", "load_packed", "read_dense", "read_packed")
        for i in range(repeats):
            with times.time("pack"):
                pack_checkpoint(dense_file, packed, subnetwork=sub)
            with times.time("unpack"):
                unpack(packed, tmp / "again.safetensors")
            for which in _bench.order(["dense", "packed"], i):
                if which == "dense":
                    with times.time("load_dense"):
                        build_visual("open_clip/RN50", dense_file)
                    with times.time("read_dense"):
                        load_file(str(dense_file))
                else:
                    with times.time("load_packed"):
                        load_backbone("open_clip/RN50", pretrained=packed)
                    with times.time("read_packed"):
                        load_sparse(packed)
            last = {k: v[-1] for k, v in times.wall.items()}
            print(f"repeat {i + 1}/{repeats}: pack {last['pack']:.3f}s unpack {last['unpack']:.3f}s load dense "
                  f"{last['load_dense']:.3f}s packed {last['load_packed']:.3f}s; read dense {last['read_dense']:.3f}s "
                  f"packed {last['read_packed']:.3f}s", file=sys.stderr)

        sub.save(tmp / "mask.safetensors")
        pack_mem = _peak_anon_mb("pack", str(dense_file), str(tmp / "probe.sparse.safetensors"),
                                 str(tmp / "mask.safetensors"))
        unpack_mem = _peak_anon_mb("unpack", str(packed), str(tmp / "probe.safetensors"))
        largest = max(v.numel() * v.element_size() for v in state.values()) / 2**20
        identical = all(torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))
                        for a, b in ((state[k], v) for k, v in load_file(str(tmp / "again.safetensors")).items()))
        stats = packed_stats(open_packed(packed))
        stats_bf16 = packed_stats(open_packed(packed_bf16))
        stats_fw = packed_stats(open_packed(packed_framework))
        csr = _csr_bytes({name: state[name] for name in sub.masks})
        dense_bytes = dense_file.stat().st_size
        framework_bytes = framework_file.stat().st_size

    med = times.medians()
    result = {
        "benchmark": "sparse_pack", "arch": "open_clip/RN50", "repeats": repeats,
        "torch_threads": torch.get_num_threads(),
        "sparsity": round(sub.sparsity, 4), "conv_tensors": len(sub), "bit_identical": identical,
        "dense_bytes": dense_bytes, "packed_bytes": stats["file_bytes"],
        "ratio": round(stats["file_bytes"] / dense_bytes, 4),
        "conv_dense_bytes": stats["masked_dense_bytes"], "conv_packed_bytes": stats["masked_packed_bytes"],
        "conv_ratio": round(stats["masked_packed_bytes"] / stats["masked_dense_bytes"], 4),
        "bf16_packed_bytes": stats_bf16["file_bytes"], "bf16_ratio": round(stats_bf16["file_bytes"] / dense_bytes, 4),
        "bf16_conv_ratio": round(stats_bf16["masked_packed_bytes"] / stats_bf16["masked_dense_bytes"], 4),
        "csr_conv_bytes": csr, "csr_conv_ratio": round(csr / stats["masked_dense_bytes"], 4),
        "framework_dense_bytes": framework_bytes, "framework_packed_bytes": stats_fw["file_bytes"],
        "framework_ratio": round(stats_fw["file_bytes"] / framework_bytes, 4),
        "pack_s": round(med["pack"], 3), "unpack_s": round(med["unpack"], 3),
        "load_dense_s": round(med["load_dense"], 3), "load_packed_s": round(med["load_packed"], 3),
        "load_ratio": round(med["load_packed"] / med["load_dense"], 3),
        "read_dense_s": round(med["read_dense"], 3), "read_packed_s": round(med["read_packed"], 3),
        "read_ratio": round(med["read_packed"] / med["read_dense"], 3),
        "pack_peak_extra_mb": pack_mem, "unpack_peak_extra_mb": unpack_mem,
        "largest_tensor_mb": round(largest, 1), "dense_mb": round(dense_bytes / 2**20, 1),
        "target_conv_ratio": 0.16, "target_load_ratio": 1.3,
    }
    _bench.emit(result, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
