"""Every writer goes through io.atomic, which refuses what is not a regular file, gives new files the mode open()
would, and never lets two writers both create one file (only ever inside tmp folders: as root a write to
/dev/... is real)."""

from __future__ import annotations

import os
import stat
import subprocess

import pytest
import torch
from support.cli import command

from opentrans_hub import LayerSelection, OpenTransError, Subnetwork, get_plugin
from opentrans_hub.io.atomic import atomic_write_bytes, check_output


@pytest.fixture
def sub() -> Subnetwork:
    return Subnetwork({"layer1.0.conv1.weight": torch.ones(2, 2, dtype=torch.bool)})


def test_links_fifos_and_folders_are_never_replaced(tmp_path, sub):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    os.symlink(victim, tmp_path / "link.safetensors")
    os.mkfifo(tmp_path / "fifo.safetensors")
    (tmp_path / "dir.safetensors").mkdir()
    for name, kind in (("link.safetensors", "symbolic link"), ("fifo.safetensors", "FIFO"),
                       ("dir.safetensors", "directory")):
        with pytest.raises(OpenTransError, match=kind):
            sub.save(tmp_path / name)
        with pytest.raises(OpenTransError, match=kind):
            LayerSelection([{"name": "w", "trainable": True}]).save(tmp_path / name)
    assert victim.read_text() == "keep me" and (tmp_path / "link.safetensors").is_symlink()
    assert stat.S_ISFIFO(os.lstat(tmp_path / "fifo.safetensors").st_mode)
    assert not list(tmp_path.glob(".*.tmp"))


def test_mode_follows_the_umask_or_the_replaced_file(tmp_path, sub):
    previous = os.umask(0o027)
    try:
        path = sub.save(tmp_path / "new.safetensors")
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
        os.chmod(path, 0o604)
        sub.save(path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o604
    finally:
        os.umask(previous)


def test_inputs_and_existing_outputs(tmp_path):
    data = tmp_path / "in.pth"
    data.write_bytes(b"x")
    with pytest.raises(OpenTransError, match="also an input"):
        check_output(tmp_path / "." / "in.pth", inputs=[data])
    with pytest.raises(OpenTransError, match="--overwrite"):
        check_output(data, overwrite=False)
    check_output(data)  # the library API replaces regular files (atomically)
    atomic_write_bytes(data, b"y")
    assert data.read_bytes() == b"y"


def test_apply_checkpoint_never_writes_over_its_input(tmp_path):
    from support.towers import make_tiny_resnet

    tower = make_tiny_resnet()
    state = {f"backbone.clip_model.visual.{k}": v for k, v in tower.state_dict().items()}
    torch.save({"model": state}, tmp_path / "ckpt.pth")
    before = (tmp_path / "ckpt.pth").read_bytes()
    masks = {n: torch.rand(p.shape) > 0.5 for n, p in tower.named_parameters() if p.dim() == 4}
    with pytest.raises(OpenTransError, match="also an input"):
        get_plugin("fcclip").apply_checkpoint(tmp_path / "ckpt.pth", Subnetwork(masks), tmp_path / "ckpt.pth")
    assert (tmp_path / "ckpt.pth").read_bytes() == before


def test_a_device_node_is_never_replaced(tmp_path, sub):
    """The issue's case: Subnetwork.save onto /dev/full replaced the node. Here a node for the same device (1, 7),
    made inside the tmp folder (nothing is ever written to it: the check comes first)."""
    node = tmp_path / "full"
    try:
        os.mknod(node, stat.S_IFCHR | 0o600, os.makedev(1, 7))
    except (PermissionError, OSError):
        pytest.skip("cannot make a device node here (not root)")
    with pytest.raises(OpenTransError, match="character device"):
        sub.save(node)
    assert stat.S_ISCHR(os.lstat(node).st_mode)


def test_an_output_checked_as_new_is_never_replaced(tmp_path):
    out = tmp_path / "new.bin"
    check_output(out, overwrite=False)  # a command checks its output first ...
    out.write_bytes(b"the other writer's")  # ... another writer creates it meanwhile ...
    with pytest.raises(OpenTransError, match="another writer"):
        atomic_write_bytes(out, b"mine")  # ... and this write fails instead of replacing it
    assert out.read_bytes() == b"the other writer's" and not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(OpenTransError, match="another writer"):
        atomic_write_bytes(out, b"mine", overwrite=False)


@pytest.mark.slow
def test_two_packs_to_one_new_output_one_wins(tmp_path):
    gen = torch.Generator().manual_seed(0)
    state = {f"layer{i}.weight": torch.randn(1024, 1024, generator=gen) for i in range(6)}
    for tensor in state.values():
        tensor[torch.rand(tensor.shape, generator=gen) < 0.9] = 0
    torch.save(state, tmp_path / "a.pth")
    state["layer0.weight"][0, 0] = 7.0  # the second writer packs other content
    torch.save(state, tmp_path / "b.pth")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENTRANS_HUB_HOME": str(tmp_path / "home")}
    out = tmp_path / "o.safetensors"
    procs = [subprocess.Popen([*command(), "pack", str(tmp_path / name), "--zeros", "--out", str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for name in ("a.pth", "b.pth")]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, _, err in results if code == 2)
    assert len(loser.strip().splitlines()) == 1 and "o.safetensors" in loser and "Traceback" not in loser
    winner = "a.pth" if results[0][0] == 0 else "b.pth"
    unpacked = tmp_path / "check.pth"
    assert subprocess.run([*command(), "unpack", str(tmp_path / "o.safetensors"), "--out", str(unpacked)], env=env,
                          capture_output=True).returncode == 0
    got, want = torch.load(unpacked, weights_only=True), torch.load(tmp_path / winner, weights_only=True)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert not list(tmp_path.glob(".*"))  # no temporary or spool file left behind
