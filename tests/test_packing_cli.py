"""``opentrans-hub pack / unpack / inspect`` through the installed console script, in fresh processes."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from support.artefacts import pruned_checkpoint, same
from support.cli import command


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OPENTRANS_HUB_HOME": str(cwd / "home"), "OMP_NUM_THREADS": "1"}
    return subprocess.run(command() + [*args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


@pytest.fixture
def files(tmp_path):
    checkpoint, sub = pruned_checkpoint(seed=5)
    torch.save(checkpoint, tmp_path / "model_final.pth")
    sub.save(tmp_path / "mask.safetensors")
    return tmp_path, checkpoint, sub


@pytest.mark.slow
def test_pack_inspect_unpack_round_trip(files):
    folder, checkpoint, sub = files
    packed = cli("pack", "model_final.pth", "--subnetwork", "mask.safetensors", "--out", "model.sparse.safetensors",
                 "--json", cwd=folder)
    assert packed.returncode == 0, packed.stderr
    info = json.loads(packed.stdout)
    assert info["subnetwork_sha256"] == sub.sha256 and info["packed_bytes"] == (folder / info["out"]).stat().st_size

    shown = cli("inspect", "model.sparse.safetensors", "--json", cwd=folder)
    assert shown.returncode == 0, shown.stderr
    stats = json.loads(shown.stdout)
    assert stats["dense_bytes"] == info["dense_bytes"] and stats["file_bytes"] == info["packed_bytes"]
    assert stats["subnetwork_sha256"] == sub.sha256 and len(stats["layers"]) == len(sub)
    layer = next(x for x in stats["layers"] if x["name"] == "model.backbone.visual.layer1.0.conv2.weight")
    assert layer["kept"] == int(sub["layer1.0.conv2.weight"].sum()) and layer["packed_bytes"] < layer["dense_bytes"]
    text = cli("inspect", "model.sparse.safetensors", cwd=folder)
    assert text.returncode == 0, text.stderr
    assert "dense" in text.stdout and "layer1.0.conv2.weight" in text.stdout

    back = cli("unpack", "model.sparse.safetensors", "--out", "restored.pth", cwd=folder)
    assert back.returncode == 0, back.stderr
    assert same(checkpoint, torch.load(folder / "restored.pth", weights_only=True))


@pytest.mark.slow
def test_refusals_are_one_line_exit_2(files):
    folder, checkpoint, sub = files
    before = (folder / "model_final.pth").read_bytes()
    over = cli("pack", "model_final.pth", "--zeros", "--out", "./model_final.pth", cwd=folder)
    assert over.returncode == 2 and len(over.stderr.strip().splitlines()) == 1 and "also an input" in over.stderr
    assert (folder / "model_final.pth").read_bytes() == before

    key = "backbone.visual.layer2.0.conv2.weight"
    pruned = (~sub["layer2.0.conv2.weight"]).reshape(-1).nonzero().reshape(-1)
    checkpoint["model"][key].view(-1)[pruned[:3]] = 1.0
    torch.save(checkpoint, folder / "dirty.pth")
    dirty = cli("pack", "dirty.pth", "--subnetwork", "mask.safetensors", "--out", "d.safetensors", cwd=folder)
    assert dirty.returncode == 2 and len(dirty.stderr.strip().splitlines()) == 1
    assert f"'{key}'" in dirty.stderr and "3 pruned positions are not zero" in dirty.stderr
    assert not (folder / "d.safetensors").exists()
    forced = cli("pack", "dirty.pth", "--subnetwork", "mask.safetensors", "--out", "d.safetensors", "--force-zero",
                 "--dtype", "bf16", cwd=folder)
    assert forced.returncode == 0 and "--force-zero" in forced.stdout and "bf16" in forced.stdout

    exists = cli("pack", "dirty.pth", "--subnetwork", "mask.safetensors", "--out", "d.safetensors", "--force-zero",
                 cwd=folder)
    assert exists.returncode == 2 and "pass --overwrite" in exists.stderr
    unpacked = cli("unpack", "d.safetensors", "--out", "d.safetensors", "--overwrite", cwd=folder)
    assert unpacked.returncode == 2 and "also an input" in unpacked.stderr and "Traceback" not in unpacked.stderr
