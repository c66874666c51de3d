"""``opentrans-hub spectrum`` and ``select`` on real files: safetensors, weights-only .pth, arch ids."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from support.cli import main_in_process
from support.towers import make_tiny_resnet

from opentrans_hub.cli import main
from opentrans_hub.formats.selection import LayerSelection
from opentrans_hub.methods.select import select_layers
from opentrans_hub.methods.spectral import clear_cache, compute_metrics
from opentrans_hub.towers.backbones import BUILDERS, weights_sha256


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENTRANS_HUB_CACHE", str(tmp_path / "cache"))
    clear_cache()
    return tmp_path / "cache"


@pytest.fixture
def weights(tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_file(make_tiny_resnet(seed=1).state_dict(), str(path))
    return path


@pytest.fixture
def tiny_family():
    """A real open_clip ModifiedResNet registered as architecture family ``tiny`` (the BUILDERS extension point)."""
    BUILDERS["tiny"] = lambda name, tag: make_tiny_resnet(seed=5)
    yield "tiny/resnet"
    BUILDERS.pop("tiny", None)


def run_json(capsys, *argv):
    code, out, _ = main_in_process(capsys, *argv)
    assert code == 0
    out = out.strip().splitlines()
    assert len(out) == 1
    return json.loads(out[0])


def test_spectrum_json_on_a_state_dict_file(weights, capsys, tmp_path, cache_dir):
    data = run_json(capsys, "spectrum", str(weights), "--json", "--plot", str(tmp_path / "alpha.png"))
    assert data["weights_sha256"] == weights_sha256(make_tiny_resnet(seed=1).state_dict())
    expected = {m.name: m for m in compute_metrics(make_tiny_resnet(seed=1).state_dict(), cache=False)}
    names = [layer["name"] for layer in data["layers"]]
    assert sorted(names) == sorted(expected)
    # safetensors files keep no order: natural order (layer2 before layer10), blocks in order
    assert names.index("layer1.0.conv1.weight") < names.index("layer1.0.conv3.weight") < names.index(
        "layer2.0.conv1.weight")
    for layer in data["layers"]:
        assert {"name", "alpha", "D", "num_eigs"} <= set(layer) and "trainable" not in layer
        assert layer["alpha"] == pytest.approx(expected[layer["name"]].alpha, abs=1e-12)
        assert layer["num_eigs"] == expected[layer["name"]].num_eigs
    assert (tmp_path / "alpha.png").read_bytes()[:4] == b"\x89PNG"
    assert len(list(cache_dir.glob("spectral/*.json"))) == 1
    clear_cache()
    assert run_json(capsys, "spectrum", str(weights), "--json", "--plot", str(tmp_path / "alpha.png"),
                    "--overwrite") == data  # an existing plot is replaced only when asked


def test_spectrum_with_policy_and_xmin(weights, capsys):
    data = run_json(capsys, "spectrum", str(weights), "--json", "--xmin", "scan", "--policy", "count", "--count", "4")
    assert data["xmin"] == "scan" and data["policy"]["name"] == "count"
    assert sum(layer["trainable"] for layer in data["layers"]) == 4 == data["trainable"]
    top = sorted(data["layers"], key=lambda layer: -layer["alpha"])[:4]
    assert all(layer["trainable"] for layer in top)
    assert main(["spectrum", str(weights), "--policy", "median"]) == 0
    text = capsys.readouterr().out
    assert "frozen" in text and "layer1.0.conv2.weight" in text


def test_select_writes_a_selection_equal_to_the_python_api(weights, tmp_path, capsys):
    out = tmp_path / "sel.json"
    data = run_json(capsys, "select", str(weights), "--arch", "open_clip/RN50", "--out", str(out), "--json")
    selection = LayerSelection.load(out, expected_sha256=data["sha256"])
    state = make_tiny_resnet(seed=1).state_dict()
    expected = select_layers(compute_metrics(state, cache=False), "median", arch="open_clip/RN50")
    assert selection.sha256 == expected.sha256 and selection.trainable == expected.trainable
    assert selection.arch == "open_clip/RN50" and selection.weights_sha256 == weights_sha256(state)
    assert selection.policy["name"] == "median"
    assert selection.provenance["settings"]["xmin"] == "peak"


def test_pth_files_go_through_weights_only(tmp_path, capsys):
    good = tmp_path / "tiny.pth"
    torch.save({"model": make_tiny_resnet(seed=1).state_dict()}, good)
    data = run_json(capsys, "spectrum", str(good), "--json", "--no-cache")
    assert len(data["layers"]) == len(compute_metrics(make_tiny_resnet(seed=1), cache=False))

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"w": Payload()}))
    assert main(["spectrum", str(evil)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "evil.pth" in err[0] and "weights-only" in err[0]
    assert main(["select", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "x.json")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_arch_id_with_weights_file(tiny_family, weights, capsys, tmp_path):
    data = run_json(capsys, "spectrum", tiny_family, "--weights", str(weights), "--json", "--policy", "median")
    module_metrics = compute_metrics(make_tiny_resnet(seed=1), cache=False)
    assert data["arch"] == tiny_family
    assert [layer["name"] for layer in data["layers"]] == [m.name for m in module_metrics]  # network order
    assert [layer["alpha"] for layer in data["layers"]] == pytest.approx([m.alpha for m in module_metrics])
    wrong = tmp_path / "narrow.safetensors"
    save_file(make_tiny_resnet(width=8).state_dict(), str(wrong))
    assert main(["spectrum", tiny_family, "--weights", str(wrong)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "narrow.safetensors" in err[0] and "shape" in err[0]


def test_console_script_runs_in_a_real_process(weights, tmp_path):
    env = dict(os.environ, OPENTRANS_HUB_CACHE=str(tmp_path / "c"))
    proc = subprocess.run([sys.executable, "-m", "opentrans_hub", "select", str(weights), "--policy", "fraction",
                           "--fraction", "0.25", "--out", str(tmp_path / "s.json")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    selection = LayerSelection.load(tmp_path / "s.json")
    assert len(selection.trainable) == round(0.25 * len(selection.layers))
    assert str(tmp_path / "s.json") in proc.stdout


def test_a_safetensors_file_by_any_name_gets_the_network_order(weights, capsys, tmp_path, cache_dir, tiny_family):
    """The order is restored for what the file is (sniffed), not for what its name says."""
    renamed = tmp_path / "tiny-weights.bin"
    renamed.write_bytes(weights.read_bytes())
    args = ("--arch", tiny_family, "--json")
    by_suffix = [layer["name"] for layer in run_json(capsys, "spectrum", str(weights), *args)["layers"]]
    by_content = [layer["name"] for layer in run_json(capsys, "spectrum", str(renamed), *args)["layers"]]
    assert by_content == by_suffix and by_content != sorted(by_content)  # the tower's order, not the file's sorted one
