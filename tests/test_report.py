"""FLOPs (dense, sparse, training with frozen layers), parameter counts and plots on real modules."""

from __future__ import annotations

import pytest
import torch
from support.towers import make_tiny_resnet
from torch import nn

from opentrans_hub.errors import OpenTransError
from opentrans_hub.formats.subnetwork import Subnetwork
from opentrans_hub.methods.costs import count_flops, parameter_counts, selection_training_flops, sparse_inference_flops
from opentrans_hub.methods.plots import plot_alpha, plot_sparsity
from opentrans_hub.methods.select import select_layers
from opentrans_hub.methods.spectral import compute_metrics
from opentrans_hub.sparsity.masks import apply_masks


def convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 8 * 8, 10))


X = torch.randn(2, 3, 8, 8)
CONV_A = 2 * 2 * 8 * 8 * 8 * 3 * 9   # 2 FLOPs per MAC x batch x H x W x out x in x k
CONV_B = 2 * 2 * 8 * 8 * 16 * 8 * 9
FC = 2 * 2 * 1024 * 10


def test_forward_flops_per_module():
    report = count_flops(convnet(), X)
    assert report.by_module == {"0": CONV_A, "2": CONV_B, "5": FC}
    assert report.total == CONV_A + CONV_B + FC and not report.train


def test_training_flops_skip_what_torch_skips_for_frozen_weights():
    model = convnet()
    full = count_flops(model, X, train=True)
    # backward: weight grads for every layer, input grads for all but the first conv (the image needs none)
    assert full.total == 2 * (CONV_A + CONV_B + FC) + CONV_B + FC
    assert all(p.grad is None for p in model.parameters())  # grads cleared again
    for p in model[0].parameters():
        p.requires_grad_(False)
    first_frozen = count_flops(model, X, train=True)
    assert first_frozen.by_module["0"] == CONV_A  # forward only
    # and conv b no longer needs its input gradient either: nothing before it trains
    assert first_frozen.by_module["2"] == 2 * CONV_B
    assert first_frozen.total == full.total - CONV_A - CONV_B
    for p in model[5].parameters():
        p.requires_grad_(False)
    # the head is frozen but conv b trains: the head still pays its input gradient, not its weight gradient
    assert count_flops(model, X, train=True).by_module["5"] == 2 * FC
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(OpenTransError, match="frozen"):
        count_flops(model, X, train=True)


def test_sparse_inference_flops_and_parameter_counts():
    model = convnet()
    mask = torch.zeros_like(model[2].weight, dtype=torch.bool)
    mask.view(-1)[: mask.numel() // 4] = True
    apply_masks(model, {"2.weight": mask})
    report = sparse_inference_flops(model, X)
    assert report["dense"] == CONV_A + CONV_B + FC
    assert report["sparse"] == CONV_A + CONV_B // 4 + FC
    assert report["layers"] == [{"name": "2", "dense": CONV_B, "sparse": CONV_B // 4, "density": 0.25}]
    counts = parameter_counts(model)
    total = sum(p.numel() for p in model.parameters())
    assert counts == {"total": total, "kept": total - mask.numel() * 3 // 4, "masked": mask.numel(),
                      "pruned": mask.numel() * 3 // 4, "trainable": total, "frozen": 0}


def test_selection_training_flops_on_the_tiny_tower_restores_flags():
    model = make_tiny_resnet()
    model.layer1[0].conv1.weight.requires_grad_(False)
    selection = select_layers(compute_metrics(model), "median")
    x = torch.randn(2, 3, 64, 64)
    result = selection_training_flops(model, x, selection)
    assert result["selected_train_flops"] < result["full_train_flops"]
    assert result["flops_ratio"] == result["selected_train_flops"] / result["full_train_flops"]
    assert result["selected_trainable_params"] < result["full_trainable_params"]
    assert not model.layer1[0].conv1.weight.requires_grad and model.layer1[0].conv2.weight.requires_grad
    forward = count_flops(model, x).total
    assert forward < result["selected_train_flops"] < 3 * forward


def test_plots_write_png(tmp_path):
    model = make_tiny_resnet()
    metrics = compute_metrics(model)
    selection = select_layers(metrics, "median")
    for target, path in ((selection, tmp_path / "sel.png"), (metrics, tmp_path / "metrics.png")):
        written = plot_alpha(target, path, title="tiny")
        assert written == path and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    masks = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(0)) > 0.3
             for n, p in model.named_parameters() if p.dim() == 4}
    sub = Subnetwork(masks, arch="open_clip/RN50")
    out = plot_sparsity(sub, tmp_path / "sparsity.png")
    assert out.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(OpenTransError, match="nothing to plot"):
        plot_alpha([], tmp_path / "empty.png")
