"""Hostile and unusual input to ``pack`` / ``unpack`` through the installed script: one line, exit 2, no traceback,
nothing written; and the outputs that must be exact (bytes, dtypes, signs) are.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from support.cli import assert_refused, cli_env, command, run_cli

from opentrans_hub import Subnetwork
from opentrans_hub.formats.packed import PackedFile


def pruned_state(seed: int = 0, size: int = 64) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for i in range(3):
        weight = torch.randn(size, size, generator=gen)
        weight[torch.rand(weight.shape, generator=gen) < 0.9] = 0
        state[f"layer{i}.weight"] = weight
    state["layer0.bias"] = torch.randn(size, generator=gen)
    return state


@pytest.fixture
def ckpt(tmp_path) -> Path:
    torch.save({"model": pruned_state(), "iteration": 3}, tmp_path / "ckpt.pth")
    return tmp_path / "ckpt.pth"


def nothing_written(tmp: Path, *keep: str) -> None:
    """Only ``keep`` (and the private registry and caches ``cli_env`` puts under ``tmp``) is left in ``tmp``."""
    extra = sorted(p.name for p in tmp.iterdir() if p.name not in {*keep, ".home", ".cache", ".hf"})
    assert not extra, extra


def test_a_bad_include_regex_is_one_line(tmp_path, ckpt):
    assert_refused(tmp_path, "pack", ckpt, "--zeros", "--include", "(", "--out", "o.safetensors",
                   needles=("--include", "regular expression"))


def test_include_with_a_subnetwork_is_refused_not_ignored(tmp_path, ckpt):
    state = pruned_state()
    Subnetwork({k: v != 0 for k, v in state.items() if k.endswith("weight")}).save(tmp_path / "s.safetensors")
    assert_refused(tmp_path, "pack", ckpt, "--subnetwork", "s.safetensors", "--include", "layer0", "--out",
                   "o.safetensors", needles=("--include",))


def test_a_checkpoint_nested_600_deep_is_one_line(tmp_path):
    nested: dict = {"w": pruned_state()["layer0.weight"]}
    for _ in range(600):
        nested = {"n": nested}
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(10_000)  # pickling 600 levels needs more than the default
    try:
        torch.save(nested, tmp_path / "deep.pth")
    finally:
        sys.setrecursionlimit(limit)
    assert_refused(tmp_path, "pack", "deep.pth", "--zeros", "--out", "o.safetensors", needles=("deep.pth",))


def test_a_tensor_name_with_an_unpaired_surrogate_is_one_line(tmp_path):
    state = pruned_state()
    state["bad\udcffname.weight"] = state.pop("layer1.weight")
    torch.save(state, tmp_path / "s.pth")
    line = assert_refused(tmp_path, "pack", "s.pth", "--zeros", "--out", "o.safetensors", needles=("UTF-8",))
    assert "\\udcff" in line


def test_a_cast_that_makes_inf_is_refused(tmp_path):
    state = pruned_state()
    state["layer2.weight"][0, 0] = 1e5  # float16's largest is 65504
    torch.save(state, tmp_path / "big.pth")
    assert_refused(tmp_path, "pack", "big.pth", "--zeros", "--dtype", "fp16", "--out", "o.safetensors",
                   needles=("inf", "layer2.weight", "bf16"))
    assert run_cli(tmp_path, "pack", "big.pth", "--zeros", "--dtype", "bf16", "--out", "o.safetensors").returncode == 0


def test_a_refused_unpack_leaves_no_folders(tmp_path, ckpt):
    assert run_cli(tmp_path, "pack", ckpt, "--zeros", "--out", "p.safetensors").returncode == 0
    assert_refused(tmp_path, "unpack", "p.safetensors", "--out", "new/a/b.safetensors", needles=("flat",))


def test_suffixes_are_compared_without_case(tmp_path):
    torch.save(pruned_state(), tmp_path / "flat.pth")
    assert run_cli(tmp_path, "pack", "flat.pth", "--zeros", "--out", "p.SafeTensors").returncode == 0
    assert run_cli(tmp_path, "unpack", "p.SafeTensors", "--out", "x.SAFETENSORS").returncode == 0
    with safe_open(str(tmp_path / "x.SAFETENSORS"), framework="pt") as handle:  # safetensors, not a torch zip
        assert sorted(handle.keys()) == sorted(pruned_state())


def test_the_same_input_packs_to_the_same_bytes(tmp_path, ckpt):
    for out in ("a.safetensors", "b.safetensors"):
        assert run_cli(tmp_path, "pack", ckpt, "--zeros", "--out", out).returncode == 0
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_negative_zero_at_pruned_positions_is_pruned(tmp_path):
    """A subnetwork's pruned position holding -0.0 is zero (as verify_exact counts it): packed, and +0.0 back."""
    state = pruned_state()
    weight = state["layer0.weight"]
    weight[weight == 0] = -0.0  # a masked_fill with -0.0, or a sign flip of a pruned weight
    torch.save(state, tmp_path / "neg.pth")
    sub = Subnetwork({k: v != 0 for k, v in state.items() if k.endswith("weight")})
    sub.save(tmp_path / "s.safetensors")
    done = run_cli(tmp_path, "pack", "neg.pth", "--subnetwork", "s.safetensors", "--out", "p.safetensors")
    assert done.returncode == 0, done.stderr
    assert PackedFile.load(tmp_path / "p.safetensors").subnetwork.same_masks(sub)  # verified on load
    assert run_cli(tmp_path, "unpack", "p.safetensors", "--out", "u.pth").returncode == 0
    back = torch.load(tmp_path / "u.pth", weights_only=True)
    assert all(torch.equal(back[k], state[k]) for k in state)  # equal values
    assert not torch.signbit(back["layer0.weight"][~sub["layer0.weight"]]).any()  # the pruned value is +0.0


@pytest.mark.slow
def test_sigint_during_unpack_is_interrupted_exit_130_and_writes_nothing(tmp_path):
    gen = torch.Generator().manual_seed(0)
    state = {f"t{i}.weight": torch.randn(2048, 2048, generator=gen) for i in range(24)}  # 400 MB dense
    for tensor in state.values():
        tensor[:1024] = 0
    torch.save({"model": state}, tmp_path / "big.pth")
    del state
    assert run_cli(tmp_path, "pack", "big.pth", "--zeros", "--out", "p.safetensors").returncode == 0
    (tmp_path / "big.pth").unlink()
    proc = subprocess.Popen([*command(), "unpack", "p.safetensors", "--out", "u.pth"], cwd=tmp_path,
                            env=cli_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:  # the signal once decoding has begun
        if any(p.name.startswith(".opentrans-hub-unpack-") for p in tmp_path.iterdir()):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("unpack finished before the signal: the machine is faster than this test assumes")
    assert proc.returncode == 130 and err.strip().splitlines() == ["interrupted"], (proc.returncode, err)
    nothing_written(tmp_path, "p.safetensors")
