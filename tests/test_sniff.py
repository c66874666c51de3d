"""Every reader goes by what a file holds, never by its name: one sniffer, one reader per format."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch

from opentrans_hub import LayerSelection, OpenTransError, Subnetwork
from opentrans_hub.formats.packed import is_packed
from opentrans_hub.io.checkpoints import read_checkpoint, read_state_dict, write_checkpoint
from opentrans_hub.io.sniff import sniff, sniff_file
from opentrans_hub.zoo.packing import pack_checkpoint


def _state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 4, 3, 3, generator=gen)
    weight[torch.rand(8, 4, 3, 3, generator=gen) > 0.2] = 0.0  # pruned: +0.0 exactly
    return {"conv.weight": weight, "conv.bias": torch.randn(8, generator=gen)}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _with_format(data: bytes, value: str) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header["__metadata__"]["format"] = value
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + n:]


def test_kinds_come_from_the_bytes(tmp_path):
    state = _state()
    write_checkpoint(tmp_path / "weights.pt.SafeTensors", state)  # the output name picks safetensors, any case
    torch.save(state, tmp_path / "zip.safetensors")
    torch.save(state, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    (tmp_path / "empty.pth").write_bytes(b"")
    selection = LayerSelection([{"name": "conv.weight", "trainable": True}]).save(tmp_path / "sel.safetensors")
    (tmp_path / "broken.json").write_text('{"format": "opentrans-hub/layer-selection", "layers": [')
    kinds = {p.name: (sniff_file(p).kind, sniff_file(p).format) for p in tmp_path.iterdir()}
    assert kinds == {"weights.pt.SafeTensors": ("safetensors", None), "zip.safetensors": ("zip", None),
                     "legacy.bin": ("pickle", None), "empty.pth": ("empty", None), "broken.json": ("text", None),
                     "sel.safetensors": ("json", "opentrans-hub/layer-selection")}
    assert sniff(selection.read_bytes()) == sniff_file(selection)
    assert sniff(b"\x00" * 3).kind == sniff(b"GIF89a").kind == "unknown"


def test_checkpoints_are_read_by_content(tmp_path):
    state = _state()
    write_checkpoint(tmp_path / "a.safetensors", state)
    shutil.copy(tmp_path / "a.safetensors", tmp_path / "a.pth")  # safetensors under a torch name
    torch.save({"model": state}, tmp_path / "b.safetensors")  # a torch zip under a safetensors name
    for name in ("a.pth", "b.safetensors"):
        assert _same(read_state_dict(tmp_path / name), state), name
    sub = Subnetwork({"conv.weight": state["conv.weight"] != 0}, arch="test/tiny")
    sub.save(tmp_path / "mask.pth")
    with pytest.raises(OpenTransError, match="opentrans-hub/subnetwork file, not a checkpoint"):
        read_checkpoint(tmp_path / "mask.pth")
    LayerSelection([{"name": "conv.weight", "trainable": True}]).save(tmp_path / "sel.pt")
    with pytest.raises(OpenTransError, match="layer-selection file, not a checkpoint"):
        read_checkpoint(tmp_path / "sel.pt")


def test_a_packed_file_under_any_name(tmp_path):
    state = _state()
    pack_checkpoint(state, tmp_path / "p.SAFETENSORS", zeros=True)
    shutil.copy(tmp_path / "p.SAFETENSORS", tmp_path / "model_final.pth")
    packed = tmp_path / "model_final.pth"
    assert is_packed(packed) and not is_packed(tmp_path / "missing.pth")
    assert _same(read_state_dict(packed), state)
    assert torch.equal(Subnetwork.load(packed)["conv.weight"], state["conv.weight"] != 0)


def test_format_names_compare_case_insensitively(tmp_path):
    sub = Subnetwork({"conv.weight": _state()["conv.weight"] != 0}, arch="test/tiny")
    shouted = tmp_path / "shouted.safetensors"
    shouted.write_bytes(_with_format(sub.to_bytes(), "OpenTrans-Hub/Subnetwork"))
    assert Subnetwork.load(shouted).sha256 == sub.sha256
    with pytest.raises(OpenTransError, match="subnetwork file, not a checkpoint"):
        read_checkpoint(shouted)
    other = tmp_path / "other.safetensors"
    other.write_bytes(_with_format(sub.to_bytes(), "someone-else/masks"))
    with pytest.raises(OpenTransError, match="not an opentrans-hub subnetwork"):
        Subnetwork.load(other)


def test_each_reader_refuses_the_other_formats_by_name(tmp_path):
    sub = Subnetwork({"conv.weight": _state()["conv.weight"] != 0}, arch="test/tiny")
    sub_path = sub.save(tmp_path / "mask.json")
    sel_path = LayerSelection([{"name": "conv.weight", "trainable": True}]).save(tmp_path / "sel.safetensors")
    with pytest.raises(OpenTransError, match="layer selection manifest"):
        Subnetwork.load(sel_path)
    with pytest.raises(OpenTransError, match=r"opentrans-hub/subnetwork file, not a layer selection") as info:
        LayerSelection.load(sub_path)
    assert str(info.value).startswith(str(sub_path))
