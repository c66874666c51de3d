"""Exact sparsity while training, without a second copy of the weights.

Applying a subnetwork zeroes the pruned weights in place and remembers one boolean mask per masked
parameter on its module (``module._opentrans_masks``; a plain attribute, so ``state_dict()`` is unchanged
and ``copy.deepcopy``/pickling carry it). Nothing runs in ``forward``, so ``torch.compile`` traces a masked
model exactly like the dense one. Two global optimizer hooks keep the zeros exact:

* before every ``torch.optim`` step, parameters replaced since the mask was applied are followed
  (``fully_shard``, ``load_state_dict(assign=True)``, user code), the gradients of masked parameters are
  zeroed at pruned positions, and optimizer state left from before the mask (momentum, Adam moments) is
  cleared there once;
* after the step, the pruned weights are set to 0.0 again where the update can move them: an optimizer
  that is not one of torch's elementwise ones, a step given a closure, or a float16 parameter. Measured
  (``tests/test_sparsity_precision.py``): with zero gradient, zero state and a zero weight, every torch
  elementwise optimizer leaves exactly 0.0 in float32, float64 and bfloat16, but in float16 Adam, AdamW,
  Adamax, NAdam, RAdam, RMSprop and Adagrad write NaN (``eps=1e-8`` underflows to 0 in float16: 0 / 0),
  so the decision is made per step from the parameters' dtype, not from the optimizer's name.

Parameters sharded by FSDP2 (``fully_shard``) are DTensors; their masks become bool DTensors laid out like
them (each rank holds its own rows only), and all the work above runs on local shards
(:mod:`opentrans_hub.sparsity.sharding`). FSDP1 (``FullyShardedDataParallel``) is refused with a clear error.

A load-state-dict hook re-zeroes after ``load_state_dict``; deep copies and unpickled models register
their own parameters before their first optimizer step (the mask store carries its module and parameters
through the copy). ``bake`` drops all of it and leaves plain modules holding the zeros; ``remove`` drops it
without touching the weights. Loops that update weights without ``torch.optim`` call :func:`enforce` after
their update; so does a loop that stepped on NaN/inf float32 gradients without a GradScaler (NaN times 0 is
NaN; ``enforce`` uses ``masked_fill_``, which repairs that). :func:`opentrans_hub.sparsity.verify.verify_exact`
proves the zeros on demand.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from ..errors import OpenTransError
from .precision import warn_float16_eps
from .sharding import FSDP1_HINT, check_not_fsdp1, is_dtensor, local, shard_like

_ATTR = "_opentrans_masks"
_HOOKS_ATTR = "_opentrans_hook_ids"

# parameter -> (weakref to the _MaskStore holding its mask, attribute name); weak so dropped models free it
_REGISTRY: WeakIdKeyDictionary = WeakIdKeyDictionary()
# optimizer -> _Seen (which masks its state was cleared for, and whether its step needs the after pass)
_SEEN: WeakIdKeyDictionary = WeakIdKeyDictionary()
# every live mask store, checked before each optimizer step for parameters replaced since
_STORES: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # id -> store (dicts are unhashable)
# stores made by deepcopy/unpickling whose parameters are not registered yet (drained at the next step)
_PENDING: list[weakref.ref] = []
_GLOBAL_HOOKS: list[Any] = []
#: parameter dtypes whose elementwise optimizer steps can write NaN at pruned positions (eps underflows)
_AFTER_STEP_DTYPES = (torch.float16,)


class _MaskStore(dict):
    """``attribute -> keep-mask`` of one module, plus that module and the parameters the masks belong to.

    It is what ``module._opentrans_masks`` holds (a dict, for readers). Keeping the module and parameters
    here lets ``copy.deepcopy`` and pickling carry the pairing over: the copy's store points at the copy's
    own module and parameters (same object graph), so it is registered before its first optimizer step.
    """

    def __init__(self, masks: Mapping[str, torch.Tensor] = (), params: Mapping[str, torch.Tensor] | None = None,
                 module: nn.Module | None = None):
        super().__init__(masks)
        self.params: dict[str, torch.Tensor] = dict(params or {})
        self.module = module

    def __reduce_ex__(self, protocol: Any):
        return _rebuild_store, (dict(self), self.params, self.module)


def _rebuild_store(masks: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor],
                   module: nn.Module | None = None) -> _MaskStore:
    store = _MaskStore(masks, params, module)
    _PENDING.append(weakref.ref(store))
    _STORES[id(store)] = store
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


def mask_store(module: nn.Module) -> _MaskStore | None:
    """The masks ``module`` carries (attribute -> mask, with the parameters they belong to), or None; a plain
    dict pickled by an older version is upgraded in place."""
    store = module.__dict__.get(_ATTR)
    if store is not None and not isinstance(store, _MaskStore):  # a plain dict from an older pickle
        store = _MaskStore(store, {attr: getattr(module, attr) for attr in store}, module)
        object.__setattr__(module, _ATTR, store)
        _STORES[id(store)] = store
        _register_store(store)
    elif store is not None and store.module is None:
        store.module = module
        _STORES[id(store)] = store
    return store


def _bind(store: _MaskStore, attr: str, param: torch.Tensor) -> None:
    """Make ``param`` the parameter ``store[attr]`` masks, resharding the mask to follow it if needed."""
    mask = store[attr]
    if is_dtensor(param):
        store[attr] = shard_like(mask, param, attr)  # sharded by fully_shard since: keep this rank's rows only
        if not is_dtensor(mask):  # the mask met the shards for the first time (it may have zeroed an unsharded copy)
            with torch.no_grad():
                zero_pruned_(param, store[attr])
    elif is_dtensor(mask):
        return  # FSDP2's all-gathered parameter between forward and backward: the optimizer holds the shard
    elif tuple(param.shape) != tuple(mask.shape):
        owner = type(store.module).__name__
        raise OpenTransError(f"masked parameter {attr!r} of a {owner} changed shape from {tuple(mask.shape)} to "
                             f"{tuple(param.shape)}, so its mask no longer fits. {FSDP1_HINT}")
    store.params[attr] = param
    _REGISTRY[param] = (weakref.ref(store), attr)


def _refresh(store: _MaskStore) -> None:
    """Follow parameters replaced on the store's module since they were registered (cheap: identity checks)."""
    module = store.module
    if module is None:
        return
    parameters = module._parameters
    for attr in list(store):
        param = parameters.get(attr)
        if param is None and isinstance(module.__dict__.get(attr), torch.Tensor):
            # no longer a parameter but a plain tensor view: FSDP1 moved the weights into a flat parameter
            raise OpenTransError(f"masked parameter {attr!r} of a {type(module).__name__} became a view of a "
                                 f"flattened parameter. {FSDP1_HINT}")
        if param is not None and param is not store.params.get(attr):
            _bind(store, attr, param)


def _register_module(module: nn.Module) -> None:
    store = mask_store(module)
    if store is None:
        return
    _refresh(store)
    for attr, param in store.params.items():
        entry = _REGISTRY.get(param)
        if entry is None or entry[1] != attr or entry[0]() is not store:
            _REGISTRY[param] = (weakref.ref(store), attr)


def _zero_module(module: nn.Module) -> None:
    store = mask_store(module)
    if store is None:
        return
    with torch.no_grad():
        for attr, mask in store.items():
            param = store.params.get(attr)
            if param is None:
                continue
            if mask.device != param.device:
                mask = store[attr] = mask.to(param.device)
            zero_pruned_(param, mask)


def _load_state_dict_post_hook(module: nn.Module, incompatible_keys: Any) -> None:
    _register_module(module)
    _zero_module(module)


class _Seen:
    """Per optimizer: its state dict's id, the mask each parameter's state was cleared for, the after pass."""

    __slots__ = ("state_id", "cleared", "after", "__weakref__")

    def __init__(self, state_id: int):
        self.state_id = state_id
        self.cleared: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.after = False


def _masked_params(optimizer: torch.optim.Optimizer) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(parameter, keep-mask) for every parameter of ``optimizer`` that a mask store holds."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            mask = _mask_for(param)
            if mask is not None:
                yield param, mask


@torch.compiler.disable  # under torch.compile(opt.step): one eager call, not a trace per parameter
def _optimizer_pre_hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    if _PENDING:
        _drain_pending()
    for store in list(_STORES.values()):
        _refresh(store)
    seen = _SEEN.get(optimizer)
    # optimizer.load_state_dict installs a new state dict (made while the old one is alive, so its id
    # differs): state loaded from a checkpoint taken before the mask is cleared again
    if seen is None:
        warn_float16_eps(optimizer)
    if seen is None or seen.state_id != id(optimizer.state):
        seen = _SEEN[optimizer] = _Seen(id(optimizer.state))
    # Any optimizer but torch's elementwise ones (preconditioners such as Shampoo, LBFGS), or a closure that
    # recomputes gradients inside ``step`` after this hook ran, can move a pruned weight: re-zero after it
    # (``args`` starts with the optimizer itself: ``step(self, closure=None)``)
    closure = args[1] if len(args) > 1 else kwargs.get("closure")
    after = type(optimizer) not in _ELEMENTWISE or closure is not None
    cleared = seen.cleared
    with torch.no_grad():
        for param, mask in _masked_params(optimizer):
            if mask.shape != param.shape:  # same object, new data: FSDP1's flat views (use_orig_params)
                raise OpenTransError(f"a masked parameter now has shape {tuple(param.shape)}, its mask "
                                     f"{tuple(mask.shape)}. {FSDP1_HINT}")
            keep = local(mask)
            grad = param.grad
            low = param.dtype in _AFTER_STEP_DTYPES
            after = after or low
            if grad is not None and not grad.is_sparse:
                # one multiply: the cheapest pass (torch.where(out=) costs a second, hidden copy). A NaN/inf
                # gradient stays NaN there; GradScaler skips such steps, otherwise call enforce() after.
                # float16 gradients overflow easily and get the NaN-proof fill.
                if low:
                    local(grad).masked_fill_(~keep, 0)
                else:
                    local(grad).mul_(keep)
            if cleared.get(param) is not mask:
                # state from before this mask could move pruned weights: clear it there, once
                for value in optimizer.state.get(param, {}).values():
                    if isinstance(value, torch.Tensor) and value.shape == param.shape:
                        local(value).masked_fill_(~keep, 0)
                cleared[param] = mask
    seen.after = after


#: torch.optim classes whose update is elementwise: with a zero gradient, zero state and a zero weight at a
#: position, every one of them leaves exactly 0.0 there in float32/float64/bfloat16 (weight decay of 0 is 0,
#: Adam's 0 / (0 + eps) is 0), so their step needs no second pass over the weights unless a parameter is
#: float16. Exact types only: a subclass may override ``step``.
_ELEMENTWISE = tuple(getattr(torch.optim, name) for name in (
    "SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "Adadelta", "Adamax", "NAdam", "RAdam") if hasattr(torch.optim, name))


@torch.compiler.disable
def _optimizer_post_hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    # Gradients and state are clean, so a float32 multiply cannot meet NaN (and costs half of masked_fill_);
    # float16 steps may have written NaN (0 / 0), which only the fill repairs.
    seen = _SEEN.get(optimizer)
    if seen is not None and not seen.after:
        return
    with torch.no_grad():
        for param, mask in _masked_params(optimizer):
            if param.dtype in _AFTER_STEP_DTYPES:
                zero_pruned_(param, mask)
            else:
                local(param).mul_(local(mask))


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


def zero_pruned_(tensor: torch.Tensor, keep: torch.Tensor) -> None:
    """Set the pruned positions (``keep`` False) of ``tensor`` to 0.0 in place, this rank's rows when sharded
    (``masked_fill_``, not a multiply: NaN or inf times 0 is not 0)."""
    local(tensor).masked_fill_(~local(keep), 0)


def zeroed(tensor: torch.Tensor, keep: torch.Tensor, name: str | None = None) -> torch.Tensor:
    """A copy of ``tensor`` with its pruned positions set to 0.0; a sharded tensor (FSDP2, DCP) keeps its layout
    and zeroes this rank's rows of a whole or sharded ``keep``."""
    if is_dtensor(tensor):
        from .sharding import from_local_like

        return from_local_like(local(tensor).masked_fill(~local(shard_like(keep, tensor, name)), 0), tensor)
    return tensor.masked_fill(~keep.to(tensor.device), 0)


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
    logical AND of both masks (IMP rounds narrow an existing mask). On a model sharded by ``fully_shard``
    the masks may be full tensors (each rank keeps its own rows) or DTensors laid out like the parameters.
    """
    check_not_fsdp1(model)
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
        if is_dtensor(mask) and not is_dtensor(params[name]):
            raise OpenTransError("mask is a DTensor but the parameter is not sharded; nothing was applied",
                                 tensor=name)
    _ensure_global_hooks()
    prepared = {name: shard_like(mask, params[name], name) if is_dtensor(params[name]) else mask.to(params[name].device)
                for name, mask in masks.items()}
    for name, mask in prepared.items():
        module_name, attr = _split_name(name)
        module = model.get_submodule(module_name) if module_name else model
        param = params[name]
        store = mask_store(module)
        if store is None:
            store = _MaskStore(module=module)
            object.__setattr__(module, _ATTR, store)
            object.__setattr__(module, _HOOKS_ATTR,
                               [module.register_load_state_dict_post_hook(_load_state_dict_post_hook).id])
            _STORES[id(store)] = store
        else:
            _refresh(store)
        if attr in store:
            mask = _narrow(store[attr], mask)
        store[attr] = mask
        store.params[attr] = param
        _REGISTRY[param] = (weakref.ref(store), attr)
        with torch.no_grad():
            zero_pruned_(param, mask)


def _narrow(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``old & new``; for sharded masks on the local rows (they share one layout)."""
    if is_dtensor(new):
        from .sharding import from_local_like

        return from_local_like(local(shard_like(old, new)) & local(new), new)
    return old & new


def enforce(model: nn.Module) -> None:
    """Set every pruned weight of ``model`` to 0.0 again (for update loops outside ``torch.optim``)."""
    for module in model.modules():
        if _ATTR in module.__dict__:
            _register_module(module)
            _zero_module(module)
    _drain_pending()


def masked_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full parameter name -> keep-mask for every parameter ``model`` keeps sparse.

    On a model sharded by ``fully_shard`` the masks are bool DTensors holding this rank's rows
    (:func:`opentrans_hub.sparsity.verify.export_subnetwork` gathers whole masks).
    """
    out = {}
    for module_name, module in model.named_modules():
        store = mask_store(module)
        if store is None:
            continue
        _refresh(store)
        for attr, mask in store.items():
            out[f"{module_name}.{attr}" if module_name else attr] = mask
    return out


def is_masked(model: nn.Module) -> bool:
    return any(_ATTR in module.__dict__ for module in model.modules())


def _detach_masks(model: nn.Module, zero: bool) -> nn.Module:
    for module in model.modules():
        store = mask_store(module)
        if store is None:
            continue
        _register_module(module)
        if zero:
            _zero_module(module)
        for param in store.params.values():
            _REGISTRY.pop(param, None)
        for hook_id in module.__dict__.get(_HOOKS_ATTR, []):
            module._forward_pre_hooks.pop(hook_id, None)  # registered by 0.1.0, which masked in a forward pre-hook
            module._load_state_dict_post_hooks.pop(hook_id, None)
        store.params.clear()
        store.module = None
        _STORES.pop(id(store), None)
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
