"""Fuzz every decoder of untrusted bytes under an address-space limit; run by ``test_decoder_fuzz.py``.

Usage: ``python fuzz_worker.py EXAMPLES HEADROOM_BYTES``. The worker builds valid samples (subnetwork files in both
encodings, packed files of format version 2 in both encodings and of version 1, a layer selection), then limits its
own address space to what it maps plus ``HEADROOM_BYTES``, sweeps tricky values through every header field, and
feeds the decoders mutated samples, edited headers and random bytes. Each decoder must succeed or raise one
OpenTransError (one line, naming the source); ``sniff`` must never raise. Anything else fails (a hypothesis
example, with its traceback) and the worker exits non-zero. A decoder that accepts an input must give back the very
content of the sample it came from. On success it prints one JSON object: per decoder, how many inputs it accepted
and refused.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.crafted import edit_json, edit_meta, split
from support.fuzz import mutate

from opentrans_hub import LayerSelection, OpenTransError, Subnetwork
from opentrans_hub.formats.packed import PackedFile, PackedReader
from opentrans_hub.io.sniff import Sniffed, sniff
from opentrans_hub.zoo.packing import pack_checkpoint, packed_stats

SOURCE = "fuzz.bin"
SEEN: Counter = Counter()


def samples() -> dict[str, bytes]:
    gen = torch.Generator().manual_seed(3)
    state = {"conv.weight": torch.randn(4, 3, 3, 3, generator=gen), "fc.weight": torch.randn(5, 7, generator=gen),
             "fc.bias": torch.randn(5, generator=gen)}
    for key in ("conv.weight", "fc.weight"):
        state[key][state[key].abs() < 0.8] = 0
    masks = {k: v != 0 for k, v in state.items() if k.endswith("weight")}
    sub = Subnetwork(masks, arch="open_clip/RN50")
    out = {"subnetwork packbits": sub.to_bytes("packbits"), "subnetwork zstd": sub.to_bytes("zstd")}
    with tempfile.TemporaryDirectory() as folder:
        for encoding in ("packbits", "zstd"):
            path = Path(folder) / f"{encoding}.safetensors"
            pack_checkpoint({"model": state, "iteration": 7}, path, subnetwork=sub, encoding=encoding)
            out[f"packed {encoding}"] = path.read_bytes()
    out["packed v1"] = (Path(__file__).resolve().parents[1] / "fixtures" / "packed-v1.safetensors").read_bytes()
    layers = [{"name": k, "param": k, "kind": "conv" if v.dim() == 4 else "linear", "shape": list(v.shape),
               "alpha": 2.0 + i, "trainable": bool(i % 2)} for i, (k, v) in enumerate(state.items()) if v.dim() > 1]
    out["selection"] = LayerSelection(layers, arch="open_clip/RN50", policy={"name": "median"}).to_bytes()
    return out


DECODERS = {"subnetwork": Subnetwork.from_bytes, "packed": PackedFile.from_bytes,
            "selection": LayerSelection.from_bytes}


def identity(decoder: str, data: bytes) -> str | None:
    """What ``decoder`` makes of a valid sample: its sha256 (a packed file's embedded subnetwork for the
    subnetwork decoder), None when it refuses that kind of file."""
    try:
        return DECODERS[decoder](data, source=SOURCE).sha256
    except OpenTransError:
        return None


SAMPLES = samples()
IDENTITY = {(decoder, name): identity(decoder, data) for decoder in DECODERS for name, data in SAMPLES.items()}


def refused(exc: OpenTransError) -> None:
    text = str(exc)
    assert "\n" not in text and text.startswith(f"{SOURCE}: "), text


def decode_all(data: bytes, origin: str | None) -> None:
    """Every decoder on ``data``; an accepted input must be the sample it was made from (same identity)."""
    found = sniff(data)  # never raises
    assert isinstance(found, Sniffed)
    for name, decode in DECODERS.items():
        try:
            obj = decode(data, source=SOURCE)
        except OpenTransError as exc:
            refused(exc)
            SEEN[f"{name} refused"] += 1
            continue
        SEEN[f"{name} accepted"] += 1
        assert origin is not None and obj.sha256 == IDENTITY[name, origin], (name, origin)
    try:  # the header-only and unverified paths too (inspect; forensics)
        reader = PackedReader(data, SOURCE)
        packed_stats(reader)
        reader.checkpoint(verify=False)
        reader.masks()
        SEEN["packed reader accepted"] += 1
    except OpenTransError as exc:
        refused(exc)
        SEEN["packed reader refused"] += 1


FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
_json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                         st.text(max_size=8))
_json = st.recursive(_json_scalar, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                           st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                     max_leaves=12)
_huge = st.one_of(st.integers(0, 70), st.integers(0, 2**64), st.sampled_from([1 << 31, 1 << 34, 1 << 40, 1 << 62]))


@given(origin=st.sampled_from(sorted(SAMPLES)), data=st.data())
def mutated(origin: str, data: st.DataObject) -> None:
    blob = mutate(data, SAMPLES[origin], mutations=3, chunk=16, overwrite=True)
    decode_all(blob, origin)


PACKED = sorted(name for name in SAMPLES if name.startswith("packed"))
#: values that have broken readers: digits int() refuses, blanks, line breaks, escapes, JSON of the wrong kind
TRICKY = ["", "0", "2", "99", " 1", "1\n", "\u00b9", "\u0663", "{}", "[]", "null", "\x1b[2J", "zstd", "raw"]
SUB_FIELDS = ["arch", "encoding", "format", "format_version", "provenance", "sha256", "shapes"]


def header_sweep() -> None:
    """Every header field of every packed sample (and of its embedded subnetwork) set to every tricky value, and
    deleted: a deterministic pass before the random ones."""
    for origin in PACKED:
        blob = SAMPLES[origin]
        for field in sorted(split(blob)[0]["__metadata__"]):
            decode_all(edit_meta(blob, **{field: None}), origin)
            for value in TRICKY:
                decode_all(edit_meta(blob, **{field: value}), origin)
        for field in SUB_FIELDS:
            for value in TRICKY:
                decode_all(edit_json(blob, "subnetwork", lambda sub, f=field, v=value: sub.update({f: v})), origin)


@given(origin=st.sampled_from(PACKED), data=st.data())
def edited_header(origin: str, data: st.DataObject) -> None:
    """A packed file's header metadata edited field by field: JSON fields replaced, tensor specs made to claim
    other (also huge) shapes and counts, fields deleted. The container stays exact, so the decoders' own checks
    are what is exercised."""
    blob = SAMPLES[origin]
    meta = split(blob)[0]["__metadata__"]
    field = data.draw(st.sampled_from(sorted(meta)), label="field")
    how = data.draw(st.sampled_from(["json", "text", "delete", "spec", "subnetwork"]), label="how")
    if how == "json":
        blob = edit_meta(blob, **{field: json.dumps(data.draw(_json, label="value"))})
    elif how == "text":
        blob = edit_meta(blob, **{field: data.draw(st.one_of(st.sampled_from(TRICKY), st.text(max_size=12)),
                                                   label="value")})
    elif how == "delete":
        blob = edit_meta(blob, **{field: None})
    elif how == "spec":
        key = data.draw(st.sampled_from(["model.conv.weight", "model.fc.weight", "model.fc.bias"]), label="key")
        shape = data.draw(st.lists(_huge, max_size=4), label="shape")
        kept = data.draw(st.one_of(st.none(), _huge), label="kept")

        def change(specs: dict) -> None:
            if key in specs:
                specs[key]["shape"] = shape
                if kept is not None and "kept" in specs[key]:
                    specs[key]["kept"] = kept

        blob = edit_json(blob, "tensors", change)
    else:
        sub_field = data.draw(st.sampled_from(SUB_FIELDS), label="sub")
        value = data.draw(st.one_of(st.sampled_from(TRICKY), st.text(max_size=8),
                                    _json.map(json.dumps),
                                    st.lists(_huge, max_size=3).map(lambda s: json.dumps({"fc.weight": s}))),
                          label="value")
        blob = edit_json(blob, "subnetwork", lambda sub: sub.update({sub_field: value}))
    decode_all(blob, origin)


@given(data=st.data())
def selection_documents(data: st.DataObject) -> None:
    """Layer selection manifests with fields replaced by arbitrary JSON, and arbitrary JSON documents."""
    doc = json.loads(SAMPLES["selection"])
    for _ in range(data.draw(st.integers(0, 3), label="edits")):
        key = data.draw(st.sampled_from(sorted(doc) + ["layers.0"]), label="key")
        value = data.draw(_json, label="value")
        if key == "layers.0" and isinstance(doc.get("layers"), list) and doc["layers"] and isinstance(
                doc["layers"][0], dict):
            doc["layers"][0][data.draw(st.sampled_from(["name", "shape", "alpha", "trainable"]), label="field")] = value
        else:
            doc[key] = value
    if data.draw(st.booleans(), label="any JSON"):
        doc = data.draw(_json, label="document")
    text = json.dumps(doc, allow_nan=True).encode()
    decode_all(text, "selection")


@given(blob=st.binary(max_size=300))
def random_bytes(blob: bytes) -> None:
    decode_all(blob, None)


def main() -> int:
    examples, headroom = int(sys.argv[1]), int(sys.argv[2])
    with open("/proc/self/statm") as handle:
        mapped = int(handle.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (mapped + headroom, mapped + headroom))
    header_sweep()
    for test in (mutated, edited_header, selection_documents, random_bytes):
        settings(FUZZ, max_examples=examples)(test)()
    print(json.dumps({"address_space_limit": mapped + headroom, **dict(sorted(SEEN.items()))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
