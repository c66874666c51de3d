"""``opentrans-hub inspect`` and ``import`` (requirement 6) through real subprocesses of the installed script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.cli import command, one_line_error
from support.towers import make_tiny_resnet
from torch import nn
from torch.nn.utils import prune

from opentrans_hub import Subnetwork
from opentrans_hub.formats.subnetwork import default_provenance

PREFIX = "backbone.clip_model.visual."


def cli(*args: str, check: int | None = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run(command() + [str(a) for a in args], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check is not None:
        assert proc.returncode == check, proc.stderr[-2000:]
    return proc


@pytest.fixture(scope="module")
def sub_file(tmp_path_factory) -> tuple[Path, Subnetwork]:
    gen = torch.Generator().manual_seed(0)
    model = make_tiny_resnet()
    names = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Conv2d)][1:]
    params = dict(model.named_parameters())
    sub = Subnetwork({n: torch.rand(params[n].shape, generator=gen) > 0.89 for n in names}, arch="open_clip/tiny",
                     provenance=default_provenance("random", sparsity=0.89))
    path = sub.save(tmp_path_factory.mktemp("cli") / "tiny.safetensors")
    return path, sub


def test_inspect_json(sub_file):
    path, sub = sub_file
    proc = cli("inspect", path, "--json")
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    info = json.loads(lines[0])
    assert info["arch"] == "open_clip/tiny" and info["sha256"] == sub.sha256
    assert info["sparsity"] == pytest.approx(sub.sparsity)
    assert info["masked_params"] == sub.masked and info["kept_params"] == sub.kept
    assert info["bytes"] == path.stat().st_size
    assert info["bits_per_weight"] == pytest.approx(8 * path.stat().st_size / sub.numel)
    assert [layer["name"] for layer in info["layers"]] == list(sub)
    for layer in info["layers"]:
        assert layer["shape"] == list(sub[layer["name"]].shape)
        assert layer["sparsity"] == pytest.approx(1 - sub[layer["name"]].float().mean().item())
    assert info["provenance"]["method"] == "random"


def test_inspect_text(sub_file):
    path, sub = sub_file
    out = cli("inspect", path).stdout
    assert "open_clip/tiny" in out and sub.sha256[:16] in out
    assert f"{sub.sparsity:.2%}" in out
    assert all(name in out for name in sub)


@pytest.mark.slow
def test_import_detectron2_checkpoint_then_inspect(tmp_path):
    model = make_tiny_resnet()
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)][1:]
    for _, conv in convs:
        prune.l1_unstructured(conv, "weight", amount=0.89)
    masks = {f"{n}.weight": conv.weight_mask.bool() for n, conv in convs}
    state = {f"module.{PREFIX}{k}": v for k, v in model.state_dict().items()}
    torch.save({"model": state, "iteration": 100}, tmp_path / "model_final.pth")
    out = tmp_path / "masks" / "tiny.safetensors"
    proc = cli("import", tmp_path / "model_final.pth", "--out", out, "--arch", "open_clip/tiny", "--prefix", PREFIX,
               "--encoding", "zstd", "--json")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    sub = Subnetwork.load(out)
    assert summary["sha256"] == sub.sha256 and summary["layers"] == len(masks) and summary["arch"] == "open_clip/tiny"
    assert sorted(sub) == sorted(masks) and all(torch.equal(sub[n], masks[n]) for n in masks)
    info = json.loads(cli("inspect", out, "--json").stdout)
    assert info["sha256"] == sub.sha256 and info["arch"] == "open_clip/tiny"
    # the baked variant (prune.remove: zeros in plain weights) gives the same subnetwork
    for _, conv in convs:
        prune.remove(conv, "weight")
    torch.save({"model": {f"module.{PREFIX}{k}": v for k, v in model.state_dict().items()}}, tmp_path / "baked.pth")
    cli("import", tmp_path / "baked.pth", "--out", tmp_path / "baked.safetensors", "--arch", "open_clip/tiny",
        "--prefix", PREFIX, "--from-zeros")
    assert Subnetwork.load(tmp_path / "baked.safetensors").sha256 == sub.sha256


@pytest.mark.slow
def test_errors_are_one_line_naming_file_and_tensor(tmp_path, sub_file):
    path, sub = sub_file
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(bytes(data))
    one_line_error(cli("inspect", bad, "--json", check=2), str(bad), "hash mismatch")
    # a tensor-level defect names the tensor
    from safetensors.numpy import save

    meta = {"format": "opentrans-hub/subnetwork", "format_version": "1", "encoding": "packbits", "arch": "a",
            "shapes": json.dumps({"layer1.0.conv1.weight": [4, 4]}), "provenance": "{}", "sha256": "0" * 64}
    import numpy as np

    (tmp_path / "dtype.safetensors").write_bytes(save({"layer1.0.conv1.weight": np.zeros(2, np.float32)},
                                                      metadata=meta))
    one_line_error(cli("inspect", tmp_path / "dtype.safetensors", check=2), "dtype.safetensors",
                          "tensor 'layer1.0.conv1.weight'")
    one_line_error(cli("inspect", tmp_path / "missing.safetensors", check=2), "missing.safetensors")
    torch.save(make_tiny_resnet(), tmp_path / "module.pth")  # a pickle that is not weights-only
    one_line_error(cli("import", tmp_path / "module.pth", "--out", tmp_path / "x.safetensors", check=2),
                          "module.pth", "weights-only")
    assert not (tmp_path / "x.safetensors").exists()
    (tmp_path / "blocked").mkdir()  # the output path is a folder: a clear line, not an OSError traceback
    torch.save({"w_mask": torch.ones(2, 2), "w_orig": torch.ones(2, 2)}, tmp_path / "ok.pth")
    one_line_error(cli("import", tmp_path / "ok.pth", "--out", tmp_path / "blocked", check=2), "blocked")
    debug = cli("--debug", "inspect", bad, check=None)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "OpenTransError" in debug.stderr


def test_python_dash_m_and_version():
    proc = subprocess.run([sys.executable, "-m", "opentrans_hub", "--version"], capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0 and proc.stdout.startswith("opentrans-hub ")
