"""Packed files keep what ``torch.save`` keeps: shared storage stored once and shared again, Parameters and
``requires_grad``; the content hash covers both; files written before either was recorded still read."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from support.artefacts import same
from support.cli import run_cli

from opentrans_hub import OpenTransError, Subnetwork
from opentrans_hub.formats.packed import open_packed
from opentrans_hub.zoo.packing import load_sparse, pack_checkpoint, unpack

FIXTURE = Path(__file__).parent / "fixtures" / "packed-0.2-tied.safetensors"


def ptr(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def shared_checkpoint() -> dict:
    """A framework-style checkpoint whose tensors share storage every way torch allows, with Parameters."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(256, 256, generator=gen)
    weight[weight.abs() < 1.2] = 0  # about 77 % zeros: --zeros masks it
    qkv = torch.randn(3 * 96, 96, generator=gen)
    buffer = torch.randn(4096, generator=gen)  # only slices of it are in the checkpoint
    embed = torch.nn.Parameter(torch.randn(512, 64, generator=gen))
    model = {
        "encoder.weight": weight, "decoder.weight": weight,  # the same object under two names
        "tied.weight": weight.detach(),  # another tensor over the same storage (what state_dict() gives)
        "attn.in_proj_weight": qkv, "attn.q": qkv[:96], "attn.k": qkv[96:192], "attn.kt": qkv[96:192].t(),
        "pos.a": buffer[100:1100], "pos.b": buffer[2000:4000].view(40, 50),  # views at offsets, no owner
        "embed.weight": embed, "lm_head.weight": embed,  # a tied Parameter
        "frozen": torch.nn.Parameter(torch.randn(64, generator=gen), requires_grad=False),
        "scale": torch.randn(8, generator=gen).requires_grad_(),  # a plain tensor requiring grad
        "bias": torch.randn(256, generator=gen),
    }
    return {"model": model, "iteration": 3, "optimizer": {"state": {0: {"momentum": torch.zeros(4)}}}}


def storage_bytes(obj) -> int:
    """Bytes of the distinct storages a checkpoint's tensors use (what torch.save writes)."""
    seen = {}
    for tensor in obj["model"].values():
        seen[ptr(tensor)] = tensor.untyped_storage().nbytes()
    return sum(seen.values()) + 16


def check_sharing(before: dict, after: dict) -> None:
    """Same values, types, flags, shapes and strides; the same sharing and object identity (model dicts)."""
    assert same(before, after)
    for key, tensor in before.items():
        other = after[key]
        assert type(other) is type(tensor), key
        assert other.requires_grad == tensor.requires_grad and other.stride() == tensor.stride(), key
    for a, b in [("encoder.weight", "decoder.weight"), ("encoder.weight", "tied.weight"), ("attn.in_proj_weight",
                 "attn.q"), ("attn.in_proj_weight", "attn.kt"), ("pos.a", "pos.b"), ("embed.weight", "lm_head.weight")]:
        assert ptr(after[a]) == ptr(after[b]), (a, b)
        assert (after[a] is after[b]) == (before[a] is before[b]), (a, b)
    inner = after["attn.in_proj_weight"]
    assert after["attn.k"].storage_offset() - inner.storage_offset() == 96 * 96
    assert after["pos.b"].storage_offset() - after["pos.a"].storage_offset() == 1900
    assert ptr(after["bias"]) != ptr(after["encoder.weight"]) != ptr(after["attn.q"]) != ptr(after["pos.a"])
    after["attn.in_proj_weight"].detach()[100, 0] = 12345.0  # sharing is real: a write shows through the views
    assert float(after["attn.k"][4, 0]) == 12345.0 and float(after["attn.kt"][0, 4]) == 12345.0


@pytest.mark.slow
def test_shared_storage_and_parameters_round_trip_through_the_script(tmp_path):
    checkpoint = shared_checkpoint()
    torch.save(checkpoint, tmp_path / "model_final.pth")
    original = torch.load(tmp_path / "model_final.pth", weights_only=True)  # what any reader of the file gets
    packed = run_cli(tmp_path, "pack", "model_final.pth", "--zeros", "--out", "model.sparse.safetensors", "--json")
    assert packed.returncode == 0, packed.stderr
    info = json.loads(packed.stdout)
    assert info["masked_tensors"] == 1  # the tied weight is masked once, for all three names
    # each storage once: the file is smaller than the storages it holds (not 2-3x with the tied ones doubled)
    assert info["packed_bytes"] < storage_bytes(original)

    shown = run_cli(tmp_path, "inspect", "model.sparse.safetensors", "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["shared_tensors"] == 8  # decoder, tied, q, k, kt, pos.a, pos.b, lm_head
    back = run_cli(tmp_path, "unpack", "model.sparse.safetensors", "--out", "restored.pth", "--json")
    assert back.returncode == 0, back.stderr
    restored_size = (tmp_path / "restored.pth").stat().st_size
    assert restored_size <= 1.02 * (tmp_path / "model_final.pth").stat().st_size
    restored = torch.load(tmp_path / "restored.pth", weights_only=True)
    assert same(original, restored)
    check_sharing(original["model"], restored["model"])
    check_sharing(original["model"], load_sparse(tmp_path / "model.sparse.safetensors"))


@pytest.mark.parametrize("name", ["decoder.weight", "tied.weight"])  # the same object; another tensor over it
def test_subnetwork_masks_a_tied_weight_once_and_refuses_a_slice(tmp_path, name):
    checkpoint = shared_checkpoint()
    keep = checkpoint["model"]["encoder.weight"] != 0
    info = pack_checkpoint(checkpoint, tmp_path / "p.safetensors", subnetwork=Subnetwork({name: keep}), prefix="")
    reader = open_packed(tmp_path / "p.safetensors")
    stored = "model.encoder.weight" if name == "decoder.weight" else f"model.{name}"  # an alias has no data
    assert reader.mask_names == {stored: name} and info["masked_tensors"] == 1
    check_sharing(checkpoint["model"], reader.checkpoint()["model"])

    piece = Subnetwork({"attn.q": torch.ones(96, 96, dtype=torch.bool)})
    with pytest.raises(OpenTransError, match="shares its storage") as caught:
        pack_checkpoint(checkpoint, tmp_path / "q.safetensors", subnetwork=piece, prefix="")
    assert caught.value.tensor == "model.attn.q" and not (tmp_path / "q.safetensors").exists()
    both = Subnetwork({"encoder.weight": keep, "decoder.weight": keep})
    with pytest.raises(OpenTransError, match="masks one tensor twice"):
        pack_checkpoint(checkpoint, tmp_path / "q.safetensors", subnetwork=both, prefix="")


def test_flat_safetensors_unpack_writes_each_name(tmp_path):
    from safetensors.torch import load_file

    model = {k: v for k, v in shared_checkpoint()["model"].items()}
    pack_checkpoint(model, tmp_path / "p.safetensors", zeros=True)
    unpack(tmp_path / "p.safetensors", tmp_path / "flat.safetensors")  # safetensors shares nothing: copies
    flat = load_file(str(tmp_path / "flat.safetensors"))
    assert flat.keys() == model.keys()
    assert all(same(model[k].detach().contiguous(), flat[k]) for k in model)


def _edit_tree(path: Path, edit) -> bytes:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    tree = json.loads(header["__metadata__"]["tree"])
    edit(tree["d"][0][1]["d"])  # the model's entries
    header["__metadata__"]["tree"] = json.dumps(tree)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + length:]


def _entry(entries: list, name: str) -> dict:
    return next(node for key, node in entries if key == {"s": name})


@pytest.mark.parametrize("edit, words", [
    (lambda e: _entry(e, "embed.weight").pop("p"), None),  # a Parameter made a plain tensor
    (lambda e: _entry(e, "frozen").update(g=1), None),  # requires_grad switched on
    (lambda e: _entry(e, "attn.kt")["v"].update(at=0), None),  # a view moved
    (lambda e: _entry(e, "lm_head.weight").update(a="model.attn.q"), None),  # an alias onto another tensor
    (lambda e: _entry(e, "attn.k")["v"].update(shape=[96, 97]), "reaches outside"),
    (lambda e: _entry(e, "attn.k")["v"].update(at=4 * 96 * 96 * 3), "reaches outside"),
    (lambda e: _entry(e, "attn.k")["v"].update(stride=[0, 1]), "over itself"),
    (lambda e: _entry(e, "attn.k")["v"].update(of="nothing"), "does not describe"),
    (lambda e: _entry(e, "attn.k")["v"].update(dtype="F64", at=4), "not aligned"),
    (lambda e: _entry(e, "attn.k")["v"].update(dtype="Q8"), "bad view record"),
    (lambda e: _entry(e, "bias").update(t="model.attn.q"), "bad tree node"),  # a name given twice
    (lambda e: _entry(e, "decoder.weight").update(a="model.scale"), "not given before"),  # an alias ahead of it
    (lambda e: _entry(e, "scale").update(g=1, t="model.iteration"), "bad tree node|does not describe"),
])
def test_tampered_sharing_or_parameters_are_refused(tmp_path, edit, words):
    """The content hash covers Parameters, requires_grad, aliases and views; a view that would reach outside its
    stored tensor is refused even unverified (``verify=False``), never read out of bounds."""
    pack_checkpoint(shared_checkpoint(), tmp_path / "p.safetensors", zeros=True)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(_edit_tree(tmp_path / "p.safetensors", edit))
    with pytest.raises(OpenTransError, match="content sha256"):
        load_sparse(bad)
    with pytest.raises(OpenTransError, match="content sha256"):
        unpack(bad, tmp_path / "out.pth")
    assert not (tmp_path / "out.pth").exists()
    if words is None:  # well formed, but not what was packed: only the hash tells
        changed = open_packed(bad).checkpoint(verify=False)["model"]
        assert not check_sharing_holds(shared_checkpoint()["model"], changed)
    else:
        with pytest.raises(OpenTransError, match=words):
            open_packed(bad).checkpoint(verify=False)


def check_sharing_holds(before: dict, after: dict) -> bool:
    try:
        check_sharing(before, after)
    except AssertionError:
        return False
    return True


def test_a_file_written_before_sharing_was_recorded_still_reads(tmp_path):
    """Packed by opentrans-hub 0.2 from {"encoder.weight": Parameter(w), "decoder.weight": w}: it stored the
    tensor twice and no Parameter; it reads as it was written, verified."""
    state = load_sparse(FIXTURE)
    assert set(state) == {"encoder.weight", "decoder.weight", "decoder.bias"}
    assert torch.equal(state["encoder.weight"], state["decoder.weight"])
    assert ptr(state["encoder.weight"]) != ptr(state["decoder.weight"])
    assert type(state["encoder.weight"]) is torch.Tensor and not state["encoder.weight"].requires_grad
    unpack(FIXTURE, tmp_path / "old.pth")
    again = torch.load(tmp_path / "old.pth", weights_only=True)
    assert again["iteration"] == 7 and same(again["model"], state)
    assert os.path.getsize(FIXTURE) == 2464  # the fixture is the file 0.2 wrote, untouched
