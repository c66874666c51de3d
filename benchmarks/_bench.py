"""What the benchmarks share: common options, timing with medians, peak RSS, the RN50 fixtures, the JSON line.

Every benchmark takes ``--repeats N``, ``--quick`` (a smoke run of a minute or less: fewer repeats, sometimes a
smaller batch) and ``--json FILE`` (also write the result object to FILE); most take ``--threads``. Each prints
its progress on stderr (or stdout, before the end) and one JSON object on the last line of stdout, with
``peak_rss_mb`` (this process's peak resident set) added. Fixtures are random-init open_clip RN50 towers: no
downloads. Importing this module imports no torch (``cli_startup`` measures processes that must not).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

median = statistics.median


# ------------------------------------------------------------------------------------------------ options
def options(doc: str, repeats: int, quick: str, threads: int | None = None,
            threads_help: str = "torch threads (0 = torch's default)") -> argparse.ArgumentParser:
    """A parser with the common options; ``doc``'s first line is the description, ``quick`` says what
    ``--quick`` changes; ``threads`` (the default) adds ``--threads``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--quick", action="store_true", help=quick)
    if threads is not None:
        parser.add_argument("--threads", type=int, default=threads, help=threads_help)
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the result object to FILE")
    return parser


def step_options(parser: argparse.ArgumentParser, batch: int) -> argparse.ArgumentParser:
    """The options of a training-step benchmark: untimed ``--warmup`` steps, ``--batch``, mask ``--sparsity``."""
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--sparsity", type=float, default=0.89)
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str] | None = None, **quick) -> argparse.Namespace:
    """Parse; with ``--quick`` the given option values (``repeats=1``, ``batch=2``, ...) replace the others."""
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in quick.items():
            setattr(args, name, value)
    return args


def set_threads(threads: int | None) -> None:
    """Pin torch's intra-op threads (0 or None: leave torch's default)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------ timing
def timed(fn, *args, **kwargs) -> tuple[float, object]:
    """Wall seconds of one call, and its result."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def order(peers: list[str], repeat: int, rotate: bool = False) -> list[str]:
    """The peers' order in one repeat: reversed every other repeat, or (``rotate``) shifted by one each repeat, so
    no peer always runs first."""
    if rotate:
        shift = repeat % len(peers)
        return peers[shift:] + peers[:shift]
    return list(peers) if repeat % 2 == 0 else list(peers)[::-1]


class Timings:
    """Seconds per peer over the repeats: wall time and this process's CPU time (less sensitive to other load on
    a shared machine), with medians."""

    def __init__(self, *peers: str):
        self.wall: dict[str, list[float]] = {peer: [] for peer in peers}
        self.cpu: dict[str, list[float]] = {peer: [] for peer in peers}

    @contextmanager
    def time(self, peer: str):
        start, cpu = time.perf_counter(), time.process_time()
        yield
        self.add(peer, time.perf_counter() - start, time.process_time() - cpu)

    def add(self, peer: str, wall: float, cpu: float | None = None) -> None:
        self.wall.setdefault(peer, []).append(wall)
        if cpu is not None:
            self.cpu.setdefault(peer, []).append(cpu)

    def last(self, peer: str) -> float:
        return self.wall[peer][-1]

    def median(self, peer: str) -> float:
        return median(self.wall[peer])

    def medians(self) -> dict[str, float]:
        return {peer: median(values) for peer, values in self.wall.items() if values}

    def cpu_medians(self) -> dict[str, float]:
        return {peer: median(values) for peer, values in self.cpu.items() if values}

    def all_s(self, digits: int = 4) -> dict[str, list[float]]:
        """Every wall time, rounded: the spread behind the medians."""
        return {peer: [round(t, digits) for t in values] for peer, values in self.wall.items()}


# ------------------------------------------------------------------------------------------------ machine
def peak_rss_mb() -> float:
    """This process's peak resident set so far, in MiB (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


def host() -> dict:
    """The machine's load at the end of a run and its core count (figures from a shared machine vary)."""
    return {"load_avg_1m_end": round(os.getloadavg()[0], 2), "cpu_count": os.cpu_count()}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------------------------------ fixtures
def rn50_tower(seed: int = 0, image: int | None = None) -> nn.Module:
    """open_clip's RN50 visual tower, random init: through ``build_visual`` (224 px), or with ``image`` open_clip's
    ModifiedResNet at the RN50 shape (layers 3-4-6-3, width 64) for that input size (a smaller attnpool grid)."""
    import torch

    torch.manual_seed(seed)
    if image is None:
        from opentrans_hub.towers.backbones import build_visual

        return build_visual("open_clip/RN50")
    from open_clip.modified_resnet import ModifiedResNet

    return ModifiedResNet(layers=(3, 4, 6, 3), output_dim=1024, heads=32, image_size=image, width=64)


def imp_subnetwork(tower: nn.Module, rounds: int = 21, rate: float = 0.1):
    """The paper's IMP masks without the training: ``rounds`` global-magnitude rounds at ``rate`` over the default
    scope (every Conv2d weight but the first); 21 x 10 % leaves about 11 % of the weights."""
    from opentrans_hub.formats.subnetwork import Subnetwork, default_provenance
    from opentrans_hub.methods.imp import PruneScope, magnitude_masks

    tensors = {name: param.detach() for name, (_, param) in PruneScope().select(tower).items()}
    masks = None
    for _ in range(rounds):
        masks = magnitude_masks(tensors, masks, rate=rate)
    return Subnetwork(masks, arch="open_clip/RN50", provenance=default_provenance("benchmark-fixture"))


def layer_l1_masks(model: nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
    """Per-layer magnitude masks at ``sparsity`` over every Conv2d weight but the first."""
    from torch import nn

    masks = {}
    for name, conv in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)][1:]:
        scores = conv.weight.detach().abs().flatten()
        k = int(round(sparsity * scores.numel()))
        threshold = scores.kthvalue(k).values if k > 0 else scores.min() - 1
        masks[f"{name}.weight"] = conv.weight.detach().abs() > threshold
    return masks


# ------------------------------------------------------------------------------------------------ output
def emit(result: dict, args: argparse.Namespace | None = None) -> None:
    """Print ``result`` (plus ``peak_rss_mb`` unless it holds one) as one JSON object on the last line of stdout;
    with ``--json FILE`` write it there too."""
    result.setdefault("peak_rss_mb", peak_rss_mb())
    line = json.dumps(result)
    print(line, flush=True)
    target = getattr(args, "json", None)
    if target is not None:
        Path(target).write_text(line + "\n")
