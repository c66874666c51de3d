"""An embedded synthetic segmentation task, so the demo and tests train something real with no data set.

Each image holds a few filled shapes (disc, square, horizontal bar, vertical bar) in random colours over a
noisy background; the label map gives each pixel its shape class (0 = background). It is cheap to generate
on the fly, deterministic for a seed, and hard enough that the loss falls visibly in a few steps.
"""

from __future__ import annotations

import torch

SHAPES = ("background", "disc", "square", "hbar", "vbar")


def make_batch(batch: int, size: int = 64, generator: torch.Generator | None = None,
               max_shapes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(batch, 3, size, size)`` normalised to about zero mean, labels ``(batch, size, size)`` int64."""
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    images = 0.15 * torch.randn(batch, 3, size, size, generator=g) + torch.rand(batch, 3, 1, 1, generator=g) * 0.3
    labels = torch.zeros(batch, size, size, dtype=torch.long)
    ys = torch.arange(size).view(size, 1).float()
    xs = torch.arange(size).view(1, size).float()
    for b in range(batch):
        count = int(torch.randint(1, max_shapes + 1, (1,), generator=g))
        for _ in range(count):
            kind = int(torch.randint(1, len(SHAPES), (1,), generator=g))
            cy, cx = (torch.rand(2, generator=g) * size).tolist()
            r = float(size * (0.08 + 0.14 * torch.rand(1, generator=g)))
            if kind == 1:
                region = (ys - cy) ** 2 + (xs - cx) ** 2 <= r * r
            elif kind == 2:
                region = ((ys - cy).abs() <= r) & ((xs - cx).abs() <= r)
            elif kind == 3:
                region = ((ys - cy).abs() <= r / 3) & ((xs - cx).abs() <= 2 * r)
            else:
                region = ((ys - cy).abs() <= 2 * r) & ((xs - cx).abs() <= r / 3)
            colour = torch.rand(3, 1, 1, generator=g) * 2 - 0.5
            images[b] = torch.where(region, colour.expand(3, size, size), images[b])
            labels[b][region] = kind
    return (images - 0.3) / 0.5, labels


def batches(steps: int, batch: int, size: int = 64, seed: int = 0):
    """``steps`` batches from one seeded stream (the same sequence on every run and every rank)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield make_batch(batch, size, g)
