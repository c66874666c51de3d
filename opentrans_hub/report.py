"""What a subnetwork or a layer selection saves: parameter counts, FLOPs (sparsity-aware), plots.

FLOPs are counted with :class:`torch.utils.flop_counter.FlopCounterMode`, so they are what torch really
runs: in a training step a frozen weight (``requires_grad=False``) costs no weight-gradient FLOPs, and
input gradients are only computed where something earlier still trains. Sparse inference FLOPs scale each
masked Conv/Linear layer's dense FLOPs by the density of its keep-mask (what a sparse kernel would pay).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ._shard import count_true
from .errors import OpenTransError


@dataclass
class FlopReport:
    """FLOPs of one forward (``train=False``) or one forward + backward (``train=True``).

    ``by_module`` holds each module's own FLOPs (not its children's), keyed by its name in the model
    ("" for the root), in model order; ``by_op`` totals per aten operator.
    """

    total: int
    train: bool
    by_module: dict[str, int] = field(default_factory=dict)
    by_op: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "train": self.train, "by_module": self.by_module, "by_op": self.by_op}


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _default_loss(output: Any) -> torch.Tensor:
    """Sum of every floating tensor in the output (a scalar whose backward reaches all of them)."""
    leaves: list[torch.Tensor] = []

    def visit(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            if obj.is_floating_point() and obj.requires_grad:
                leaves.append(obj)
        elif isinstance(obj, Mapping):
            for value in obj.values():
                visit(value)
        elif isinstance(obj, (tuple, list)):
            for value in obj:
                visit(value)

    visit(output)
    if not leaves:
        raise OpenTransError("the model's output needs no gradient (is every parameter frozen?)")
    return sum(t.float().sum() for t in leaves)


def count_flops(model: nn.Module, inputs: Any, train: bool = False,
                loss_fn: Callable[[Any], torch.Tensor] | None = None) -> FlopReport:
    """FLOPs of ``model(inputs)`` (a tensor, a tuple of positional inputs or a dict of keyword inputs).

    With ``train`` it is one forward plus the backward of ``loss_fn(output)`` (default: the sum of the
    outputs); gradients are cleared again afterwards. The model's train/eval mode is left as it is.
    """
    root_prefix = type(model).__name__
    counter = FlopCounterMode(display=False)
    with counter:
        if train:
            output = _call(model, inputs)
            loss = (loss_fn or _default_loss)(output)
            if not loss.requires_grad:
                raise OpenTransError("the loss needs no gradient (is every parameter frozen?)")
            loss.backward()
        else:
            with torch.no_grad():
                _call(model, inputs)
    if train:
        for param in model.parameters():
            param.grad = None
    counts = counter.get_flop_counts()
    inclusive = {}
    for key, ops in counts.items():
        if key == "Global":
            continue
        name = "" if key == root_prefix else key[len(root_prefix) + 1:] if key.startswith(root_prefix + ".") else None
        if name is not None:
            inclusive[name] = sum(ops.values())
    by_module: dict[str, int] = {}
    for name, module in model.named_modules():
        if name not in inclusive:
            continue
        children = sum(inclusive.get(f"{name}.{child}" if name else child, 0) for child, _ in module.named_children())
        own = inclusive[name] - children
        if own:
            by_module[name] = own
    by_op = {str(op).removeprefix("aten."): int(v) for op, v in counts.get("Global", {}).items()}
    return FlopReport(total=int(counter.get_total_flops()), train=train, by_module=by_module, by_op=by_op)


def parameter_counts(model: nn.Module, masks: Mapping[str, torch.Tensor] | None = None) -> dict[str, int]:
    """Total, kept (not pruned by a mask), masked, trainable and frozen parameter counts of ``model``.

    ``masks`` (parameter name -> keep-mask) defaults to the masks applied with
    :func:`opentrans_hub.sparsity.apply_masks`/``apply_subnetwork``.
    """
    if masks is None:
        from .sparsity import masked_parameters

        masks = masked_parameters(model)
    total = trainable = masked = pruned = 0
    for name, param in model.named_parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
        if name in masks:
            masked += param.numel()
            pruned += param.numel() - count_true(masks[name])  # sharded masks: summed over the ranks
    return {"total": total, "kept": total - pruned, "masked": masked, "pruned": pruned, "trainable": trainable,
            "frozen": total - trainable}


def sparse_inference_flops(model: nn.Module, inputs: Any,
                           masks: Mapping[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Inference FLOPs counting only kept weights: each masked Conv/Linear layer pays dense x density.

    Returns ``dense`` and ``sparse`` totals, their ``ratio`` and a per-layer list (``name``, ``dense``,
    ``sparse``, ``density``) for the masked layers. ``masks`` defaults to the model's applied masks.
    """
    if masks is None:
        from .sparsity import masked_parameters

        masks = masked_parameters(model)
    flops = count_flops(model, inputs, train=False)
    layers = []
    saved = 0
    for name, module in model.named_modules():
        key = f"{name}.weight" if name else "weight"
        if key not in masks or not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            continue
        mask = masks[key]
        density = count_true(mask) / mask.numel() if mask.numel() else 1.0
        dense = flops.by_module.get(name, 0)
        sparse = int(round(dense * density))
        saved += dense - sparse
        layers.append({"name": name, "dense": dense, "sparse": sparse, "density": density})
    sparse_total = flops.total - saved
    return {"dense": flops.total, "sparse": sparse_total, "ratio": sparse_total / flops.total if flops.total else 1.0,
            "layers": layers}


def selection_training_flops(model: nn.Module, inputs: Any, selection: Any, name_map: Any = None,
                             loss_fn: Callable[[Any], torch.Tensor] | None = None,
                             **apply_options: Any) -> dict[str, Any]:
    """Training FLOPs of one step with every parameter trainable vs with ``selection`` applied.

    ``selection`` is a LayerSelection; ``apply_options`` go to its ``apply`` (biases, norms, others,
    scope). The model's ``requires_grad`` flags are restored afterwards.
    """
    saved_flags = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        for param in model.parameters():
            param.requires_grad_(True)
        full = count_flops(model, inputs, train=True, loss_fn=loss_fn)
        full_params = parameter_counts(model, masks={})["trainable"]
        selection.apply(model, name_map=name_map, **apply_options)
        selected = count_flops(model, inputs, train=True, loss_fn=loss_fn)
        selected_params = parameter_counts(model, masks={})["trainable"]
    finally:
        params = dict(model.named_parameters())
        for name, flag in saved_flags.items():
            params[name].requires_grad_(flag)
    return {"full_train_flops": full.total, "selected_train_flops": selected.total,
            "flops_ratio": selected.total / full.total if full.total else 1.0,
            "full_trainable_params": full_params, "selected_trainable_params": selected_params}


# --------------------------------------------------------------------------------------------- plots
def plot_alpha(layers: Any, path: str | os.PathLike, title: str | None = None) -> Path:
    """PNG of alpha per layer in network order, the median line, trainable layers marked.

    ``layers`` is a LayerSelection (its trainable flags are marked), or a list of LayerMetrics / dicts.
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
    ax.set_xlabel("layer (network order)")
    ax.set_ylabel("alpha")
    ax.set_title(title or "power-law alpha per layer")
    if len(rows) <= 80:
        ax.set_xticks(xs)
        ax.set_xticklabels([r["name"].removesuffix(".weight") for r in rows], rotation=90, fontsize=5)
    ax.legend(fontsize=7)
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

    from ._atomic import atomic_write_bytes

    fmt = check_plot_path(path)
    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt, dpi=120)  # a bare Figure: no pyplot state, no GUI backend
    return atomic_write_bytes(path, buffer.getvalue())
