"""Exact sparsity while training, without a second copy of the weights.

Applying a subnetwork zeroes the pruned weights in place and remembers one boolean mask per masked
parameter on its module (``module._opentrans_masks``; a plain attribute, so ``state_dict()`` is unchanged
and ``copy.deepcopy``/pickling carry it). Two global optimizer hooks keep the zeros exact:

* before every ``torch.optim`` step, the gradients of masked parameters are zeroed at pruned positions,
  and optimizer state left from before the mask (momentum, Adam moments) is cleared there once;
* after every step, the pruned weights are set to 0.0 again (covers weight decay and any optimizer
  arithmetic that could move a zero).

A load-state-dict hook re-zeroes after ``load_state_dict``, and a forward pre-hook re-registers the
parameters of deep copies. ``bake`` drops all of it and leaves plain modules holding the zeros.
Loops that update weights without ``torch.optim`` call :func:`enforce` after their update.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from .errors import OpenTransError
from .mapping import MappingReport, NameMap
from .subnetwork import Subnetwork

_ATTR = "_opentrans_masks"
_HOOKS_ATTR = "_opentrans_hook_ids"

# parameter -> (module, parameter attribute name); weak so dropped models free their entries
_REGISTRY: WeakIdKeyDictionary = WeakIdKeyDictionary()
# optimizer -> (parameter -> the mask whose positions were already cleared in its state)
_SEEN: WeakIdKeyDictionary = WeakIdKeyDictionary()
_GLOBAL_HOOKS: list[Any] = []


# ------------------------------------------------------------------ registration
def _mask_for(param: torch.Tensor) -> torch.Tensor | None:
    entry = _REGISTRY.get(param)
    if entry is None:
        return None
    module = entry[0]()
    masks = getattr(module, _ATTR, None) if module is not None else None
    if not masks or entry[1] not in masks or getattr(module, entry[1]) is not param:
        return None
    mask = masks[entry[1]]
    if mask.device != param.device:
        mask = masks[entry[1]] = mask.to(param.device)
    return mask


def _register_module(module: nn.Module) -> None:
    for attr in getattr(module, _ATTR, {}):
        param = getattr(module, attr)
        entry = _REGISTRY.get(param)
        if entry is None or entry[1] != attr or entry[0]() is not module:
            _REGISTRY[param] = (weakref.ref(module), attr)


def _zero_module(module: nn.Module) -> None:
    with torch.no_grad():
        for attr, mask in getattr(module, _ATTR, {}).items():
            param = getattr(module, attr)
            if mask.device != param.device:
                mask = module._opentrans_masks[attr] = mask.to(param.device)
            param.mul_(mask)


def _forward_pre_hook(module: nn.Module, args: Any) -> None:
    # cheap: registers the parameters of copies (deepcopy, pickling) the first time they run
    _register_module(module)


def _load_state_dict_post_hook(module: nn.Module, incompatible_keys: Any) -> None:
    _register_module(module)
    _zero_module(module)


def _optimizer_pre_hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    seen = _SEEN.get(optimizer)
    if seen is None:
        seen = _SEEN[optimizer] = WeakIdKeyDictionary()
    with torch.no_grad():
        for group in optimizer.param_groups:
            for param in group["params"]:
                mask = _mask_for(param)
                if mask is None:
                    continue
                if param.grad is not None:
                    param.grad.mul_(mask)
                if seen.get(param) is not mask:
                    # state from before this mask could move pruned weights: clear it there, once
                    for value in optimizer.state.get(param, {}).values():
                        if isinstance(value, torch.Tensor) and value.shape == param.shape:
                            value.mul_(mask)
                    seen[param] = mask


def _optimizer_post_hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    with torch.no_grad():
        for group in optimizer.param_groups:
            for param in group["params"]:
                mask = _mask_for(param)
                if mask is not None:
                    param.mul_(mask)


def _ensure_global_hooks() -> None:
    if not _GLOBAL_HOOKS:
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        _GLOBAL_HOOKS.append(register_optimizer_step_pre_hook(_optimizer_pre_hook))
        _GLOBAL_HOOKS.append(register_optimizer_step_post_hook(_optimizer_post_hook))


# ------------------------------------------------------------------ public API
def _split_name(name: str) -> tuple[str, str]:
    module_name, _, attr = name.rpartition(".")
    return module_name, attr


def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Mask parameters of ``model`` by their full names (keep-mask True = kept). All-or-nothing.

    Every name and shape is checked before any weight changes. A parameter masked already gets the
    logical AND of both masks (IMP rounds narrow an existing mask).
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, mask in masks.items():
        if name not in params:
            raise OpenTransError(f"model has no parameter {name!r}; nothing was applied", tensor=name)
        if tuple(mask.shape) != tuple(params[name].shape):
            raise OpenTransError(f"mask shape {tuple(mask.shape)} != parameter shape {tuple(params[name].shape)}; "
                                 "nothing was applied", tensor=name)
        if mask.dtype != torch.bool:
            raise OpenTransError(f"mask dtype {mask.dtype}, expected bool; nothing was applied", tensor=name)
    _ensure_global_hooks()
    for name, mask in masks.items():
        module_name, attr = _split_name(name)
        module = model.get_submodule(module_name) if module_name else model
        param = getattr(module, attr)
        store = module.__dict__.get(_ATTR)
        if store is None:
            store = {}
            object.__setattr__(module, _ATTR, store)
            ids = [module.register_forward_pre_hook(_forward_pre_hook).id,
                   module.register_load_state_dict_post_hook(_load_state_dict_post_hook).id]
            object.__setattr__(module, _HOOKS_ATTR, ids)
        mask = mask.to(param.device)
        store[attr] = mask & store[attr] if attr in store else mask
        _REGISTRY[param] = (weakref.ref(module), attr)
        with torch.no_grad():
            param.mul_(store[attr])


def apply_subnetwork(model: nn.Module, subnetwork: Subnetwork, name_map: NameMap | None = None,
                     strict: bool = False) -> MappingReport:
    """Map ``subnetwork`` onto ``model`` through ``name_map`` and keep its zeros exact while training.

    Every destination is resolved by name and shape-checked first; on any mismatch (or, with ``strict``,
    any unmapped name) nothing is changed and :class:`OpenTransError` is raised.
    """
    name_map = name_map or NameMap()
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False)}
    masks, report = name_map.resolve(subnetwork.masks, shapes)
    report.check(strict=strict)
    apply_masks(model, masks)
    return report


def apply_subnetwork_to_state_dict(state_dict: Mapping[str, torch.Tensor], subnetwork: Subnetwork,
                                   name_map: NameMap | None = None, strict: bool = False,
                                   source: str | None = None) -> tuple[dict[str, torch.Tensor], MappingReport]:
    """Return a new state dict with pruned weights zeroed (other tensors are the same objects)."""
    name_map = name_map or NameMap()
    shapes = {name: tuple(t.shape) for name, t in state_dict.items() if isinstance(t, torch.Tensor)}
    masks, report = name_map.resolve(subnetwork.masks, shapes)
    report.check(strict=strict, source=source)
    out = dict(state_dict)
    for name, mask in masks.items():
        out[name] = state_dict[name].masked_fill(~mask.to(state_dict[name].device), 0)
    return out, report


def enforce(model: nn.Module) -> None:
    """Set every pruned weight of ``model`` to 0.0 again (for update loops outside ``torch.optim``)."""
    for module in model.modules():
        if _ATTR in module.__dict__:
            _register_module(module)
            _zero_module(module)


def masked_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full parameter name -> keep-mask for every parameter ``model`` keeps sparse."""
    out = {}
    for module_name, module in model.named_modules():
        for attr, mask in module.__dict__.get(_ATTR, {}).items():
            out[f"{module_name}.{attr}" if module_name else attr] = mask
    return out


def is_masked(model: nn.Module) -> bool:
    return any(_ATTR in module.__dict__ for module in model.modules())


def bake(model: nn.Module) -> nn.Module:
    """Make the zeros permanent and return plain modules: masks, hooks and registrations removed."""
    for module in model.modules():
        store = module.__dict__.get(_ATTR)
        if store is None:
            continue
        _zero_module(module)
        for attr in store:
            _REGISTRY.pop(getattr(module, attr), None)
        for hook_id in module.__dict__.get(_HOOKS_ATTR, []):
            module._forward_pre_hooks.pop(hook_id, None)
            module._load_state_dict_post_hooks.pop(hook_id, None)
        del module.__dict__[_ATTR]
        module.__dict__.pop(_HOOKS_ATTR, None)
    return model


def model_sparsity(model: nn.Module, names: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Zeros over the masked parameters (or ``names``): what is really 0.0 in the weights right now."""
    params = dict(model.named_parameters(remove_duplicate=False))
    names = names if names is not None else masked_parameters(model)
    total = zeros = 0
    for name in names:
        tensor = params[name]
        total += tensor.numel()
        zeros += int((tensor == 0).sum())
    return {"params": total, "zeros": zeros, "sparsity": zeros / total if total else 0.0}
