"""What a subnetwork or a layer selection saves: parameter counts, FLOPs (sparsity-aware), plots.

FLOPs are counted with :class:`torch.utils.flop_counter.FlopCounterMode`, so they are what torch really
runs: in a training step a frozen weight (``requires_grad=False``) costs no weight-gradient FLOPs, and
input gradients are only computed where something earlier still trains. Sparse inference FLOPs scale each
masked Conv/Linear layer's dense FLOPs by the density of its keep-mask (what a sparse kernel would pay).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..errors import OpenTransError
from ..sparsity.sharding import count_true


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
    :func:`opentrans_hub.sparsity.masks.apply_masks`/``apply_subnetwork``.
    """
    if masks is None:
        from ..sparsity.masks import masked_parameters

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
        from ..sparsity.masks import masked_parameters

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
