"""``select --policy alpha-lr`` / ``--lr-range`` and ``inspect`` of a budget, through the real command line."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import save_file
from support.cli import assert_refused, main_in_process, run_cli
from support.towers import make_tiny_resnet

from opentrans_hub.formats.selection import LayerSelection
from opentrans_hub.methods.spectral import clear_cache, compute_metrics


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENTRANS_HUB_CACHE", str(tmp_path / "cache"))
    clear_cache()


@pytest.fixture
def weights(tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_file(make_tiny_resnet(seed=1).state_dict(), str(path))
    return path


def _expected_scales(lo, hi):
    """Hand formula over the tiny tower's alphas, by name."""
    alphas = {m.name: m.alpha for m in compute_metrics(make_tiny_resnet(seed=1).state_dict(), cache=False)}
    known = [a for a in alphas.values() if a == a]
    low, high = min(known), max(known)
    return {n: 1.0 if a != a else lo + (hi - lo) * (a - low) / (high - low) for n, a in alphas.items()}


def test_alpha_lr_writes_every_layer_trainable_with_its_scale(weights, tmp_path, capsys):
    out = tmp_path / "budget.json"
    code, text, _ = main_in_process(capsys, "select", weights, "--arch", "open_clip/RN50", "--policy", "alpha-lr",
                                    "--out", out)
    assert code == 0 and "lr budget: scales 0.500..1.500" in text
    sel = LayerSelection.load(out)
    assert sel.frozen == [] and sel.policy["lr_range"] == [0.5, 1.5]
    expected = _expected_scales(0.5, 1.5)
    for layer in sel.layers:
        assert layer["lr_scale"] == pytest.approx(expected[layer["name"]], abs=1e-12), layer["name"]
    assert min(expected.values()) == pytest.approx(0.5) and max(expected.values()) == pytest.approx(1.5)


def test_lr_range_on_the_median_policy_keeps_its_frozen_layers(weights, tmp_path, capsys):
    out = tmp_path / "median.json"
    code, text, _ = main_in_process(capsys, "select", weights, "--arch", "open_clip/RN50", "--lr-range", "1", "2",
                                    "--out", out, "--json")
    data = json.loads(text)
    sel = LayerSelection.load(out, expected_sha256=data["sha256"])
    assert sel.policy["name"] == "median" and sel.frozen and sel.trainable
    plain = LayerSelection.load(out).reselect("median")
    assert [x["trainable"] for x in plain.layers] == [x["trainable"] for x in sel.layers]
    expected = _expected_scales(1.0, 2.0)
    assert data["lr_scales"] == pytest.approx(expected)
    code, text, _ = main_in_process(capsys, "inspect", out)
    assert code == 0 and "lr budget: scales 1.000..2.000" in text and "lr scale" in text
    fastest = max(expected, key=expected.get)
    assert f"fastest: {fastest} x2.000" in text
    frozen = sel.frozen[0]
    row = next(line for line in text.splitlines() if line.startswith(frozen + " "))
    assert "frozen" in row and row.split()[-1] == f"{expected[frozen]:.3f}"
    code, text, _ = main_in_process(capsys, "inspect", out, "--json")
    assert code == 0 and json.loads(text)["lr_scales"] == pytest.approx(expected)


def test_bad_lr_ranges_and_bad_scales_are_one_line_refusals(weights, tmp_path):
    for lo, hi, needle in (("2", "1", "0 < LO <= HI"), ("0", "1", "0 < LO <= HI"), ("nan", "1", "0 < LO <= HI")):
        assert_refused(tmp_path, "select", weights.name, "--policy", "alpha-lr", "--lr-range", lo, hi, "--out",
                       "b.json", needles=(needle,))
    sel = LayerSelection([{"name": "conv1.weight", "trainable": True, "lr_scale": 2.0}], arch="open_clip/RN50")
    data = json.loads(sel.to_json())  # a copy: to_dict shares the layer objects
    data["layers"][0]["lr_scale"] = -2.0
    (tmp_path / "neg.json").write_text(json.dumps(data))
    assert_refused(tmp_path, "inspect", "neg.json", needles=("neg.json", "conv1.weight", "finite number > 0"))
    sel.save(tmp_path / "ok.json")
    assert run_cli(tmp_path, "inspect", "ok.json").returncode == 0
