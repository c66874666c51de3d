"""Exact sparsity while training, without a second copy of the weights.

Applying a subnetwork zeroes the pruned weights in place and remembers one boolean mask per masked
parameter on its module (``module._opentrans_masks``; a plain attribute, so ``state_dict()`` is unchanged
and ``copy.deepcopy``/pickling carry it). Two global optimizer hooks keep the zeros exact:

* before every ``torch.optim`` step, the gradients of masked parameters are zeroed at pruned positions,
  and optimizer state left from before the mask (momentum, Adam moments) is cleared there once;
* after every step of an optimizer whose update is not elementwise (or a step given a closure), the
  pruned weights are set to 0.0 again; torch's elementwise optimizers (SGD, Adam, AdamW, ...) cannot
  move a weight whose gradient and state are 0 (weight decay of 0 is 0), so they skip that pass.

A load-state-dict hook re-zeroes after ``load_state_dict``; deep copies and unpickled models register
their own parameters before their first optimizer step (the mask store carries its parameters through
the copy), and a forward pre-hook follows parameters replaced later. ``bake`` drops all of it and
leaves plain modules holding the zeros; ``remove`` drops it without touching the weights.
Loops that update weights without ``torch.optim`` call :func:`enforce` after their update; so does a
loop that stepped on NaN/inf gradients without a GradScaler (NaN times 0 is NaN; ``enforce`` uses
``masked_fill_``, which repairs that).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from .errors import OpenTransError
from .mapping import MappingReport, NameMap
from .subnetwork import Subnetwork

_ATTR = "_opentrans_masks"
_HOOKS_ATTR = "_opentrans_hook_ids"

# parameter -> (weakref to the _MaskStore holding its mask, attribute name); weak so dropped models free it
_REGISTRY: WeakIdKeyDictionary = WeakIdKeyDictionary()
# optimizer -> (id of its state dict, parameter -> the mask whose positions were already cleared in it)
_SEEN: WeakIdKeyDictionary = WeakIdKeyDictionary()
# stores made by deepcopy/unpickling whose parameters are not registered yet (drained at the next step)
_PENDING: list[weakref.ref] = []
_GLOBAL_HOOKS: list[Any] = []


class _MaskStore(dict):
    """``attribute -> keep-mask`` of one module, plus the parameters those masks belong to.

    It is what ``module._opentrans_masks`` holds (a dict, for readers). Keeping the parameters here lets
    ``copy.deepcopy`` and pickling carry the pairing over: the copy's store points at the copy's own
    parameters (same object graph), so it is registered before its first optimizer step, forward or not.
    """

    def __init__(self, masks: Mapping[str, torch.Tensor] = (), params: Mapping[str, torch.Tensor] | None = None):
        super().__init__(masks)
        self.params: dict[str, torch.Tensor] = dict(params or {})

    def __reduce_ex__(self, protocol: Any):
        return _rebuild_store, (dict(self), self.params)


def _rebuild_store(masks: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor]) -> _MaskStore:
    store = _MaskStore(masks, params)
    _PENDING.append(weakref.ref(store))
    _ensure_global_hooks()
    return store


def _register_store(store: _MaskStore) -> None:
    ref = weakref.ref(store)
    for attr, param in store.params.items():
        if attr in store:
            _REGISTRY[param] = (ref, attr)


def _drain_pending() -> None:
    while _PENDING:
        store = _PENDING.pop()()
        if store is not None:
            _register_store(store)


# ------------------------------------------------------------------ registration
def _mask_for(param: torch.Tensor) -> torch.Tensor | None:
    entry = _REGISTRY.get(param)
    if entry is None:
        return None
    store, attr = entry[0](), entry[1]
    if store is None or store.params.get(attr) is not param:
        return None
    mask = store.get(attr)
    if mask is not None and mask.device != param.device:
        mask = store[attr] = mask.to(param.device)
    return mask


def _store_of(module: nn.Module) -> _MaskStore | None:
    store = module.__dict__.get(_ATTR)
    if store is not None and not isinstance(store, _MaskStore):  # a plain dict from an older pickle
        store = _MaskStore(store, {attr: getattr(module, attr) for attr in store})
        object.__setattr__(module, _ATTR, store)
    return store


def _register_module(module: nn.Module) -> None:
    store = _store_of(module)
    if store is None:
        return
    for attr in store:
        param = getattr(module, attr)
        if store.params.get(attr) is not param:
            store.params[attr] = param  # replaced parameter (load_state_dict(assign=True), user code)
        entry = _REGISTRY.get(param)
        if entry is None or entry[1] != attr or entry[0]() is not store:
            _REGISTRY[param] = (weakref.ref(store), attr)


def _zero_module(module: nn.Module) -> None:
    store = _store_of(module)
    if store is None:
        return
    with torch.no_grad():
        for attr, mask in store.items():
            param = getattr(module, attr)
            if mask.device != param.device:
                mask = store[attr] = mask.to(param.device)
            param.masked_fill_(~mask, 0)  # not mul_: NaN or inf times 0 is not 0


def _forward_pre_hook(module: nn.Module, args: Any) -> None:
    # cheap: follows parameters replaced since the mask was applied
    _register_module(module)


def _load_state_dict_post_hook(module: nn.Module, incompatible_keys: Any) -> None:
    _register_module(module)
    _zero_module(module)


def _optimizer_pre_hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    if _PENDING:
        _drain_pending()
    entry = _SEEN.get(optimizer)
    # optimizer.load_state_dict installs a new state dict (made while the old one is alive, so its id
    # differs): state loaded from a checkpoint taken before the mask is cleared again
    if entry is None or entry[0] != id(optimizer.state):
        entry = _SEEN[optimizer] = (id(optimizer.state), WeakIdKeyDictionary())
    seen = entry[1]
    with torch.no_grad():
        for group in optimizer.param_groups:
            for param in group["params"]:
                mask = _mask_for(param)
                if mask is None:
                    continue
                grad = param.grad
                if grad is not None and not grad.is_sparse:
                    # one multiply: the cheapest pass (torch.where(out=) costs a second, hidden copy). A NaN/inf
                    # gradient stays NaN there; GradScaler skips such steps, otherwise call enforce() after
                    grad.mul_(mask)
                if seen.get(param) is not mask:
                    # state from before this mask could move pruned weights: clear it there, once
                    for value in optimizer.state.get(param, {}).values():
                        if isinstance(value, torch.Tensor) and value.shape == param.shape:
                            value.masked_fill_(~mask, 0)
                    seen[param] = mask


#: torch.optim classes whose update is elementwise: with a zero gradient, zero state and a zero weight at a
#: position, every one of them leaves exactly 0.0 there (weight decay of 0 is 0, Adam's 0 / (0 + eps) is 0),
#: so after the pre-step hook their step needs no second pass over the weights. Exact types only: a
#: subclass may override ``step``.
_ELEMENTWISE = tuple(getattr(torch.optim, name) for name in (
    "SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "Adadelta", "Adamax", "NAdam", "RAdam") if hasattr(torch.optim, name))


def _optimizer_post_hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    # Any other optimizer (preconditioners such as Shampoo, LBFGS, a closure that recomputes gradients
    # inside ``step`` after the pre-hook ran) can move a pruned weight: set it back to 0.0. The multiply
    # costs half of masked_fill_; gradients and state are clean, so there is no NaN to multiply.
    if type(optimizer) in _ELEMENTWISE and not args and kwargs.get("closure") is None:
        return
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
def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel wrappers (their names carry ``module.``)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _split_name(name: str) -> tuple[str, str]:
    module_name, _, attr = name.rpartition(".")
    return module_name, attr


def check_mask_target(tensor: torch.Tensor, name: str, source: str | None = None) -> None:
    """A mask belongs on a real floating-point Conv/Linear weight (2-D and up, non-empty): not on a norm, a bias,
    a scalar, a complex or an integer tensor."""
    if not tensor.is_floating_point() or tensor.is_complex():
        raise OpenTransError(f"target is {tensor.dtype}: masks apply to real floating-point weights; nothing was "
                             "applied", path=source, tensor=name)
    if tensor.dim() < 2 or tensor.numel() == 0:
        raise OpenTransError(f"target of shape {tuple(tensor.shape)} is not a Conv/Linear weight (masks need 2-D and "
                             "up, non-empty); nothing was applied", path=source, tensor=name)


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
        check_mask_target(params[name], name)
    _ensure_global_hooks()
    for name, mask in masks.items():
        module_name, attr = _split_name(name)
        module = model.get_submodule(module_name) if module_name else model
        param = getattr(module, attr)
        store = _store_of(module)
        if store is None:
            store = _MaskStore()
            object.__setattr__(module, _ATTR, store)
            ids = [module.register_forward_pre_hook(_forward_pre_hook).id,
                   module.register_load_state_dict_post_hook(_load_state_dict_post_hook).id]
            object.__setattr__(module, _HOOKS_ATTR, ids)
        mask = mask.to(param.device)
        store[attr] = mask & store[attr] if attr in store else mask
        store.params[attr] = param
        _REGISTRY[param] = (weakref.ref(store), attr)
        with torch.no_grad():
            param.masked_fill_(~store[attr], 0)


def apply_subnetwork(model: nn.Module, subnetwork: Subnetwork, name_map: NameMap | None = None,
                     strict: bool = False, allow_partial: bool = False,
                     scope: str | Sequence[str] | None = None) -> MappingReport:
    """Map ``subnetwork`` onto ``model`` through ``name_map`` and keep its zeros exact while training
    (``opentrans_hub.apply_subnetwork`` also takes a name, ``hf://`` reference or file).

    Every destination is resolved by name and shape-checked first; nothing is changed and
    :class:`OpenTransError` is raised on any mismatch, when no name is mapped (or, with ``strict``, any name is
    unmapped), and when the tower (``scope``: a name prefix, by default where the mapped names sit) holds
    Conv/Linear weights the subnetwork's architecture has no counterpart for, unless ``allow_partial``; those
    are then listed in ``report.uncovered`` (they stay dense).
    """
    from .coverage import check_coverage, require_mapped

    name_map = name_map or NameMap()
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False)}
    masks, report = name_map.resolve(subnetwork.masks, shapes)
    report.check(strict=strict)
    require_mapped(report, len(subnetwork))
    check_coverage(subnetwork.arch, name_map, shapes, report, scope=scope, allow_partial=allow_partial)
    apply_masks(model, masks)
    return report


def apply_subnetwork_to_state_dict(state_dict: Mapping[str, torch.Tensor], subnetwork: Subnetwork,
                                   name_map: NameMap | None = None, strict: bool = False,
                                   source: str | None = None, allow_partial: bool = False,
                                   scope: str | Sequence[str] | None = None
                                   ) -> tuple[dict[str, torch.Tensor], MappingReport]:
    """Return a new state dict with pruned weights zeroed (other tensors are the same objects); refuses what
    :func:`apply_subnetwork` refuses."""
    from .coverage import check_coverage, require_mapped

    name_map = name_map or NameMap()
    shapes = {name: tuple(t.shape) for name, t in state_dict.items() if isinstance(t, torch.Tensor)}
    masks, report = name_map.resolve(subnetwork.masks, shapes)
    report.check(strict=strict, source=source)
    require_mapped(report, len(subnetwork), source=source)
    check_coverage(subnetwork.arch, name_map, shapes, report, scope=scope, allow_partial=allow_partial,
                   source=source)
    for name in masks:
        check_mask_target(state_dict[name], name, source)
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
    _drain_pending()


def masked_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full parameter name -> keep-mask for every parameter ``model`` keeps sparse."""
    out = {}
    for module_name, module in model.named_modules():
        for attr, mask in module.__dict__.get(_ATTR, {}).items():
            out[f"{module_name}.{attr}" if module_name else attr] = mask
    return out


def is_masked(model: nn.Module) -> bool:
    return any(_ATTR in module.__dict__ for module in model.modules())


def _detach_masks(model: nn.Module, zero: bool) -> nn.Module:
    for module in model.modules():
        store = _store_of(module)
        if store is None:
            continue
        _register_module(module)
        if zero:
            _zero_module(module)
        for attr in store:
            _REGISTRY.pop(getattr(module, attr), None)
        for hook_id in module.__dict__.get(_HOOKS_ATTR, []):
            module._forward_pre_hooks.pop(hook_id, None)
            module._load_state_dict_post_hooks.pop(hook_id, None)
        store.params.clear()
        del module.__dict__[_ATTR]
        module.__dict__.pop(_HOOKS_ATTR, None)
    return model


def bake(model: nn.Module) -> nn.Module:
    """Make the zeros permanent and return plain modules: masks, hooks and registrations removed."""
    return _detach_masks(model, zero=True)


def remove(model: nn.Module) -> nn.Module:
    """Drop masks, hooks and registrations without touching the weights (they hold the zeros already).

    Unlike ``torch.nn.utils.prune.remove`` there is no ``weight_orig`` to fold back: this only stops the
    enforcement, e.g. to let the pruned weights regrow on purpose.
    """
    return _detach_masks(model, zero=False)


def model_sparsity(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, Any]:
    """Exact zeros in the weights right now (it counts values, never masks): over ``names``, else over the
    parameters ``model`` keeps masked, else, for a model without masks (a baked tower, a checkpoint loaded into a
    plain model), over every weight tensor of 2 dims or more (Conv/Linear kernels; norms and biases left out).

    Returns ``params``, ``zeros``, ``sparsity`` and ``scope`` (``"names"``, ``"masked"`` or ``"weights"``).
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    if names is not None:
        scope, names = "names", list(names)
    else:
        names = list(masked_parameters(model))
        scope = "masked"
        if not names:
            scope, names = "weights", [n for n, p in params.items() if p.dim() >= 2 and p.is_floating_point()]
    unknown = [name for name in names if name not in params]
    if unknown:
        raise OpenTransError(f"model has no parameter {unknown[0]!r}", tensor=unknown[0])
    total = zeros = 0
    for name in names:
        tensor = params[name].detach()
        total += tensor.numel()
        zeros += int((tensor == 0).sum())
    return {"params": total, "zeros": zeros, "sparsity": zeros / total if total else 0.0, "scope": scope}


def count_zeros(model: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Exact zeros per weight tensor (2 dims or more) of a model or state dict, and overall: what a baked or
    loaded checkpoint really holds, whatever masks exist or not."""
    tensors = dict(model.named_parameters(remove_duplicate=False)) if isinstance(model, nn.Module) else dict(model)
    layers = {}
    for name, tensor in tensors.items():
        if isinstance(tensor, torch.Tensor) and tensor.dim() >= 2 and tensor.is_floating_point():
            layers[name] = (int((tensor.detach() == 0).sum()), tensor.numel())
    zeros, total = sum(z for z, _ in layers.values()), sum(n for _, n in layers.values())
    return {"params": total, "zeros": zeros, "sparsity": zeros / total if total else 0.0,
            "layers": {name: {"zeros": z, "params": n, "sparsity": z / n} for name, (z, n) in layers.items()}}
