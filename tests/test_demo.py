"""The main job end to end: ``opentrans-hub demo --quick --json`` in a real subprocess, checked on its summary."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from opentrans_hub.towers.backbones import build_visual
from opentrans_hub.zoo.registry import Registry

CLI = [sys.executable, "-m", "opentrans_hub"]
pytestmark = pytest.mark.slow  # one demo run (about two minutes on 2 cores) feeds every test here


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("demo")
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MPLBACKEND": "Agg"}
    proc = subprocess.run([*CLI, "demo", "--out", str(out), "--quick", "--json", "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    return summary, out


def test_writes_its_artefacts(demo):
    summary, out = demo
    for name in ("summary.json", "alpha.png", "sparsity.png"):
        assert (out / name).stat().st_size > 1000
    assert (out / "alpha.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "summary.json").read_text()) == summary
    assert [fw["plugin"] for fw in summary["frameworks"]] == ["fcclip", "hanovs", "deeplabv3-torchvision"]


def test_registry_round_trip_and_subnetwork_sparsity(demo):
    summary, out = demo
    registry = Registry(root=out / "registry")
    sub = registry.get_subnetwork(summary["subnetwork"]["name"])
    assert sub.sha256 == summary["subnetwork"]["sha256"]
    # two rounds at 50 % of the remaining weights: 75 % of the scope, within one weight per layer
    assert abs(sub.sparsity - 0.75) <= len(sub) / sub.numel
    assert "conv1.weight" not in sub and len(sub) == 54
    if summary["hub"]["torch_hub"] == "ok":
        assert summary["hub"]["torch_hub_sha256"] == sub.sha256


def test_sparsity_survives_fine_tuning_on_every_framework(demo):
    summary, _ = demo
    for fw in summary["frameworks"]:
        assert fw["zeros_after"] == fw["zeros_before"] > 0, fw["framework"]
        assert fw["sparsity_after"] == fw["sparsity_before"]
        assert math.isfinite(fw["loss_last"])  # trained: not NaN, not inf


def test_trainable_parameters_match_the_selection(demo):
    summary, out = demo
    selection = Registry(root=out / "registry").get_selection(summary["selection"]["name"])
    tower = dict(build_visual("open_clip/RN50").named_parameters())
    selected = 0
    for name, trainable in selection.params.items():
        if trainable:
            selected += tower[name].numel()
            bias = name.removesuffix("weight") + "bias"
            selected += tower[bias].numel() if name.endswith("weight") and bias in tower else 0
    head = 2048 * 5 + 5  # the 1x1 conv segmentation head of the FC-CLIP layout (5 classes)
    fcclip = summary["frameworks"][0]
    assert fcclip["trainable_params"] == selected + head
    # Han et al. drops attention pooling: its attnpool layers find no parameter and train nothing
    attnpool = sum(tower[n].numel() + tower[n.removesuffix("weight") + "bias"].numel()
                   for n, t in selection.params.items() if t and n.startswith("attnpool.") and n.endswith("weight"))
    assert summary["frameworks"][1]["trainable_params"] == selected - attnpool + head


def test_flops_count_only_kept_weights(demo):
    summary, out = demo
    sub = Registry(root=out / "registry").get_subnetwork(summary["subnetwork"]["name"])
    density = {name: float(mask.sum()) / mask.numel() for name, mask in sub.masks.items()}
    for fw in summary["frameworks"]:
        layers = fw["inference_layers"]
        assert len(layers) == fw["masked_tensors"] == fw["mapped"]
        saved = 0
        for layer in layers:
            assert layer["sparse"] == round(layer["dense"] * layer["density"])
            saved += layer["dense"] - layer["sparse"]
        assert fw["inference_flops_sparse"] == fw["inference_flops_dense"] - saved
        assert sorted(round(layer["density"], 9) for layer in layers) == sorted(
            round(d, 9) for name, d in density.items()
            if fw["plugin"] != "deeplabv3-torchvision" or not name.startswith(("conv2", "conv3")))
        assert fw["train_flops_selected"] < fw["train_flops_full"]
        assert fw["train_flops_ratio"] == pytest.approx(fw["train_flops_selected"] / fw["train_flops_full"])


def test_demo_refuses_a_weights_file_that_does_not_fit(tmp_path):
    bad = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file

    save_file({"conv1.weight": torch.zeros(3, 3)}, str(bad))
    proc = subprocess.run([*CLI, "demo", "--out", str(tmp_path / "o"), "--quick", "--weights", str(bad),
                           "--no-progress"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert str(bad) in proc.stderr and "Traceback" not in proc.stderr
