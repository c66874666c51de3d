"""``opentrans-hub prune`` on the real open_clip RN50 tower, weights from a local file."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from opentrans_hub import Subnetwork
from opentrans_hub.cli import main
from opentrans_hub.methods.imp import imp_sparsity, magnitude_prune
from opentrans_hub.towers.backbones import build_visual, weights_sha256


@pytest.fixture(scope="module")
def rn50_file(tmp_path_factory):
    """A whole-CLIP-style RN50 state dict (``visual.`` prefix) saved as safetensors, seeded random init."""
    from safetensors.torch import save_file

    torch.manual_seed(11)
    visual = build_visual("open_clip/RN50")
    path = tmp_path_factory.mktemp("weights") / "rn50.safetensors"
    save_file({f"visual.{k}": v.contiguous() for k, v in visual.state_dict().items()}, str(path))
    return path, weights_sha256(visual), visual


def _run_json(capsys, *argv: str) -> dict:
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.slow
def test_one_shot_from_a_local_file(rn50_file, tmp_path, capsys):
    path, sha, visual = rn50_file
    out = tmp_path / "rn50.safetensors"
    info = _run_json(capsys, "prune", "--arch", "open_clip/RN50", "--pretrained", str(path), "--sparsity", "0.89",
                     "--out", str(out), "--json")
    sub = Subnetwork.load(out)
    assert info["sha256"] == sub.sha256 and info["base_weights_sha256"] == sha
    assert sub.provenance["base_weights_sha256"] == sha and sub.provenance["pretrained"] == str(path)
    assert sub.arch == "open_clip/RN50" and len(sub) == 54 and "conv1.weight" not in sub
    assert sub.numel == 23_473_152
    assert abs(sub.masked - 0.89 * sub.numel) <= 1
    expected = magnitude_prune(visual, sparsity=0.89, apply=False, arch="open_clip/RN50")  # the same, by the API
    assert expected.sha256 == sub.sha256


@pytest.mark.slow
def test_rounds_equal_one_shot_at_the_compounded_sparsity_and_zstd(rn50_file, tmp_path, capsys):
    path, _, visual = rn50_file
    out = tmp_path / "r.safetensors"
    info = _run_json(capsys, "prune", "--arch", "open_clip/RN50", "--pretrained", str(path), "--rounds", "3",
                     "--rate", "0.1", "--min-density", "0.01", "--encoding", "zstd", "--out", str(out), "--json")
    sub = Subnetwork.load(out)
    assert info["encoding"] == "zstd" and info["empty_layers"] == 0
    assert sub.provenance["method"] == "imp-oneshot" and sub.provenance["settings"]["rounds"] == 3
    assert abs(sub.masked - imp_sparsity(0.1, 3) * sub.numel) <= 1
    # without retraining, compounding rounds rank the same fixed weights: one shot gives the same masks
    from opentrans_hub.methods.imp import PruneScope

    one_shot = magnitude_prune(visual, sparsity=imp_sparsity(0.1, 3), apply=False, arch="open_clip/RN50",
                               scope=PruneScope(min_density=0.01))
    assert one_shot.sha256 == sub.sha256


def test_scope_flags_and_random_init(tmp_path, capsys):
    out = tmp_path / "l.safetensors"
    info = _run_json(capsys, "prune", "--arch", "open_clip/RN50", "--seed", "1", "--sparsity", "0.5", "--linear",
                     "--no-conv", "--layerwise", "--out", str(out), "--json")
    sub = Subnetwork.load(out)
    assert set(sub.masks) == {f"attnpool.{p}_proj.weight" for p in "qkvc"}
    assert all(abs(layer.masked - layer.numel / 2) <= 0.5 for layer in sub.layers())
    assert sub.provenance["seed"] == 1 and info["layers"] == 4


@pytest.mark.slow
def test_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    cmd = [sys.executable, "-m", "opentrans_hub", "prune", "--arch", "open_clip/RN50", "--sparsity", "1.5",
           "--out", str(tmp_path / "x.safetensors")]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("opentrans-hub prune: error: --sparsity")
    code = main(["prune", "--arch", "open_clip/RN50", "--sparsity", "0.5", "--pretrained", str(tmp_path / "none.pt"),
                 "--out", str(tmp_path / "y.safetensors")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "none.pt" in err[0]
    assert not (tmp_path / "y.safetensors").exists()
