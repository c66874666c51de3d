"""Building framework-like layouts in tests: empty containers at dotted attribute paths."""

from __future__ import annotations

from torch import nn


class Box(nn.Module):
    """An empty container, so attribute paths read like a framework's (``backbone.clip_model``)."""


def place(root: nn.Module, path: str, module: nn.Module) -> nn.Module:
    """Set ``module`` at the dotted ``path`` under ``root``, creating Boxes on the way; returns ``root``."""
    node = root
    parts = path.split(".")
    for part in parts[:-1]:
        if not hasattr(node, part):
            setattr(node, part, Box())
        node = getattr(node, part)
    setattr(node, parts[-1], module)
    return root
