"""Plots of what a subnetwork or a layer selection holds: alpha per layer, sparsity per layer."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import OpenTransError


def plot_alpha(layers: Any, path: str | os.PathLike, title: str | None = None) -> Path:
    """PNG of alpha per layer in network order, the median line, trainable layers marked.

    ``layers`` is a LayerSelection (its trainable flags are marked; its learning-rate scales, when it has any,
    drawn as steps on a second axis), or a list of LayerMetrics / dicts.
    """
    from matplotlib.figure import Figure

    rows = layers.layers if hasattr(layers, "layers") and not isinstance(layers, Sequence) else layers
    rows = [r.to_dict() if hasattr(r, "to_dict") else dict(r) for r in rows]
    if not rows:
        raise OpenTransError("nothing to plot: no layers")
    xs = list(range(len(rows)))
    alphas = [float("nan") if r.get("alpha") is None else float(r["alpha"]) for r in rows]
    known = sorted(a for a in alphas if a == a)
    median = None
    if known:
        mid = len(known) // 2
        median = known[mid] if len(known) % 2 else (known[mid - 1] + known[mid]) / 2
    fig = Figure(figsize=(max(6.0, 0.16 * len(rows) + 2), 4.0))
    ax = fig.subplots()
    ax.plot(xs, alphas, color="0.6", linewidth=0.8, zorder=1)
    if any("trainable" in r for r in rows):
        train = [i for i, r in enumerate(rows) if r.get("trainable")]
        frozen = [i for i, r in enumerate(rows) if not r.get("trainable")]
        ax.scatter(train, [alphas[i] for i in train], color="tab:red", s=22, zorder=2, label="trainable")
        ax.scatter(frozen, [alphas[i] for i in frozen], facecolors="none", edgecolors="tab:blue", s=22, zorder=2,
                   label="frozen")
    else:
        ax.scatter(xs, alphas, color="tab:blue", s=18, zorder=2, label="layer")
    if median is not None:
        ax.axhline(median, color="k", linestyle="--", linewidth=1, label=f"median {median:.3f}")
    handles, labels = ax.get_legend_handles_labels()
    if any(r.get("lr_scale", 1.0) != 1.0 for r in rows):
        scale_ax = ax.twinx()
        line = scale_ax.step(xs, [r.get("lr_scale", 1.0) for r in rows], where="mid", color="tab:green",
                             linewidth=1.2, label="lr scale")
        scale_ax.set_ylabel("learning-rate scale", color="tab:green")
        handles, labels = handles + line, labels + ["lr scale"]
    ax.set_xlabel("layer (network order)")
    ax.set_ylabel("alpha")
    ax.set_title(title or "power-law alpha per layer")
    if len(rows) <= 80:
        ax.set_xticks(xs)
        ax.set_xticklabels([r["name"].removesuffix(".weight") for r in rows], rotation=90, fontsize=5)
    ax.legend(handles, labels, fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_sparsity(subnetwork: Any, path: str | os.PathLike, title: str | None = None) -> Path:
    """PNG of the sparsity of each layer of a Subnetwork (bars in layer order, the overall line)."""
    from matplotlib.figure import Figure

    stats = subnetwork.stats()
    rows = stats["layers"]
    if not rows:
        raise OpenTransError("nothing to plot: the subnetwork has no layers")
    fig = Figure(figsize=(max(6.0, 0.16 * len(rows) + 2), 4.0))
    ax = fig.subplots()
    ax.bar(range(len(rows)), [r["sparsity"] for r in rows], color="tab:blue")
    ax.axhline(stats["sparsity"], color="k", linestyle="--", linewidth=1, label=f"overall {stats['sparsity']:.1%}")
    ax.set_ylim(0, 1)
    ax.set_ylabel("sparsity (pruned share)")
    ax.set_xlabel("layer")
    ax.set_title(title or f"{stats.get('arch', '')} subnetwork sparsity per layer")
    if len(rows) <= 80:
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([r["name"].removesuffix(".weight") for r in rows], rotation=90, fontsize=5)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


PLOT_FORMATS = ("png", "svg", "pdf")


def check_plot_path(path: str | os.PathLike) -> str:
    """The image format for ``path`` from its extension; anything but .png/.svg/.pdf is refused."""
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in PLOT_FORMATS:
        raise OpenTransError(f"cannot tell the image format from the extension {Path(path).suffix or '(none)'!r}; "
                             f"use one of {', '.join('.' + f for f in PLOT_FORMATS)}", path=path)
    return suffix


def _save(fig: Any, path: str | os.PathLike) -> Path:
    import io

    from ..io.atomic import atomic_write_bytes

    fmt = check_plot_path(path)
    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt, dpi=120)  # a bare Figure: no pyplot state, no GUI backend
    return atomic_write_bytes(path, buffer.getvalue())
