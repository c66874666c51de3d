"""Subnetwork: the portable mask (requirement 2) and its refusal of bad files (requirement 7)."""

from __future__ import annotations

import datetime as dt
import json
import math
import struct

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save as st_save
from support.sparsity import conv_masks
from support.towers import make_tiny_resnet

import opentrans_hub
from opentrans_hub import OpenTransError, Subnetwork
from opentrans_hub.formats.subnetwork import default_provenance


@pytest.fixture(scope="module")
def tiny_sub() -> Subnetwork:
    masks = conv_masks(make_tiny_resnet())
    # one layer with a weight count that is not a multiple of 8 exercises the padding bits
    masks["attnpool.odd"] = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(1)) > 0.5
    return Subnetwork(masks, arch="open_clip/tiny", provenance=default_provenance("test", rounds=3))


@pytest.fixture(scope="module")
def rn50_sub() -> Subnetwork:
    """A per-layer 89 % mask over the 54 RN50 conv weights after the first (the paper's target)."""
    from opentrans_hub.towers.backbones import build_visual

    torch.manual_seed(0)
    return Subnetwork(conv_masks(build_visual("open_clip/RN50")), arch="open_clip/RN50",
                      provenance=default_provenance("random", sparsity=0.89))


# ----------------------------------------------------------------------------- round trips and identity
@pytest.mark.parametrize("encoding", ["packbits", "zstd"])
def test_round_trip_file(tmp_path, tiny_sub, encoding):
    path = tiny_sub.save(tmp_path / f"m.{encoding}.safetensors", encoding=encoding)
    loaded = Subnetwork.load(path, expected_sha256=tiny_sub.sha256)
    assert loaded.arch == "open_clip/tiny"
    assert loaded.provenance == json.loads(json.dumps(tiny_sub.provenance))
    assert list(loaded) == sorted(tiny_sub)
    for name in tiny_sub:
        assert loaded[name].dtype == torch.bool and torch.equal(loaded[name], tiny_sub[name]), name
    assert loaded.sha256 == tiny_sub.sha256
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temporary file


def test_identity_ignores_metadata_and_encoding_but_not_content(tiny_sub):
    packed, zstd = tiny_sub.to_bytes("packbits"), tiny_sub.to_bytes("zstd")
    assert packed != zstd
    assert Subnetwork.from_bytes(packed).sha256 == Subnetwork.from_bytes(zstd).sha256 == tiny_sub.sha256
    other_meta = tiny_sub.with_provenance(method="something else", base_sha256="0" * 64)
    assert other_meta.sha256 == tiny_sub.sha256 and other_meta.to_bytes() != packed
    relabelled = Subnetwork(dict(tiny_sub.masks), arch="open_clip/other")
    assert relabelled.sha256 != tiny_sub.sha256  # the architecture is part of the identity (issue 12)
    arch = tiny_sub.arch
    # insertion order does not matter, the content does
    assert Subnetwork(dict(reversed(list(tiny_sub.masks.items()))), arch=arch).sha256 == tiny_sub.sha256
    name = sorted(tiny_sub)[2]
    flipped = dict(tiny_sub.masks)
    flipped[name] = flipped[name].clone()
    flipped[name].view(-1)[17] ^= True
    assert Subnetwork(flipped, arch=arch).sha256 != tiny_sub.sha256
    reshaped = dict(tiny_sub.masks)
    reshaped[name] = reshaped[name].reshape(1, -1)  # same bits, other shape
    assert Subnetwork(reshaped, arch=arch).sha256 != tiny_sub.sha256
    renamed = dict(tiny_sub.masks)
    renamed["x." + name] = renamed.pop(name)
    assert Subnetwork(renamed, arch=arch).sha256 != tiny_sub.sha256
    fewer = dict(tiny_sub.masks)
    fewer.pop(name)
    assert Subnetwork(fewer, arch=arch).sha256 != tiny_sub.sha256


def test_identity_independent_of_memory_layout():
    base = torch.rand(8, 6, generator=torch.Generator().manual_seed(3)) > 0.3
    strided = base.t().contiguous().t()  # same values, column-major storage
    assert not strided.is_contiguous()
    assert Subnetwork({"w": strided}).sha256 == Subnetwork({"w": base}).sha256
    as_numpy = Subnetwork({"w": base.numpy()})
    assert as_numpy.sha256 == Subnetwork({"w": base}).sha256


# ----------------------------------------------------------------------------- sizes
def entropy_bits(sub: Subnetwork) -> float:
    """Per-layer entropy bound: sum over layers of numel * H(kept fraction of that layer)."""
    total = 0.0
    for layer in sub.layers():
        p = layer.kept / layer.numel
        if 0 < p < 1:
            total += layer.numel * -(p * math.log2(p) + (1 - p) * math.log2(1 - p))
    return total


def test_rn50_packbits_size_at_most_1_05_bits_per_weight(rn50_sub):
    assert len(rn50_sub) == 54 and rn50_sub.numel == 23_473_152
    size = len(rn50_sub.to_bytes("packbits"))
    assert 8 * size / rn50_sub.numel <= 1.05
    assert size >= rn50_sub.numel // 8  # not cheating: every bit is there


def test_rn50_zstd_within_10_percent_of_per_layer_entropy(rn50_sub):
    data = rn50_sub.to_bytes("zstd")
    bound = entropy_bits(rn50_sub)
    assert 0.45 < bound / rn50_sub.numel < 0.55  # a per-layer 89 % mask: about 0.5 bits per weight
    assert 8 * len(data) <= 1.10 * bound, (8 * len(data) / rn50_sub.numel, bound / rn50_sub.numel)
    assert Subnetwork.from_bytes(data).sha256 == rn50_sub.sha256


# ----------------------------------------------------------------------------- statistics
def test_stats_match_independent_counts(tiny_sub):
    stats = tiny_sub.stats()
    numel = sum(int(np.prod(m.shape)) for m in tiny_sub.masks.values())
    kept = sum(int(m.numpy().sum()) for m in tiny_sub.masks.values())
    assert stats["total_params"] == numel == tiny_sub.numel
    assert stats["kept_params"] == kept == tiny_sub.kept
    assert stats["masked_params"] == numel - kept == tiny_sub.masked
    assert stats["sparsity"] == pytest.approx((numel - kept) / numel) == tiny_sub.sparsity
    assert stats["arch"] == "open_clip/tiny" and stats["sha256"] == tiny_sub.sha256
    assert stats["num_layers"] == len(tiny_sub) == len(stats["layers"])
    for layer in stats["layers"]:
        mask = tiny_sub[layer["name"]].numpy()
        assert layer["shape"] == list(mask.shape)
        assert layer["kept"] == int(mask.sum()) and layer["masked"] == mask.size - int(mask.sum())
        assert layer["sparsity"] == pytest.approx(1 - mask.mean())
    json.dumps(stats)  # plain data
    with pytest.raises(OpenTransError, match="non-empty and at least 2-D"):
        Subnetwork({"w": torch.zeros(0, 3, dtype=torch.bool)})


def test_nested_in_for_imp_rounds():
    gen = torch.Generator().manual_seed(0)
    scores = {"a": torch.rand(10, 10, generator=gen), "b": torch.rand(4, 5, generator=gen)}
    round1 = Subnetwork({k: v > 0.3 for k, v in scores.items()})
    round2 = Subnetwork({k: v > 0.6 for k, v in scores.items()})
    assert round2.nested_in(round1) and not round1.nested_in(round2)
    assert not round2.nested_in(Subnetwork({"a": scores["a"] > 0.3}))


# ----------------------------------------------------------------------------- provenance, compliance
def test_provenance_fields_and_base_sha256(tmp_path):
    before = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    prov = default_provenance("imp", base_sha256="ab" * 32, rounds=21, rate=0.1)
    assert prov["method"] == "imp" and prov["settings"] == {"rounds": 21, "rate": 0.1}
    assert prov["library"] == f"opentrans-hub {opentrans_hub.__version__}"
    created = dt.datetime.fromisoformat(prov["created"])
    assert before <= created <= dt.datetime.now(dt.timezone.utc)
    sub = Subnetwork({"w": torch.ones(3, 3, dtype=torch.bool)}, arch="open_clip/RN50", provenance=prov)
    loaded = Subnetwork.load(sub.save(tmp_path / "p.safetensors"))
    assert loaded.provenance == prov and loaded.base_sha256 == "ab" * 32
    assert prov["base_weights_sha256"] == "ab" * 32 and "base_weights_sha256" not in default_provenance("imp")
    assert Subnetwork({"w": torch.ones(1, 1, dtype=torch.bool)}).base_sha256 is None


@pytest.mark.parametrize("encoding", ["packbits", "zstd"])
def test_files_open_with_stock_safetensors(tmp_path, tiny_sub, encoding):
    path = tiny_sub.save(tmp_path / "s.safetensors", encoding=encoding)
    with safe_open(str(path), framework="np") as handle:
        meta = handle.metadata()
        assert set(handle.keys()) == set(tiny_sub)
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    assert meta["format"] == "opentrans-hub/subnetwork" and meta["encoding"] == encoding
    assert meta["arch"] == "open_clip/tiny" and meta["sha256"] == tiny_sub.sha256
    shapes = json.loads(meta["shapes"])
    for name, packed in tensors.items():
        assert packed.dtype == np.uint8 and packed.ndim == 1
        if encoding == "zstd":
            import zstandard

            packed = np.frombuffer(zstandard.ZstdDecompressor().decompress(packed.tobytes()), dtype=np.uint8)
        numel = math.prod(shapes[name])
        assert packed.size == (numel + 7) // 8
        bits = np.unpackbits(packed, count=numel).reshape(shapes[name]).astype(bool)
        assert np.array_equal(bits, tiny_sub[name].numpy()), name
    with safe_open(str(path), framework="pt") as handle:
        assert handle.get_tensor(sorted(tiny_sub)[0]).dtype == torch.uint8


def test_constructor_refuses_bad_masks():
    with pytest.raises(OpenTransError, match="bool"):
        Subnetwork({"w": torch.ones(2, 2)})
    with pytest.raises(OpenTransError, match="bool"):
        Subnetwork({"w": np.ones((2, 2), dtype=np.float32)})
    with pytest.raises(OpenTransError, match="bool"):
        Subnetwork({"w": np.array([object()])})
    with pytest.raises(OpenTransError, match="tensor"):
        Subnetwork({"w": [True, False]})
    with pytest.raises(OpenTransError):
        Subnetwork({"": torch.ones(1, 1, dtype=torch.bool)})
    with pytest.raises(OpenTransError):
        Subnetwork({"w": torch.ones(1, 1, dtype=torch.bool)}, arch="")
    with pytest.raises(OpenTransError, match="encoding"):
        Subnetwork({"w": torch.ones(1, 1, dtype=torch.bool)}).to_bytes("gzip")


def test_save_is_atomic_on_failure(tmp_path, tiny_sub):
    path = tiny_sub.save(tmp_path / "keep.safetensors")
    before = path.read_bytes()
    with pytest.raises(OpenTransError):
        tiny_sub.save(path, encoding="bogus")
    assert path.read_bytes() == before and not list(tmp_path.glob(".*.tmp"))


# ----------------------------------------------------------------------------- bad input (requirement 7)
def craft(tensors: dict[str, np.ndarray], **meta: str) -> bytes:
    """A safetensors file with our header, overridable field by field."""
    base = {"format": "opentrans-hub/subnetwork", "format_version": "1", "encoding": "packbits",
            "arch": "open_clip/tiny", "provenance": "{}"}
    base.update(meta)
    return st_save(tensors, metadata={k: v for k, v in base.items() if v is not None})


def good_parts(sub: Subnetwork) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    data = sub.to_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8:8 + n])["__metadata__"]
    return {k: np.packbits(v.reshape(-1).numpy()) for k, v in sub.masks.items()}, meta


def expect_error(data: bytes, tmp_path, match: str, tensor: str | None = None) -> OpenTransError:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    with pytest.raises(OpenTransError, match=match) as info:
        Subnetwork.load(path)
    assert str(path) in str(info.value) and info.value.path == str(path)
    if tensor is not None:
        assert info.value.tensor == tensor and repr(tensor) in str(info.value)
    assert "\n" not in str(info.value)
    return info.value


def test_truncated_files(tmp_path, tiny_sub):
    data = tiny_sub.to_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    for cut in (0, 3, 8, 8 + n // 2, 8 + n, len(data) - 1):
        expect_error(data[:cut], tmp_path, "truncated|too short|not fit|not valid JSON")


def test_corrupted_bits_are_a_hash_mismatch(tmp_path, tiny_sub):
    data = bytearray(tiny_sub.to_bytes())
    data[-5] ^= 0x10
    expect_error(bytes(data), tmp_path, "hash mismatch")
    # verify=False reads it (for forensics), and the content hash then differs
    assert Subnetwork.from_bytes(bytes(data), verify=False).sha256 != tiny_sub.sha256


def test_header_hash_mismatch_and_missing_hash(tmp_path, tiny_sub):
    tensors, meta = good_parts(tiny_sub)
    expect_error(craft(tensors, shapes=meta["shapes"], sha256="0" * 64), tmp_path, "hash mismatch")
    expect_error(craft(tensors, shapes=meta["shapes"]), tmp_path, "no sha256")
    path = tiny_sub.save(tmp_path / "ok.safetensors")
    with pytest.raises(OpenTransError, match="expected") as info:
        Subnetwork.load(path, expected_sha256="f" * 64)
    assert str(path) in str(info.value)


def test_wrong_dtype(tmp_path, tiny_sub):
    tensors, meta = good_parts(tiny_sub)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].astype(np.float32)
    expect_error(craft(tensors, shapes=meta["shapes"], sha256=meta["sha256"]), tmp_path, "dtype", tensor=name)


def test_shape_and_bit_count_disagree(tmp_path, tiny_sub):
    tensors, meta = good_parts(tiny_sub)
    shapes = json.loads(meta["shapes"])
    name = sorted(shapes)[1]
    shapes[name] = [shapes[name][0] * 2] + shapes[name][1:]
    expect_error(craft(tensors, shapes=json.dumps(shapes), sha256=meta["sha256"]), tmp_path, "bytes of bits",
                 tensor=name)
    shapes = json.loads(meta["shapes"])
    shapes[name] = [-1]
    expect_error(craft(tensors, shapes=json.dumps(shapes), sha256=meta["sha256"]), tmp_path, "bad shape",
                 tensor=name)
    shapes = json.loads(meta["shapes"])
    shapes["ghost.weight"] = [4]
    expect_error(craft(tensors, shapes=json.dumps(shapes), sha256=meta["sha256"]), tmp_path, "disagree")
    shapes = json.loads(meta["shapes"])
    shapes[name] = [0, 2**60]  # zero weights, absurd dimension: refused, not a numpy overflow
    expect_error(craft({**tensors, name: np.zeros(0, np.uint8)}, shapes=json.dumps(shapes), sha256=meta["sha256"]),
                 tmp_path, "bad shape", tensor=name)


def test_nonzero_padding_bits(tmp_path, tiny_sub):
    tensors, meta = good_parts(tiny_sub)
    tensors["attnpool.odd"] = tensors["attnpool.odd"].copy()
    tensors["attnpool.odd"][-1] |= 1  # 105 weights: the last 7 bits of the last byte are padding
    expect_error(craft(tensors, shapes=meta["shapes"], sha256=meta["sha256"]), tmp_path, "padding",
                 tensor="attnpool.odd")


def test_unknown_versions_encodings_and_foreign_files(tmp_path, tiny_sub):
    tensors, meta = good_parts(tiny_sub)
    common = {"shapes": meta["shapes"], "sha256": meta["sha256"]}
    expect_error(craft(tensors, format_version="2", **common), tmp_path, "newer")
    expect_error(craft(tensors, format_version="one", **common), tmp_path, "format_version")
    expect_error(craft(tensors, encoding="lz4", **common), tmp_path, "encoding")
    expect_error(craft(tensors, format="something/else", **common), tmp_path, "not an opentrans-hub")
    expect_error(craft(tensors, shapes="{not json", sha256=meta["sha256"]), tmp_path, "JSON")
    expect_error(craft(tensors, shapes="[1, 2]", sha256=meta["sha256"]), tmp_path, "JSON dict")
    expect_error(craft(tensors, provenance="[" * 100_000, **common), tmp_path, "JSON")
    # a stock safetensors model file is not a subnetwork
    from safetensors.torch import save as torch_save

    expect_error(torch_save(make_tiny_resnet().state_dict()), tmp_path, "dtype|not an opentrans-hub")
    expect_error(b"\x00" * 64, tmp_path, "safetensors|JSON")
    expect_error(json.dumps({"a": 1}).encode(), tmp_path, "JSON file, not a subnetwork")


def test_zstd_defects(tmp_path, tiny_sub):
    import zstandard

    tensors, meta = good_parts(tiny_sub)
    name = sorted(tensors)[0]
    common = {"shapes": meta["shapes"], "sha256": meta["sha256"], "encoding": "zstd"}
    packed = {k: np.frombuffer(zstandard.ZstdCompressor().compress(v.tobytes()), np.uint8) for k, v in tensors.items()}
    assert Subnetwork.from_bytes(craft(packed, **common)).sha256 == tiny_sub.sha256
    garbage = dict(packed)
    garbage[name] = np.frombuffer(b"not a zstd frame at all", np.uint8)
    expect_error(craft(garbage, **common), tmp_path, "zstd", tensor=name)
    bomb = dict(packed)  # a frame that claims far more than the shape needs is refused before inflating
    bomb[name] = np.frombuffer(zstandard.ZstdCompressor().compress(b"\0" * 50_000_000), np.uint8)
    expect_error(craft(bomb, **common), tmp_path, "zstd frame holds", tensor=name)
    streamed = dict(packed)  # no content size in the frame: inflation stops at what the shape needs
    streamed[name] = np.frombuffer(zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * 50_000_000),
                                   np.uint8)
    expect_error(craft(streamed, **common), tmp_path, "inflates beyond", tensor=name)
    huge = json.loads(meta["shapes"])
    huge[name] = [2**20, 2**20, 2**10]  # declared 2**50 weights: refused before any allocation
    expect_error(craft(streamed, **{**common, "shapes": json.dumps(huge)}), tmp_path, "more than any", tensor=name)
    short = dict(packed)
    short[name] = np.frombuffer(zstandard.ZstdCompressor().compress(tensors[name].tobytes()[:-1]), np.uint8)
    expect_error(craft(short, **common), tmp_path, "zstd frame holds|bytes of bits", tensor=name)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(OpenTransError, match="no such file") as info:
        Subnetwork.load(tmp_path / "nope.safetensors")
    assert "nope.safetensors" in str(info.value)
    with pytest.raises(OpenTransError, match="is a directory"):
        Subnetwork.load(tmp_path)  # a directory says so, not "no such file"
