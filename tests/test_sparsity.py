"""Exact sparsity while training (issue 2, requirement 5), on real open_clip ModifiedResNet towers.

Every test trains a little for real (forward, backward, torch.optim step) and checks that the pruned
weights are exactly 0.0 afterwards, not merely small.
"""

from __future__ import annotations

import copy
import gc
import io
import math

import pytest
import torch
from support.sparsity import (
    OPTIMIZERS,
    assert_exact_zeros,
    assert_kept_moved,
    batch,
    conv_masks,
    snapshot,
    train_steps,
)
from support.towers import make_tiny_resnet
from torch import nn

from opentrans_hub import (
    NameMap,
    OpenTransError,
    Subnetwork,
    apply_masks,
    apply_subnetwork,
    apply_subnetwork_to_state_dict,
    bake,
    enforce,
    masked_parameters,
    model_sparsity,
)
from opentrans_hub.sparsity import masks as sparsity_mod


# ----------------------------------------------------------------------------- apply
def test_apply_zeroes_in_place_without_a_second_copy():
    model = make_tiny_resnet()
    masks = conv_masks(model)
    params_before = {n: (p, p.data_ptr()) for n, p in model.named_parameters()}
    keys_before = list(model.state_dict())
    apply_masks(model, masks)
    assert_exact_zeros(model, masks)
    # same parameter objects and storage: no weight_orig, no extra parameters or buffers
    for n, p in model.named_parameters():
        assert params_before[n][0] is p and p.data_ptr() == params_before[n][1]
    assert list(model.state_dict()) == keys_before
    assert not any(n.endswith(("_orig", "_mask")) for n, _ in model.named_buffers())
    assert set(masked_parameters(model)) == set(masks)
    assert all(m.dtype == torch.bool for m in masked_parameters(model).values())
    stats = model_sparsity(model)
    expected = sum(int((~m).sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert stats["sparsity"] >= expected  # random init has no exact zeros of its own
    assert math.isclose(stats["sparsity"], expected, rel_tol=1e-6)


def test_apply_subnetwork_all_or_nothing_on_shape_mismatch():
    model = make_tiny_resnet()
    masks = conv_masks(model)
    name = sorted(masks)[3]
    bad = dict(masks)
    bad[name] = torch.ones(tuple(d + 1 for d in masks[name].shape), dtype=torch.bool)
    before = snapshot(model)
    with pytest.raises(OpenTransError, match="nothing was applied"):
        apply_subnetwork(model, Subnetwork(bad, arch="open_clip/tiny"))
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])
    assert masked_parameters(model) == {}
    with pytest.raises(OpenTransError):
        apply_masks(model, {**masks, "layer9.0.conv1.weight": masks[name]})
    assert masked_parameters(model) == {}
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_apply_subnetwork_strict_and_report():
    model = make_tiny_resnet()
    masks = conv_masks(model)
    extra = {**masks, "transformer.resblocks.0.attn.in_proj_weight": torch.ones(6, 2, dtype=torch.bool)}
    sub = Subnetwork(extra, arch="open_clip/tiny")
    before = snapshot(model)
    with pytest.raises(OpenTransError, match="strict"):
        apply_subnetwork(model, sub, strict=True)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    report = apply_subnetwork(model, sub)
    assert len(report.mapped) == len(masks) and [s for s, _ in report.unmapped] == [
        "transformer.resblocks.0.attn.in_proj_weight"]
    assert_exact_zeros(model, masks)


def test_apply_twice_narrows_with_logical_and():
    model = make_tiny_resnet()
    first, second = conv_masks(model, 0.5, seed=1), conv_masks(model, 0.5, seed=2)
    apply_masks(model, first)
    apply_masks(model, second)
    both = {n: first[n] & second[n] for n in first}
    assert all(torch.equal(masked_parameters(model)[n], both[n]) for n in both)
    assert_exact_zeros(model, both)


# ----------------------------------------------------------------------------- optimizers
@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_zeros_exact_through_optimizer_steps(kind):
    model = make_tiny_resnet()
    masks = conv_masks(model)
    apply_masks(model, masks)
    before = snapshot(model)
    try:
        optimizer = OPTIMIZERS[kind](model.parameters())
    except (RuntimeError, TypeError) as exc:  # pragma: no cover - a variant this torch build lacks
        pytest.skip(f"{kind} unavailable: {exc}")
    train_steps(model, optimizer, steps=3)
    assert_exact_zeros(model, masks)
    assert_kept_moved(model, before, masks)


class MiniShampoo(torch.optim.Optimizer):
    """A non-elementwise update (left preconditioning, as Shampoo-like optimizers do): it moves weights whose
    gradient is zero, so only the after-step re-zeroing can keep the pruned weights at 0.0."""

    def __init__(self, params, lr: float = 0.01):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.reshape(p.shape[0], -1)
                left = g @ g.t() + 1e-3 * torch.eye(g.shape[0])
                p.sub_(group["lr"] * (left @ g).reshape(p.shape))


@pytest.mark.parametrize("make", [lambda p: torch.optim.LBFGS(p, lr=0.1, max_iter=3),
                                  lambda p: torch.optim.SGD(p, lr=0.1)], ids=["lbfgs", "sgd_closure"])
def test_closure_steps_and_lbfgs_stay_exact(make):
    """A closure recomputes gradients inside step(), after the pre-step hook: the after-step pass covers it."""
    model = make_tiny_resnet()
    masks = conv_masks(model)
    apply_masks(model, masks)
    before = snapshot(model)
    optimizer = make(model.parameters())

    def closure():
        optimizer.zero_grad()
        loss = model(batch(1)).pow(2).mean()
        loss.backward()
        return loss

    optimizer.step(closure)
    assert_exact_zeros(model, masks)
    assert_kept_moved(model, before, masks)


def test_non_elementwise_optimizer_is_re_zeroed_after_the_step():
    model = make_tiny_resnet()
    masks = conv_masks(model)
    apply_masks(model, masks)
    before = snapshot(model)
    train_steps(model, MiniShampoo(model.parameters(), lr=0.05), steps=2)
    assert_exact_zeros(model, masks)
    assert_kept_moved(model, before, masks)


@pytest.mark.parametrize("kind", ["sgd_momentum_wd", "adamw_wd_foreach", "adamw_wd_loop"])
def test_mask_applied_mid_training_clears_optimizer_state_once(kind):
    model = make_tiny_resnet()
    optimizer = OPTIMIZERS[kind](model.parameters())
    train_steps(model, optimizer, steps=2)  # momentum / Adam moments are non-zero everywhere now
    masks = conv_masks(model)
    state_tensors = [v for n in masks for v in optimizer.state[dict(model.named_parameters())[n]].values()
                     if isinstance(v, torch.Tensor) and v.dim() > 0]
    assert state_tensors and all(bool((v != 0).any()) for v in state_tensors)
    apply_masks(model, masks)
    train_steps(model, optimizer, steps=3, seed=10)
    assert_exact_zeros(model, masks)
    params = dict(model.named_parameters())
    for name, keep in masks.items():
        for key, value in optimizer.state[params[name]].items():
            if isinstance(value, torch.Tensor) and value.shape == keep.shape:
                assert bool((value[~keep] == 0).all()), f"{kind}: stale {key} of {name}"


def test_bake_then_momentum_does_not_regrow_pruned_weights():
    """After bake, SGD momentum at pruned positions must be zero, so zero-gradient steps keep the zeros."""
    model = make_tiny_resnet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train_steps(model, optimizer, steps=2)  # non-zero momentum everywhere before the mask
    masks = conv_masks(model)
    apply_masks(model, masks)
    train_steps(model, optimizer, steps=2, seed=5)
    baked = bake(model)
    assert baked is model and masked_parameters(model) == {}
    assert not sparsity_mod.is_masked(model)
    params = dict(model.named_parameters())
    for _ in range(3):  # steps whose gradients are zero: only stale momentum could move anything
        optimizer.zero_grad()
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
    assert_exact_zeros(model, masks)
    # and a plain module again: real gradients do move formerly pruned weights (the mask is gone)
    train_steps(model, optimizer, steps=1, seed=9)
    name = sorted(masks)[0]
    assert bool((params[name].detach()[~masks[name]] != 0).any())


def test_optimizer_state_loaded_after_masking_is_cleared_too():
    """Resuming an optimizer checkpoint taken before the mask must not smuggle stale momentum back in."""
    model = make_tiny_resnet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train_steps(model, optimizer, steps=2)
    dense_state = copy.deepcopy(optimizer.state_dict())
    masks = conv_masks(model)
    apply_masks(model, masks)
    train_steps(model, optimizer, steps=1, seed=3)
    optimizer.load_state_dict(dense_state)  # momentum non-zero at pruned positions again
    train_steps(model, optimizer, steps=1, seed=4)
    assert_exact_zeros(model, masks)
    bake(model)
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
    assert_exact_zeros(model, masks)


def test_bake_returns_plain_modules_that_pickle_and_load_anywhere():
    model = make_tiny_resnet()
    masks = conv_masks(model)
    apply_masks(model, masks)
    bake(model)
    for module in model.modules():
        assert sparsity_mod._ATTR not in module.__dict__
        assert sparsity_mod._HOOKS_ATTR not in module.__dict__
        assert not module._forward_pre_hooks  # nothing runs in forward (torch.compile traces it as dense)
        assert sparsity_mod._load_state_dict_post_hook not in module._load_state_dict_post_hooks.values()
    assert_exact_zeros(model, masks)
    plain = make_tiny_resnet(seed=3)
    plain.load_state_dict(model.state_dict())
    assert_exact_zeros(plain, masks)


def test_remove_drops_masks_without_touching_weights():
    model = make_tiny_resnet()
    masks = conv_masks(model)
    apply_masks(model, masks)
    params = dict(model.named_parameters())
    name = sorted(masks)[0]
    with torch.no_grad():
        params[name][~masks[name]] = 1.5  # a user edit after the last step
    assert sparsity_mod.remove(model) is model
    assert masked_parameters(model) == {}
    assert bool((params[name].detach()[~masks[name]] == 1.5).all())


# ----------------------------------------------------------------------------- autocast, dtype
def test_autocast_bf16_cpu_keeps_zeros():
    model = make_tiny_resnet()
    masks = conv_masks(model)
    apply_masks(model, masks)
    before = snapshot(model)
    train_steps(model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), steps=3, autocast=True)
    assert_exact_zeros(model, masks)
    assert_kept_moved(model, before, masks)


def test_model_moved_with_to_dtype_keeps_working():
    model = make_tiny_resnet()
    masks = conv_masks(model)
    apply_masks(model, masks)
    model.to(torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    before = snapshot(model)
    train_steps(model, torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1), steps=2)
    assert_exact_zeros(model, masks)
    assert_kept_moved(model, before, masks)
    model.to(torch.float64)  # and back up: masks still apply, dense re-load re-zeroes
    model.load_state_dict(make_tiny_resnet(seed=4).to(torch.float64).state_dict())
    assert_exact_zeros(model, masks)


def test_nan_gradients_are_repaired_by_enforce_and_apply():
    """NaN times 0 is NaN: a step on NaN gradients (no GradScaler) leaves NaN; enforce() sets exact zeros again."""
    model = make_tiny_resnet()
    masks = conv_masks(model)
    apply_masks(model, masks)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    params = dict(model.named_parameters())
    name = sorted(masks)[0]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    params[name].grad[~masks[name]] = float("nan")
    optimizer.step()
    enforce(model)
    assert_exact_zeros(model, masks)
    with torch.no_grad():
        params[name][~masks[name]] = float("inf")
    apply_masks(model, masks)  # applying (or narrowing) a mask also sets zeros, whatever was there
    assert_exact_zeros(model, masks)


# ----------------------------------------------------------------------------- state dicts, copies
def test_state_dict_round_trip_into_unpruned_model_and_dense_reload_rezeroes():
    model = make_tiny_resnet()
    masks = conv_masks(model)
    apply_masks(model, masks)
    train_steps(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), steps=2)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    plain = make_tiny_resnet(seed=7)
    plain.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    assert_exact_zeros(plain, masks)
    for (n, p), q in zip(model.named_parameters(), plain.parameters()):
        assert torch.equal(p, q), n
    # a dense checkpoint loaded into the masked model is re-zeroed by the load hook
    dense = make_tiny_resnet(seed=8).state_dict()
    model.load_state_dict(dense)
    assert_exact_zeros(model, masks)
    kept = sorted(masks)[0]
    assert torch.equal(dict(model.named_parameters())[kept][masks[kept]], dense[kept][masks[kept]])
    # and assign=True (new parameter objects) is re-registered and keeps training exact
    model.load_state_dict(make_tiny_resnet(seed=9).state_dict(), assign=True)
    assert_exact_zeros(model, masks)
    train_steps(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), steps=2)
    assert_exact_zeros(model, masks)


def test_deepcopy_and_pickle_carry_the_masks():
    model = make_tiny_resnet()
    masks = conv_masks(model)
    apply_masks(model, masks)
    clone = copy.deepcopy(model)
    assert set(masked_parameters(clone)) == set(masks)
    before = snapshot(clone)
    train_steps(clone, torch.optim.AdamW(clone.parameters(), lr=1e-2, weight_decay=0.1), steps=2)
    assert_exact_zeros(clone, masks)
    assert_kept_moved(clone, before, masks)
    # a copy stepped without any forward (no hook has run on it yet) is still exact
    clone2 = copy.deepcopy(model)
    optimizer = torch.optim.SGD(clone2.parameters(), lr=0.1)
    for p in clone2.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    assert_exact_zeros(clone2, masks)
    # whole-module pickling (torch.save of the module) round-trips with its masks
    buffer = io.BytesIO()
    torch.save(model, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)  # our own trusted bytes
    assert set(masked_parameters(loaded)) == set(masks)
    train_steps(loaded, torch.optim.SGD(loaded.parameters(), lr=0.1, momentum=0.9), steps=1)
    assert_exact_zeros(loaded, masks)


def test_original_unaffected_by_copy_and_registry_is_weak():
    model = make_tiny_resnet()
    masks = conv_masks(model)
    apply_masks(model, masks)
    gc.collect()
    size = len(sparsity_mod._REGISTRY)
    clone = copy.deepcopy(model)
    train_steps(clone, torch.optim.SGD(clone.parameters(), lr=0.1), steps=1)
    assert len(sparsity_mod._REGISTRY) > size
    del clone
    gc.collect()
    assert len(sparsity_mod._REGISTRY) == size
    train_steps(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=1)
    assert_exact_zeros(model, masks)


def test_enforce_for_update_loops_outside_torch_optim():
    model = make_tiny_resnet()
    masks = conv_masks(model)
    apply_masks(model, masks)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)  # a hand-written update (EMA, SWA, ...) that knows nothing of masks
    enforce(model)
    assert_exact_zeros(model, masks)


def test_apply_subnetwork_to_state_dict_and_through_a_name_map():
    model = make_tiny_resnet()
    masks = conv_masks(model)
    sub = Subnetwork(masks, arch="open_clip/tiny")
    wrapped = {f"backbone.visual.{k}": v for k, v in model.state_dict().items()}
    out, report = apply_subnetwork_to_state_dict(wrapped, sub, NameMap.prefix("backbone.visual."), strict=True)
    assert len(report.mapped) == len(masks)
    for name, keep in masks.items():
        assert bool((out[f"backbone.visual.{name}"][~keep] == 0).all())
        assert torch.equal(out[f"backbone.visual.{name}"][keep], wrapped[f"backbone.visual.{name}"][keep])
        assert bool((wrapped[f"backbone.visual.{name}"][~keep] != 0).any())  # input untouched
    holder = nn.Module()
    holder.backbone = nn.Module()
    holder.backbone.visual = model
    apply_subnetwork(holder, sub, NameMap.prefix("backbone.visual."), strict=True)
    train_steps(model, torch.optim.SGD(holder.parameters(), lr=0.1, momentum=0.9), steps=1)
    assert_exact_zeros(model, masks)


def test_unmasked_optimizers_and_models_are_untouched():
    masked = make_tiny_resnet()
    apply_masks(masked, conv_masks(masked))
    other = make_tiny_resnet(seed=1)
    before = snapshot(other)
    optimizer = torch.optim.SGD(other.parameters(), lr=0.1)
    for p in other.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    for n, p in other.named_parameters():
        assert torch.equal(p, before[n] - 0.1), n


# ----------------------------------------------------------------------------- the full RN50 tower
def test_rn50_tower_one_training_step_exact(rn50_visual):
    model = rn50_visual
    masks = conv_masks(model)
    assert len(masks) == 54
    apply_masks(model, masks)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    model.train()
    optimizer.zero_grad()
    model(torch.randn(2, 3, 224, 224)).pow(2).mean().backward()
    optimizer.step()
    assert_exact_zeros(model, masks)
    assert math.isclose(model_sparsity(model)["sparsity"], 0.89, abs_tol=0.002)
