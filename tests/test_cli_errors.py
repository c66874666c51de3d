"""Issue 12 items 6, 8, 9: every bad input is one clear line and exit 2 through the installed script, nothing
written; outputs never replace links, FIFOs, inputs or (without --overwrite) existing files."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from support.cli import assert_refused, cli_env, command, run_cli
from support.processes import free_port
from support.towers import make_tiny_resnet

from opentrans_hub import LayerSelection, Subnetwork
from opentrans_hub.formats.subnetwork import default_provenance

PREFIX = "backbone.clip_model.visual."


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """A folder with the inputs of every case: a subnetwork, a selection, an FC-CLIP-style checkpoint, and
    hostile files (sparse tensors, integer keys, a string policy, a BOM, a JSON list, a folder, a FIFO, a link)."""
    root = tmp_path_factory.mktemp("cli-errors")
    tower = make_tiny_resnet()
    gen = torch.Generator().manual_seed(0)
    weights = {n: p for n, p in tower.named_parameters() if p.dim() >= 2}
    sub = Subnetwork({n: torch.rand(p.shape, generator=gen) > 0.5 for n, p in weights.items()},
                     arch="open_clip/RN50", provenance=default_provenance("random"))
    sub.save(root / "sub.safetensors")
    sel = LayerSelection([{"name": n, "trainable": i % 2 == 0} for i, n in enumerate(weights)], arch="open_clip/RN50")
    sel.save(root / "sel.json")
    torch.save({"model": {PREFIX + k: v for k, v in tower.state_dict().items()}}, root / "fcclip.pth")
    mask = torch.ones(4, 4)
    torch.save({"a.weight_mask": mask.to_sparse(), "a.weight_orig": mask}, root / "sparse.pth")
    torch.save({"model": {3: torch.ones(2, 2), PREFIX + "conv1.weight": torch.ones(2, 2)}}, root / "intkeys.pth")
    manifest = sel.to_dict()
    manifest["policy"] = "median"
    (root / "policy.json").write_text(json.dumps(manifest))
    (root / "bom.json").write_bytes(b"\xef\xbb\xbf" + sel.to_bytes())
    (root / "list.json").write_text("[1, 2, 3]")
    (root / "folder").mkdir()
    (root / "existing.safetensors").write_bytes(b"someone else's file")
    (root / "weights.safetensors").write_bytes(b"placeholder")
    os.mkfifo(root / "fifo.safetensors")
    os.symlink(root / "existing.safetensors", root / "link.safetensors")
    return root


CASES = {
    # item 8: tracebacks and misleading messages seen on main
    "import sparse tensors": (["import", "sparse.pth", "--out", "o.safetensors"], ["sparse.pth", "layout"]),
    "import non-string keys": (["import", "intkeys.pth", "--out", "o.safetensors"], ["intkeys.pth", "not a string"]),
    "apply non-string keys": (["apply", "--plugin", "fcclip", "--subnetwork", "sub.safetensors", "--checkpoint",
                               "intkeys.pth", "--out", "o.pth"], ["intkeys.pth", "not a string"]),
    "verify string policy": (["verify", "policy.json"], ["policy.json", "'policy' must be an object"]),
    "apply string policy": (["apply", "--plugin", "fcclip", "--selection", "policy.json", "--checkpoint", "fcclip.pth",
                             "--out", "o.json"], ["'policy' must be an object"]),
    "conv-norm nan": (["spectrum", "open_clip/RN50", "--conv-norm", "nan"], ["conv_norm", "nan"]),
    "device cuda": (["spectrum", "open_clip/RN50", "--device", "cuda"], ["CUDA is not available"]),
    "device bogus": (["spectrum", "open_clip/RN50", "--device", "bogus"], ["unknown device 'bogus'"]),
    "max-aspect negative": (["spectrum", "open_clip/RN50", "--max-aspect", "-5"], ["--max-aspect must be >= 0"]),
    "plot extension": (["spectrum", "open_clip/RN50", "--plot", "a.txt"], ["a.txt", ".png"]),
    "demo out is a file": (["demo", "--out", "existing.safetensors"], ["existing.safetensors", "not a folder"]),
    "import bad regex": (["import", "fcclip.pth", "--from-zeros", "--include", "[", "--out", "o.safetensors"],
                         ["not a valid regular expression"]),
    "inspect JSON list": (["inspect", "list.json"], ["list.json", "JSON file, not a subnetwork"]),
    "inspect directory": (["inspect", "folder"], ["folder", "is a directory"]),
    "import directory": (["import", "folder", "--out", "o.safetensors"], ["folder", "is a directory"]),
    "bad option": (["inspect", "sub.safetensors", "--bogus"], ["unrecognized arguments: --bogus"]),
    # item 6: outputs
    "select over existing": (["select", "open_clip/RN50", "--out", "existing.safetensors"],
                             ["existing.safetensors", "--overwrite"]),
    "prune over existing": (["prune", "--arch", "open_clip/RN50", "--sparsity", "0.5", "--out",
                             "existing.safetensors"], ["--overwrite"]),
    "spectrum plot over existing": (["spectrum", "open_clip/RN50", "--plot", "existing.png"], ["--overwrite"]),
    "apply out is the input": (["apply", "--plugin", "fcclip", "--subnetwork", "sub.safetensors", "--checkpoint",
                                "fcclip.pth", "--out", "./fcclip.pth", "--overwrite"], ["also an input"]),
    "import out is the input": (["import", "sub.safetensors", "--out", "sub.safetensors", "--overwrite"],
                                ["also an input"]),
    "apply out is a FIFO": (["apply", "--plugin", "fcclip", "--subnetwork", "sub.safetensors", "--checkpoint",
                             "fcclip.pth", "--out", "fifo.safetensors", "--overwrite"], ["a FIFO"]),
    "prune out is a symlink": (["prune", "--arch", "open_clip/RN50", "--sparsity", "0.5", "--out", "link.safetensors",
                                "--overwrite"], ["a symbolic link"]),
    "out is a folder": (["apply", "--plugin", "fcclip", "--selection", "sel.json", "--checkpoint", "fcclip.pth",
                         "--out", "folder", "--overwrite"], ["folder", "a directory"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2_nothing_written(ws, case):
    (ws / "existing.png").write_bytes(b"not mine")  # (idempotent: the same bytes every case)
    args, needles = CASES[case]
    assert_refused(ws, *args, needles=tuple(needles))


def test_push_offline_or_unreachable_is_one_line(ws):
    port = free_port()  # bound once, then released: nothing listens there
    unreachable = {"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_TOKEN": "hf_test", "NO_PROXY": "127.0.0.1"}
    assert_refused(ws, "push", "sub.safetensors", "--repo-id", "me/x", env=unreachable,
                   needles=("push to me/x", f"127.0.0.1:{port}"))
    assert_refused(ws, "push", "sub.safetensors", "--repo-id", "me/x", env={**unreachable, "HF_HUB_OFFLINE": "1"},
                   needles=("HF_HUB_OFFLINE",))


def test_bom_manifest_verifies(ws):
    proc = run_cli(ws, "verify", "bom.json")
    assert proc.returncode == 0 and "ok:" in proc.stdout, proc.stderr


@pytest.mark.slow
def test_json_errors_and_debug_after_the_command(ws):
    before = run_cli(ws, "inspect", "missing.safetensors", "--json")
    assert before.returncode == 2
    error = json.loads(before.stdout.strip())
    assert "missing.safetensors" in error["error"] and error["command"] == "inspect"
    usage = run_cli(ws, "inspect", "--json")  # an argparse complaint is JSON too
    assert usage.returncode == 2 and "required" in json.loads(usage.stdout)["error"]
    for argv in (["--debug", "inspect", "list.json"], ["inspect", "list.json", "--debug"]):
        proc = run_cli(ws, *argv)
        assert proc.returncode != 0 and "Traceback" in proc.stderr and "OpenTransError" in proc.stderr, argv


@pytest.mark.parametrize("argv", [["list"], ["inspect", "many.safetensors"]])
def test_closed_pipe_ends_quietly(ws, argv):
    """``... | head``: the reader is gone before the first write; no traceback, no error line."""
    if not (ws / "many.safetensors").exists():  # > 8 KiB of table: written in several flushes
        Subnetwork({f"layer{i}.weight": torch.ones(2, 2, dtype=torch.bool) for i in range(400)}).save(
            ws / "many.safetensors")
    proc = subprocess.Popen(command() + argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ws,
                            env=cli_env(ws))
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(timeout=300)
    assert err == "" and proc.returncode in (0, 141), (proc.returncode, err)


@pytest.mark.slow
def test_overwrite_replaces_and_outputs_honour_the_umask(ws, tmp_path):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"old")
    os.chmod(out, 0o640)
    proc = run_cli(ws, "import", "fcclip.pth", "--from-zeros", "--out", out, "--overwrite")
    assert proc.returncode == 2 and "nothing looks pruned" in proc.stderr  # a dense checkpoint: still refused
    proc = run_cli(ws, "apply", "--plugin", "fcclip", "--subnetwork", "sub.safetensors", "--checkpoint", "fcclip.pth",
                   "--out", tmp_path / "new.pth")
    assert proc.returncode == 0, proc.stderr
    previous = os.umask(0o027)
    os.umask(previous)
    assert (tmp_path / "new.pth").stat().st_mode & 0o777 == 0o666 & ~previous
    proc = subprocess.run(["sh", "-c", f"umask 027 && exec {' '.join(command())} import {tmp_path / 'new.pth'} "
                           f"--from-zeros --prefix {PREFIX} --out {out} --overwrite"], capture_output=True, text=True,
                          cwd=ws, env=cli_env(ws), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_mode & 0o777 == 0o640  # replacing a file keeps its mode, like open(..., "w")
    fresh = tmp_path / "fresh.safetensors"
    proc = subprocess.run(["sh", "-c", f"umask 027 && exec {' '.join(command())} import {tmp_path / 'new.pth'} "
                           f"--from-zeros --prefix {PREFIX} --out {fresh}"], capture_output=True, text=True,
                          cwd=ws, env=cli_env(ws), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert fresh.stat().st_mode & 0o777 == 0o640
