"""Issue 12 items 3, 5, 7, 14b: the architecture is part of an artefact's identity, names and ids are printable
identifiers, masks cover only non-empty Conv/Linear weights, and names foreign to the declared arch are flagged."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from support.towers import make_tiny_resnet

from opentrans_hub import LayerSelection, OpenTransError, Subnetwork
from opentrans_hub.errors import OpenTransWarning


def _header_edit(data: bytes, **changes: str) -> bytes:
    """The same safetensors file with metadata fields replaced (the header is re-serialised, offsets kept)."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header["__metadata__"].update(changes)
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + n:]


def _rn50_like_sub(arch: str = "open_clip/RN50") -> Subnetwork:
    masks = {"layer1.0.conv1.weight": torch.rand(64, 64, 1, 1, generator=torch.Generator().manual_seed(0)) > 0.5}
    return Subnetwork(masks, arch=arch)


def test_editing_the_arch_in_a_header_is_refused(tmp_path):
    sub = _rn50_like_sub()
    assert _rn50_like_sub("open_clip/RN101").sha256 != sub.sha256
    edited = tmp_path / "edited.safetensors"
    edited.write_bytes(_header_edit(sub.to_bytes(), arch="open_clip/RN101"))
    with pytest.raises(OpenTransError, match="hash mismatch"):
        Subnetwork.load(edited)
    loose = Subnetwork.from_bytes(edited.read_bytes(), verify=False)
    assert loose.arch == "open_clip/RN101" and loose.sha256 != sub.sha256


def test_a_0_1_file_says_why_it_no_longer_verifies(tmp_path):
    from opentrans_hub.formats.subnetwork_codec import content_hash
    from opentrans_hub.io.bitmask import pack_bits

    sub = _rn50_like_sub()
    old = content_hash(None, ((n, tuple(m.shape), pack_bits(m)) for n, m in sub.masks.items()))
    (tmp_path / "old.safetensors").write_bytes(_header_edit(sub.to_bytes(), sha256=old))
    with pytest.raises(OpenTransError, match="0.1, whose hash did not cover the architecture"):
        Subnetwork.load(tmp_path / "old.safetensors")


def test_selection_identity_covers_the_arch(tmp_path):
    layers = [{"name": "layer1.0.conv1.weight", "trainable": True}, {"name": "layer1.0.conv2.weight",
                                                                      "trainable": False}]
    sel = LayerSelection(layers, arch="open_clip/RN50")
    assert LayerSelection(layers, arch="open_clip/RN101").sha256 != sel.sha256
    data = sel.to_dict()
    data["arch"] = "open_clip/RN101"
    (tmp_path / "s.json").write_text(json.dumps(data))
    with pytest.raises(OpenTransError, match="hash mismatch"):
        LayerSelection.load(tmp_path / "s.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(OpenTransError, match="a JSON list, not an opentrans-hub layer selection"):
        LayerSelection.load(tmp_path / "list.json")
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + sel.to_bytes())  # a byte-order mark is harmless
    assert LayerSelection.load(tmp_path / "bom.json").sha256 == sel.sha256


@pytest.mark.parametrize("bad", ["layer1\x1b[2J.weight", "a\nopentrans-hub: ok", "w\x00", "x y", "caf\u00e9\u200b",
                                 "", ".a", "a..b"])
def test_control_characters_and_odd_names_are_refused(bad, tmp_path):
    with pytest.raises(OpenTransError, match="bad tensor name") as info:
        Subnetwork({bad: torch.ones(2, 2, dtype=torch.bool)})
    assert "\n" not in str(info.value) and "\x1b" not in str(info.value) and "\x00" not in str(info.value)
    with pytest.raises(OpenTransError, match="bad tensor name"):
        LayerSelection([{"name": bad, "trainable": True}])
    bad_arch = bad if bad not in ("", "a..b") else "\x1b[31mRN50"  # dots are fine in an id (ViT-B-16.x)
    with pytest.raises(OpenTransError, match="bad architecture id"):
        Subnetwork({"w": torch.ones(2, 2, dtype=torch.bool)}, arch=bad_arch)
    with pytest.raises(OpenTransError, match="bad architecture id"):
        LayerSelection([{"name": "w", "trainable": True}], arch=bad_arch)
    # the decoders refuse them too, naming the file (a crafted file with a valid hash of its own)
    good = Subnetwork({"w": torch.ones(2, 2, dtype=torch.bool)})
    crafted = tmp_path / "crafted.safetensors"
    crafted.write_bytes(_header_edit(good.to_bytes(), arch=bad_arch))
    with pytest.raises(OpenTransError, match="bad architecture id") as info:
        Subnetwork.load(crafted)
    assert str(crafted) in str(info.value)
    sel = LayerSelection([{"name": "w", "trainable": True}]).to_dict()
    sel["layers"][0]["name"] = bad
    (tmp_path / "crafted.json").write_text(json.dumps(sel))
    with pytest.raises(OpenTransError, match="bad tensor name"):
        LayerSelection.load(tmp_path / "crafted.json")


def test_selection_part_names_are_accepted():
    sel = LayerSelection([{"name": "attnpool.q_proj.weight", "trainable": True},
                          {"name": "transformer.resblocks.0.attn.in_proj_weight:q", "param":
                           "transformer.resblocks.0.attn.in_proj_weight", "trainable": False}], arch="open_clip/RN50")
    assert len(sel.layers) == 2


@pytest.mark.parametrize("mask", [torch.tensor(True), torch.ones(64, dtype=torch.bool),
                                  torch.zeros(0, 4, dtype=torch.bool)], ids=["0-dim", "1-D (a norm)", "empty"])
def test_masks_on_what_is_not_a_conv_or_linear_weight_are_refused(mask):
    with pytest.raises(OpenTransError, match="non-empty and at least 2-D"):
        Subnetwork({"bn1.weight": mask})


def test_apply_refuses_complex_and_integer_targets():
    from opentrans_hub import apply_masks, apply_subnetwork_to_state_dict

    model = torch.nn.Linear(3, 2)
    model.weight = torch.nn.Parameter(torch.ones(2, 3, dtype=torch.complex64))
    with pytest.raises(OpenTransError, match="real floating"):
        apply_masks(model, {"weight": torch.ones(2, 3, dtype=torch.bool)})
    assert torch.equal(model.weight.detach(), torch.ones(2, 3, dtype=torch.complex64))
    sub = Subnetwork({"w": torch.zeros(2, 3, dtype=torch.bool)})
    with pytest.raises(OpenTransError, match="real floating"):
        apply_subnetwork_to_state_dict({"w": torch.ones(2, 3, dtype=torch.int64)}, sub)


@pytest.mark.slow
def test_load_and_inspect_flag_names_foreign_to_the_declared_arch(tmp_path):
    from support.cli import run_cli

    tower = make_tiny_resnet()
    good = Subnetwork({n: torch.ones(p.shape, dtype=torch.bool) for n, p in tower.named_parameters()
                       if n.startswith("layer1.") and p.dim() == 4}, arch="open_clip/RN50")
    odd = good.noncanonical()  # RN50's tower is known; tiny widths are not RN50's shapes: every conv is named
    assert odd is not None and len(good) > 0 and set(odd) == set(good.masks)
    prefixed = Subnetwork({f"clip_model.visual.{n}": torch.ones(64, 64, 1, 1, dtype=torch.bool)
                           for n in ["layer1.0.conv1.weight"]}, arch="open_clip/RN50")
    path = prefixed.save(tmp_path / "prefixed.safetensors")
    with pytest.warns(OpenTransWarning, match="not canonical for open_clip/RN50.*clip_model.visual.layer1"):
        Subnetwork.load(path)
    canonical = _rn50_like_sub().save(tmp_path / "canonical.safetensors")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Subnetwork.load(canonical).noncanonical() == []
    proc = run_cli(tmp_path, "inspect", path, "--json")
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["noncanonical"] == ["clip_model.visual.layer1.0.conv1.weight"]
    assert "not canonical for open_clip/RN50" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
