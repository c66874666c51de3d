"""Packed sparse checkpoints: exact round trips, embedded subnetworks, refusals and a brief decoder fuzz."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from support.artefacts import pruned_checkpoint, same
from support.fuzz import fuzz_settings, mutate
from support.towers import make_tiny_resnet

from opentrans_hub import OpenTransError, Subnetwork
from opentrans_hub.formats.packed import PackedFile, open_packed
from opentrans_hub.io.checkpoints import read_state_dict
from opentrans_hub.methods.imp import magnitude_prune
from opentrans_hub.zoo.packing import load_sparse, pack_checkpoint, packed_stats, unpack
from opentrans_hub.zoo.registry import Registry


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("packed")
    checkpoint, sub = pruned_checkpoint()
    torch.save(checkpoint, folder / "model_final.pth")
    info = pack_checkpoint(folder / "model_final.pth", folder / "model.sparse.safetensors", subnetwork=sub)
    return folder, checkpoint, sub, info


# ------------------------------------------------------------------------------------------ exact round trips
@pytest.mark.parametrize("encoding", ["packbits", "zstd"])
@pytest.mark.parametrize("source", ["subnetwork", "zeros"])
def test_unpack_is_bit_identical(tmp_path, encoding, source):
    checkpoint, sub = pruned_checkpoint(seed=1)
    torch.save(checkpoint, tmp_path / "ckpt.pth")
    masks = {"subnetwork": sub} if source == "subnetwork" else {"zeros": True}
    info = pack_checkpoint(tmp_path / "ckpt.pth", tmp_path / "p.safetensors", encoding=encoding, **masks)
    stats = packed_stats(open_packed(tmp_path / "p.safetensors"))
    assert info["masked_tensors"] == len(sub) and info["packed_bytes"] < info["dense_bytes"]
    assert stats["masked_packed_bytes"] < 0.3 * stats["masked_dense_bytes"]  # 80 % sparse: ~1 + 0.2 * 32 bits
    unpack(tmp_path / "p.safetensors", tmp_path / "back.pth")
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    assert same(checkpoint, back)
    assert back["model"]._metadata == checkpoint["model"]._metadata
    state = load_sparse(tmp_path / "p.safetensors")
    assert same(dict(checkpoint["model"]), state)
    embedded = Subnetwork.load(tmp_path / "p.safetensors")
    if source == "subnetwork":
        assert embedded.sha256 == sub.sha256 and embedded.arch == "test/tiny"
    else:  # masks inferred from +0.0 bitwise: -0.0 and NaN stay kept values
        assert embedded.masks.keys() == {f"backbone.visual.{n}" for n in sub}
        assert all(torch.equal(embedded[f"backbone.visual.{n}"], sub[n]) for n in sub)


def test_flat_safetensors_round_trip_keeps_metadata(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    checkpoint, sub = pruned_checkpoint(seed=2)
    state = {k.removeprefix("backbone.visual."): v for k, v in checkpoint["model"].items()}
    save_file(state, str(tmp_path / "tower.safetensors"), metadata={"framework": "test"})
    pack_checkpoint(tmp_path / "tower.safetensors", tmp_path / "tower.sparse.safetensors", subnetwork=sub)
    unpack(tmp_path / "tower.sparse.safetensors", tmp_path / "again.safetensors")
    before, after = load_file(str(tmp_path / "tower.safetensors")), load_file(str(tmp_path / "again.safetensors"))
    assert same(dict(sorted(before.items())), dict(sorted(after.items())))
    with safe_open(str(tmp_path / "again.safetensors"), framework="pt") as handle:
        assert handle.metadata() == {"framework": "test"}
    read = read_state_dict(tmp_path / "tower.sparse.safetensors")  # every checkpoint reader takes a packed file
    assert same(dict(sorted(state.items())), dict(sorted(read.items())))  # every checkpoint reader takes it
    pack_checkpoint(checkpoint, tmp_path / "n.safetensors", subnetwork=sub)
    with pytest.raises(OpenTransError, match="flat dict of tensors"):  # nested entries need a .pth
        unpack(tmp_path / "n.safetensors", tmp_path / "n-dense.safetensors")
    assert not (tmp_path / "n-dense.safetensors").exists()


def test_cast_is_recorded_and_restores_dtype(packed, tmp_path):
    folder, checkpoint, sub, info = packed
    cast = pack_checkpoint(folder / "model_final.pth", tmp_path / "bf16.safetensors", subnetwork=sub, dtype="bf16")
    assert cast["packed_bytes"] < info["packed_bytes"] and cast["dtype"] == "bf16"
    state = load_sparse(tmp_path / "bf16.safetensors")
    for name in sub:
        key = f"backbone.visual.{name}"
        original = checkpoint["model"][key]
        assert state[key].dtype == original.dtype
        expected = original.to(torch.bfloat16).to(original.dtype) if original.dtype != torch.bfloat16 else original
        assert same(state[key], expected)
    assert open_packed(tmp_path / "bf16.safetensors").meta["cast"] == "bf16"


def test_embedded_subnetwork_and_registry_kind(packed, tmp_path):
    folder, _, sub, info = packed
    path = folder / "model.sparse.safetensors"
    assert Subnetwork.load(path).sha256 == sub.sha256 == info["subnetwork_sha256"]
    registry = Registry(tmp_path / "reg", index_dir=tmp_path / "no-index")
    entry = registry.add(path, "my-finetuned")
    assert entry.kind == "packed" and entry.sha256 == info["content_sha256"]
    assert isinstance(registry.load("my-finetuned"), PackedFile)
    assert registry.get_subnetwork("my-finetuned").sha256 == sub.sha256
    with pytest.raises(OpenTransError, match="is a packed, not a layer selection"):
        registry.get_selection("my-finetuned")


# ------------------------------------------------------------------------------------------ refusals
def test_subnetwork_refuses_nonzero_pruned_positions_unless_forced(tmp_path):
    checkpoint, sub = pruned_checkpoint(seed=3)
    key = "backbone.visual.layer1.0.conv1.weight"
    pruned = (~sub["layer1.0.conv1.weight"]).reshape(-1).nonzero().reshape(-1)
    checkpoint["model"][key].view(-1)[pruned[:5]] = 0.5
    checkpoint["model"][key].view(-1)[pruned[5]] = -0.0  # zero, as verify_exact counts it: pruned, not refused
    torch.save(checkpoint, tmp_path / "dirty.pth")
    out = tmp_path / "dirty.sparse.safetensors"
    with pytest.raises(OpenTransError, match=r"tensor 'backbone\.visual\.layer1\.0\.conv1\.weight': 5 pruned "
                                             r"positions are not zero.*force"):
        pack_checkpoint(tmp_path / "dirty.pth", out, subnetwork=sub)
    assert not out.exists()
    info = pack_checkpoint(tmp_path / "dirty.pth", out, subnetwork=sub, force_zero=True)
    assert info["forced_zero"]
    dense = load_sparse(out)[key]
    assert torch.equal(sf_bits(dense[~sub["layer1.0.conv1.weight"]]), torch.zeros(int(pruned.numel()),
                                                                                  dtype=torch.int32))


def sf_bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).view(torch.int32)


def test_pack_refusals(packed, tmp_path):
    folder, checkpoint, sub, _ = packed
    src = folder / "model_final.pth"
    with pytest.raises(OpenTransError, match="also an input"):
        pack_checkpoint(src, src, subnetwork=sub)
    with pytest.raises(OpenTransError, match="also an input"):
        unpack(folder / "model.sparse.safetensors", folder / "model.sparse.safetensors")
    with pytest.raises(OpenTransError, match=r"name it \*\.safetensors"):
        pack_checkpoint(src, tmp_path / "x.pth", subnetwork=sub)
    with pytest.raises(OpenTransError, match="exactly one"):
        pack_checkpoint(src, tmp_path / "x.safetensors")
    dense = {"w": torch.randn(8, 8)}
    with pytest.raises(OpenTransError, match="nothing looks pruned"):
        pack_checkpoint(dense, tmp_path / "x.safetensors", zeros=True)
    with pytest.raises(OpenTransError, match="entry 'extra.0' is a torch.sparse_coo tensor"):
        pack_checkpoint({**checkpoint, "extra": [torch.eye(3).to_sparse()]}, tmp_path / "x.safetensors", subnetwork=sub)
    with pytest.raises(OpenTransError, match="'meta.fn' holds a builtin_function_or_method, which a packed"):
        pack_checkpoint({**checkpoint, "meta": {"fn": print}}, tmp_path / "x.safetensors", subnetwork=sub)
    other = magnitude_prune(make_tiny_resnet(0, width=8), sparsity=0.5, arch="test/tiny", apply=False)
    with pytest.raises(OpenTransError, match="not in the checkpoint under any one prefix|shape"):
        pack_checkpoint(src, tmp_path / "x.safetensors", subnetwork=other)
    assert not (tmp_path / "x.safetensors").exists()


def _rewrite_header(data: bytes, edit) -> bytes:
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + length:]


def _one_value_fewer(header: dict) -> None:
    specs = json.loads(header["__metadata__"]["tensors"])
    key = next(k for k, spec in specs.items() if "kept" in spec)
    specs[key]["kept"] -= 1  # the header claims one value fewer than the stored values and the mask bits
    header["__metadata__"]["tensors"] = json.dumps(specs)


def _bad_files(data: bytes) -> dict[str, tuple[bytes, str]]:
    """Defective variants of a packed file and the words their error must contain."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    mask = next(k for k in header if k.endswith("::mask"))
    kept = mask.replace("::mask", "::kept")
    start = 8 + length + header[mask]["data_offsets"][0]
    flipped = bytearray(data)
    flipped[start] ^= 0x80  # one mask bit: the kept count no longer matches the stored values
    value = bytearray(data)
    value[8 + length + header[kept]["data_offsets"][0]] ^= 0x01  # one kept value: content hash
    return {
        "truncated": (data[: len(data) - 100], "truncated"),
        "header cut": (data[:40], "truncated"),
        "mask bit": (bytes(flipped), "values are stored"),
        "value": (bytes(value), "content sha256"),
        "dtype": (_rewrite_header(data, lambda h: h[kept].update(
            dtype="I16", shape=[(h[kept]["data_offsets"][1] - h[kept]["data_offsets"][0]) // 2])),
                  "disagrees"),
        "count": (_rewrite_header(data, _one_value_fewer), "disagrees"),
        "mask name": (_rewrite_header(data, lambda h: h["__metadata__"].update(
            masks=json.dumps(dict.fromkeys(json.loads(h["__metadata__"]["masks"]), 7)))), "mask names"),
    }


@pytest.mark.parametrize("defect", ["truncated", "header cut", "mask bit", "value", "dtype", "count", "mask name"])
def test_bad_packed_files_one_clear_error(packed, tmp_path, defect):
    folder = packed[0]
    data, words = _bad_files((folder / "model.sparse.safetensors").read_bytes())[defect]
    bad = tmp_path / "bad.sparse.safetensors"
    bad.write_bytes(data)
    out = tmp_path / "out.pth"
    with pytest.raises(OpenTransError, match=words) as info:
        unpack(bad, out)
    assert str(info.value).startswith(str(bad)) and "\n" not in str(info.value)
    assert [f.name for f in tmp_path.iterdir()] == [bad.name]  # nothing half-written, no temporary left
    if defect in ("mask bit", "dtype"):
        assert info.value.tensor is not None  # names the tensor
    with pytest.raises(OpenTransError):
        load_sparse(bad)


FUZZ = fuzz_settings(60)


@pytest.fixture(scope="module")
def small_packed(tmp_path_factory) -> tuple[bytes, dict]:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 3, 3, 3, generator=gen) * (torch.rand(6, 3, 3, 3, generator=gen) > 0.7)
    state = {"conv.weight": weight, "bias": torch.randn(6, generator=gen).half(), "step": torch.tensor(5)}
    path = tmp_path_factory.mktemp("fuzz") / "small.sparse.safetensors"
    pack_checkpoint(state, path, zeros=True)
    return path.read_bytes(), state


@FUZZ
@given(data=st.data())
def test_fuzzed_packed_files_decode_exactly_or_raise(small_packed, data):
    blob, state = small_packed
    blob = mutate(data, blob, mutations=3, chunk=8)
    try:
        got = PackedFile.from_bytes(blob, source="fuzz.safetensors").reader.checkpoint()
    except OpenTransError as exc:
        assert str(exc).startswith("fuzz.safetensors") and "\n" not in str(exc)
        return
    assert same(state, got)


def test_packed_file_reads_with_plain_safetensors(packed):
    """The file is ordinary safetensors: other tools list and read its parts."""
    from safetensors.torch import load_file

    folder, checkpoint, sub, _ = packed
    parts = load_file(str(Path(folder) / "model.sparse.safetensors"))
    assert "model.backbone.visual.layer1.0.conv2.weight::kept" in parts
    assert "model.backbone.visual.bn1.weight" in parts and "model.backbone.visual.conv2.weight" not in parts
    name = "layer1.0.conv2.weight"
    assert parts[f"model.backbone.visual.{name}::kept"].numel() == int(sub[name].sum())
