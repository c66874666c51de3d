"""``opentrans-hub map``, ``--write-plugin`` and the ``auto`` plugin through the installed script (real processes).

The subprocesses see the small test architectures (``support.towers``) through a ``sitecustomize`` module on
their PYTHONPATH (with ``tests/``) that registers them with open_clip, the way a user adds a model config.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from support.cli import command, main_in_process, one_line_error
from support.layouts import d2_layout, han_layout, resolved
from support.processes import TESTS, pip_install, python_env
from support.towers import RN_TINY, finetuned, register, tower

from opentrans_hub import Subnetwork
from opentrans_hub.io.checkpoints import write_checkpoint
from opentrans_hub.transfer.discovery import get_plugin


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    register()
    tmp = tmp_path_factory.mktemp("map_cli")
    custom = tmp / "custom"
    custom.mkdir()
    (custom / "sitecustomize.py").write_text("from support import towers\ntowers.register()\n")
    visual = tower(RN_TINY, seed=3)
    model = d2_layout(finetuned(visual))
    torch.save({"model": model.state_dict(), "iteration": 7}, tmp / "d2.pth")
    write_checkpoint(tmp / "rn.safetensors", visual.state_dict())
    torch.save({"model": han_layout(visual, res_atten=True).state_dict()}, tmp / "kd.pth")
    gen = torch.Generator().manual_seed(1)
    masks = {n: torch.rand(p.shape, generator=gen) < 0.5 for n, p in visual.named_parameters()
             if n.endswith("weight") and p.dim() >= 2}
    Subnetwork(masks, arch=RN_TINY).save(tmp / "sub.safetensors")
    return {"tmp": tmp, "custom": custom, "ckpt": tmp / "d2.pth", "weights": tmp / "rn.safetensors",
            "kd": tmp / "kd.pth", "sub": tmp / "sub.safetensors", "state": model.state_dict()}


def cli(files: dict[str, Path], *args: str, site: Path | None = None, tiny: bool = True) -> subprocess.CompletedProcess:
    path = ([files["custom"], TESTS] if tiny else []) + ([site] if site else [])
    env = python_env(*path, OMP_NUM_THREADS="1")
    return subprocess.run(command() + [*map(str, args)], capture_output=True, text=True, timeout=300, env=env)


def last_json(proc: subprocess.CompletedProcess) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])




def test_map_prints_a_table_errors_in_one_line_and_tower_chooses(files, capsys, tmp_path):
    code, out, _ = main_in_process(capsys, "map", files["ckpt"], "--arch", RN_TINY)
    assert code == 0
    assert "tower 'backbone.'" in out and "res{g1+1}" in out and "# " in out
    assert "unmapped  attnpool.c_proj.weight" in out
    code, out, _ = main_in_process(capsys, "map", files["kd"], "--arch", RN_TINY, "--tower", "backbone.", "--json")
    assert code == 0 and json.loads(out.splitlines()[-1])["tower"] == "backbone."
    for args, needle in [(("map", tmp_path / "missing.pth", "--arch", RN_TINY), "no such file"),
                         (("map", files["ckpt"], "--arch", RN_TINY, "--write-plugin", tmp_path / "p"), "--name"),
                         (("map", files["ckpt"], "--arch", "open_clip/no-such-model"), "no-such-model")]:
        code, out, err = main_in_process(capsys, *args)
        assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    code, _, err = main_in_process(capsys, "map", files["ckpt"], "--arch", RN_TINY, "--write-plugin", occupied,
                                   "--name", "x")
    assert code == 2 and "not an empty folder" in err
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"]


@pytest.mark.slow
def test_map_json_through_the_script(files):
    done = cli(files, "map", files["ckpt"], "--arch", RN_TINY, "--weights", files["weights"], "--json")
    assert done.returncode == 0, done.stderr
    info = last_json(done)
    expected = resolved(get_plugin("deeplabv3-d2").name_map("open_clip/RN50"), RN_TINY, files["state"])
    assert info["arch"] == RN_TINY and info["tower"] == "backbone." and info["ok"]
    assert info["mapping"] == expected  # weights, biases, norms and buffers: every tower tensor with a counterpart
    assert any(k.endswith("running_var") for k in info["mapping"])
    assert all(u["source"].startswith("attnpool.") for u in info["unmapped"]) and info["unmapped"]
    assert len(info["rules"].splitlines()) <= 7
    assert any(e.startswith("values: r=") for t in info["tensors"] for e in t["evidence"])


@pytest.mark.slow
def test_map_refuses_two_towers_through_the_script(files):
    done = cli(files, "map", files["kd"], "--arch", RN_TINY, "--json")
    line = one_line_error(done, "--tower", "'backbone.'", "'vision_clip.'", tag=None)
    assert "no evidence decides" in line
    info = last_json(done)
    assert not info["ok"] and {c["tower"] for c in info["candidates"]} == {"backbone.", "vision_clip."}


@pytest.mark.slow
def test_written_plugin_installs_lists_and_checks(files, tmp_path):
    plugin_dir = tmp_path / "myseg-opentrans"
    done = cli(files, "map", files["ckpt"], "--arch", RN_TINY, "--write-plugin", plugin_dir, "--name", "myseg")
    assert done.returncode == 0, done.stderr
    spec = json.loads((plugin_dir / "myseg_opentrans" / "plugin.json").read_text())
    assert sum("evidence:" in rule["evidence"] for rule in spec["rules"]) >= 5 and (plugin_dir / "README.md").exists()
    site = tmp_path / "site"
    pip_install(plugin_dir, site)
    listing = cli(files, "plugins", "list", "--json", site=site, tiny=False)
    assert listing.returncode == 0, listing.stderr
    names = {p["name"]: p for p in last_json(listing)["plugins"]}
    assert names["myseg"]["source"] == "myseg-opentrans 0.1.0" and names["myseg"]["tower_path"] == "backbone"
    check = cli(files, "plugins", "check", "myseg", "--checkpoint", files["ckpt"], "--arch", RN_TINY, "--json",
                site=site)
    assert check.returncode == 0, check.stderr
    info = last_json(check)
    params = {k for k, _ in tower(RN_TINY).named_parameters()}
    expected = resolved(get_plugin("deeplabv3-d2").name_map("open_clip/RN50"), RN_TINY, files["state"])
    assert {m["source"]: m["target"] for m in info["mapped"]} == {k: v[0] for k, v in expected.items() if k in params}
    assert info["counts"]["mismatched"] == 0


def test_apply_and_check_with_the_auto_plugin(files, tmp_path, capsys):
    code, out, err = main_in_process(capsys, "plugins", "check", "auto", "--checkpoint", files["ckpt"], "--arch",
                                     RN_TINY, "--json")
    assert code == 0, err
    params = {n for n, _ in tower(RN_TINY).named_parameters()}
    expected = resolved(get_plugin("deeplabv3-d2").name_map("open_clip/RN50"), RN_TINY, files["state"])
    assert json.loads(out.splitlines()[-1])["counts"]["mapped"] == len(params & set(expected))
    out = tmp_path / "pruned.pth"
    code, stdout, err = main_in_process(capsys, "apply", "--plugin", "auto", "--subnetwork", files["sub"],
                                        "--checkpoint", files["ckpt"], "--out", out, "--json")
    assert code == 0, err
    rules = [line for line in err.splitlines() if line.startswith("opentrans-hub apply: auto rule: ")]
    assert rules and any("res{g1+1}" in line for line in rules)  # the inferred rules are shown, one line each
    reference = tmp_path / "reference.pth"
    # the hand-written plugin knows the tiny test tower by RN50's names only: another arch, so allow_partial
    report = get_plugin("deeplabv3-d2").apply_checkpoint(files["ckpt"], files["sub"], reference, arch="open_clip/RN50",
                                                         allow_partial=True)
    got, want = torch.load(out, weights_only=True), torch.load(reference, weights_only=True)
    assert got["iteration"] == 7 and got["model"].keys() == want["model"].keys()
    assert all(torch.equal(got["model"][k], want["model"][k]) for k in want["model"])
    mapped = json.loads(stdout.splitlines()[-1])["counts"]["mapped"]
    assert mapped == len(report.mapped) == len(Subnetwork.load(files["sub"]).masks) - 4  # no attnpool in d2

    # a layer selection through 'auto' names the same framework parameters as the hand-written plugin
    from opentrans_hub import LayerSelection

    layers = [{"name": n, "trainable": i % 2 == 0} for i, n in enumerate(sorted(Subnetwork.load(files["sub"]).masks))]
    LayerSelection(layers, arch=RN_TINY, policy={"name": "test"}).save(tmp_path / "select.json")
    code, _, err = main_in_process(capsys, "apply", "--plugin", "auto", "--selection", tmp_path / "select.json",
                                   "--checkpoint", files["ckpt"], "--out", tmp_path / "auto.json")
    assert code == 0, err
    code, _, err = main_in_process(capsys, "apply", "--plugin", "deeplabv3-d2", "--arch", "open_clip/RN50",
                                   "--selection", tmp_path / "select.json", "--checkpoint", files["ckpt"],
                                   "--out", tmp_path / "d2.json")
    assert code == 0, err
    auto, hand = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("auto", "d2"))
    assert auto["trainable"] == hand["trainable"] and auto["frozen"] == hand["frozen"] and auto["trainable"]
