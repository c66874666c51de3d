"""Crafted packed and subnetwork files through the installed script: bounded decoding, and header fields that are
either covered by a hash or never read.

Every refusal is one stderr line, exit 2, no traceback, nothing written (``cli_util.assert_refused``). The files are
real ones packed here, then edited in place (``crafted``: header JSON changed, re-padded, offsets recomputed).
Commands that could allocate run under an address-space limit a little above what the started script maps, so a
decoder that allocated what a file claims would fail here instead of eating the machine.
"""

from __future__ import annotations

import json
import re
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from support.cli import assert_refused, cli_env, command, run_cli, tree_state
from support.crafted import edit_json, edit_meta, edit_subnetwork, mask_bomb, replace_tensors, split, zeros_frame

from opentrans_hub import Subnetwork
from opentrans_hub.zoo.packing import pack_checkpoint

FIXTURES = Path(__file__).parent / "fixtures"
GiB = 1 << 30
BOMB_SHAPE = [32768, 65536]  # 2^31 weights: 256 MiB of bits in an 8 KB zstd frame, 8 GiB dense in float32


def dense_state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(19)
    state = {"conv1.weight": torch.randn(8, 6, 3, 3, generator=gen), "fc.weight": torch.randn(12, 10, generator=gen),
             "fc.bias": torch.randn(12, generator=gen)}
    for key in ("conv1.weight", "fc.weight"):
        state[key][state[key].abs() < 0.9] = 0
    return state


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> dict[str, bytes]:
    """Packed files (zstd and packbits) of a flat checkpoint whose safetensors metadata carries a licence."""
    folder = tmp_path_factory.mktemp("packed")
    save_file(dense_state(), folder / "dense.safetensors", metadata={"licence": "cc-by-4.0"})
    out = {}
    for encoding in ("zstd", "packbits"):
        path = folder / f"{encoding}.safetensors"
        pack_checkpoint(folder / "dense.safetensors", path, zeros=True, arch="open_clip/RN50", encoding=encoding)
        out[encoding] = path.read_bytes()
    return out


@pytest.fixture(scope="module")
def mapped_by_script() -> int:
    """Address space a started script maps (torch and the package imported): the base of the limits below."""
    code = ("import torch, numpy, zstandard, safetensors; import opentrans_hub.cli, opentrans_hub.zoo.packing; "
            "print(int(open('/proc/self/statm').read().split()[0]) * __import__('os').sysconf('SC_PAGE_SIZE'))")
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def limited(root: Path, address_space: int, *args: object, **env: str) -> subprocess.CompletedProcess:
    """The script under ``RLIMIT_AS`` = ``address_space`` bytes."""
    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))

    return subprocess.run(command() + [str(a) for a in args], capture_output=True, text=True, timeout=300, cwd=root,
                          env=cli_env(root, **env), preexec_fn=cap)


def one_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# ------------------------------------------------------------------------------------------ bounded decoding
@pytest.mark.slow
def test_a_mask_bomb_is_described_from_its_header_and_refused_before_decoding(tmp_path, packed, mapped_by_script):
    """9 KB that claim an 8 GiB tensor: inspect shows the claim without decoding; unpack and verify refuse it
    before allocating, whether the limit comes from the address space, the environment or --max-bytes."""
    bomb = tmp_path / "bomb.safetensors"
    bomb.write_bytes(mask_bomb(packed["zstd"], "fc.weight", "fc.weight", BOMB_SHAPE))
    assert bomb.stat().st_size < 16_000
    cap = mapped_by_script + GiB  # a GiB of room: far less than the claim
    before = tree_state(tmp_path)

    shown = limited(tmp_path, cap, "inspect", bomb.name)
    assert shown.returncode == 0, shown.stderr
    assert f"{8 * GiB:,}" in shown.stdout and "not verified" in shown.stdout and "(verified)" not in shown.stdout
    info = json.loads(limited(tmp_path, cap, "inspect", bomb.name, "--json").stdout)
    assert info["verified"] is False and info["dense_bytes"] > 8 * GiB

    line = one_line(limited(tmp_path, cap, "unpack", bomb.name, "--out", "dense.pth"), bomb.name, "8.0 GiB",
                    "decode limit", "--max-bytes")
    assert "default" in line
    one_line(limited(tmp_path, cap, "verify", bomb.name), "decode limit")
    line = one_line(limited(tmp_path, cap, "unpack", bomb.name, "--out", "dense.pth",
                            OPENTRANS_HUB_MAX_DECODE_BYTES="512M"), "512.0 MiB", "OPENTRANS_HUB_MAX_DECODE_BYTES")
    line = one_line(limited(tmp_path, cap, "unpack", bomb.name, "--out", "dense.pth", "--max-bytes", "1G",
                            OPENTRANS_HUB_MAX_DECODE_BYTES="64G"), "1.0 GiB")  # the option wins
    # a limit raised past what the machine gives: the allocation fails, and that is one line too
    one_line(limited(tmp_path, cap, "unpack", bomb.name, "--out", "dense.pth", "--max-bytes", "64G"),
             "out of memory", bomb.name)
    assert tree_state(tmp_path) == before


def test_a_bad_limit_is_one_line(tmp_path, packed):
    (tmp_path / "p.safetensors").write_bytes(packed["packbits"])
    assert_refused(tmp_path, "unpack", "p.safetensors", "--out", "d.pth", "--max-bytes", "lots",
                   needles=("--max-bytes", "'lots' is not a size"))
    assert_refused(tmp_path, "unpack", "p.safetensors", "--out", "d.pth",
                   env={"OPENTRANS_HUB_MAX_DECODE_BYTES": "-3"}, needles=("OPENTRANS_HUB_MAX_DECODE_BYTES",))
    done = run_cli(tmp_path, "unpack", "p.safetensors", "--out", "d.pth", "--max-bytes", "64K")
    assert done.returncode == 0, done.stderr  # 2 KB dense: within 64 KiB


def test_a_subnetwork_bomb_is_refused_before_decoding(tmp_path, mapped_by_script):
    """A zstd subnetwork file whose frame of zeros is exactly what a 2^32-weight mask needs (16 KB on disk)."""
    sub = Subnetwork({"fc.weight": dense_state()["fc.weight"] != 0}, arch="open_clip/RN50")
    data = replace_tensors(sub.to_bytes("zstd"), {"fc.weight": zeros_frame(1 << 29)})
    header, _ = split(data)
    size = header["fc.weight"]["data_offsets"][1] - header["fc.weight"]["data_offsets"][0]
    data = replace_tensors(data, {}, shapes={"fc.weight": [size]})
    data = edit_meta(data, shapes=json.dumps({"fc.weight": [65536, 65536]}))
    (tmp_path / "bomb.safetensors").write_bytes(data)
    before = tree_state(tmp_path)
    one_line(limited(tmp_path, mapped_by_script + GiB, "inspect", "bomb.safetensors"), "4.0 GiB", "decode limit")
    one_line(limited(tmp_path, mapped_by_script + GiB, "import", "bomb.safetensors", "--out", "x.safetensors"))
    assert tree_state(tmp_path) == before


def _frame_without_size(nbytes: int) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor(write_content_size=False).compress(bytes(nbytes))


@pytest.mark.parametrize("defect", ["packbits short", "frame declares more", "frame too small for the shape"])
def test_mask_sizes_are_checked_against_the_file_by_inspect(tmp_path, packed, defect):
    """What a mask's stored bytes can hold is checked from the header and the frame's own header: inspect (which
    decodes nothing) refuses a file whose sizes do not add up, naming the tensor."""
    if defect == "packbits short":
        data = replace_tensors(packed["packbits"], {"fc.weight::mask": b"\0" * 3}, shapes={"fc.weight::mask": [3]})
        needles = ("3 bytes of bits", "fc.weight")
    elif defect == "frame declares more":
        blob = zeros_frame(1 << 20)
        data = replace_tensors(packed["zstd"], {"fc.weight::mask": blob}, shapes={"fc.weight::mask": [len(blob)]})
        needles = (f"holds {1 << 20} bytes", "fc.weight")
    else:  # no content size in the frame: bounded by what a frame of that length can inflate to
        blob = _frame_without_size(16)
        data = replace_tensors(packed["zstd"], {"fc.weight::mask": blob}, shapes={"fc.weight::mask": [len(blob)]})
        data = edit_json(data, "tensors", lambda specs: specs["fc.weight"].update(shape=[1 << 20, 1 << 12]))
        needles = ("cannot hold", "fc.weight")
    (tmp_path / "bad.safetensors").write_bytes(data)
    assert_refused(tmp_path, "inspect", "bad.safetensors", needles=needles)


# ------------------------------------------------------------------------------------------ header fields
def _resealed_arch(data: bytes, arch: str) -> bytes:
    """The embedded subnetwork re-declared for ``arch`` with a sha256 recomputed to match (a careful forger)."""
    sub = Subnetwork.from_bytes(data, verify=False)
    forged = Subnetwork(dict(sub.masks), arch=arch)
    return edit_meta(edit_subnetwork(data, arch=arch, sha256=forged.sha256), arch=arch)


EDITS = {
    "arch": (lambda d: edit_meta(d, arch="open_clip/RN101"), ("open_clip/RN101", "embedded subnetwork")),
    "embedded arch": (lambda d: edit_meta(edit_subnetwork(d, arch="open_clip/RN101"), arch="open_clip/RN101"),
                      ("content hash mismatch",)),
    "embedded arch, resealed": (lambda d: _resealed_arch(d, "open_clip/RN101"), ("content sha256",)),
    "licence": (lambda d: edit_json(d, "source_metadata", lambda m: m.update(licence="public-domain")),
                ("content sha256",)),
    "blank subnetwork sha256": (lambda d: edit_subnetwork(d, sha256=""), ("no sha256",)),
    "state": (lambda d: edit_meta(d, state="model"), ("content sha256",)),
    "masks swapped": (lambda d: edit_meta(d, masks=json.dumps({"conv1.weight": "fc.weight",
                                                                "fc.weight": "conv1.weight"})),
                      ("edited.safetensors",)),  # a hash or a shape refuses it, depending on what is read first
}


@pytest.mark.slow
@pytest.mark.parametrize("edit", sorted(EDITS))
def test_an_edited_header_field_is_refused(tmp_path, packed, edit):
    change, needles = EDITS[edit]
    (tmp_path / "edited.safetensors").write_bytes(change(packed["zstd"]))
    assert_refused(tmp_path, "unpack", "edited.safetensors", "--out", "dense.safetensors", needles=needles)
    assert_refused(tmp_path, "add", "edited.safetensors", "--name", "edited", needles=needles)  # as verify reads
    shown = run_cli(tmp_path, "inspect", "edited.safetensors")
    assert "(verified)" not in shown.stdout + shown.stderr  # header only: it claims nothing


def test_fields_that_are_not_read_change_nothing(tmp_path, packed):
    """cast and library are written for older readers and for people; editing them changes no output."""
    (tmp_path / "p.safetensors").write_bytes(packed["zstd"])
    (tmp_path / "e.safetensors").write_bytes(edit_meta(packed["zstd"], cast="fp16", library="someone else 9.9"))
    for name in ("p", "e"):
        done = run_cli(tmp_path, "unpack", f"{name}.safetensors", "--out", f"{name}.dense.safetensors")
        assert done.returncode == 0 and "subnetwork sha256" in done.stdout and " verified" in done.stdout, done.stderr
    assert (tmp_path / "p.dense.safetensors").read_bytes() == (tmp_path / "e.dense.safetensors").read_bytes()
    info = json.loads(run_cli(tmp_path, "inspect", "e.safetensors", "--json").stdout)
    assert info["cast"] is None and info["arch"] == "open_clip/RN50" and info["format_version"] == 2
    with safe_open(str(tmp_path / "e.dense.safetensors"), "pt") as handle:
        assert handle.metadata() == {"licence": "cc-by-4.0"}


def test_a_registry_entry_records_the_verified_arch(tmp_path, packed):
    (tmp_path / "p.safetensors").write_bytes(packed["packbits"])
    added = run_cli(tmp_path, "add", "p.safetensors", "--name", "tiny-packed", "--json")
    assert added.returncode == 0, added.stderr
    entry = json.loads(added.stdout)
    assert entry["arch"] == "open_clip/RN50"
    info = json.loads(run_cli(tmp_path, "info", "tiny-packed", "--json").stdout)
    assert info["verified"] is True and info["arch"] == "open_clip/RN50"


# ------------------------------------------------------------------------------------------ version 1 files
def test_a_version_1_file_reads_and_says_what_its_hash_leaves_out(tmp_path):
    """A file written by opentrans-hub 0.2.0 (format version 1): inspect, verify and unpack still work, and say
    which fields are not covered; its source metadata comes through with a warning."""
    (tmp_path / "old.safetensors").write_bytes((FIXTURES / "packed-v1.safetensors").read_bytes())
    shown = run_cli(tmp_path, "inspect", "old.safetensors")
    assert shown.returncode == 0 and "format version 1" in shown.stdout
    assert re.search(r"does not cover .*source_metadata", shown.stdout), shown.stdout
    checked = run_cli(tmp_path, "verify", "old.safetensors")
    assert checked.returncode == 0 and checked.stdout.startswith("ok: ") and "not verified" in checked.stdout
    done = run_cli(tmp_path, "unpack", "old.safetensors", "--out", "dense.safetensors")
    assert done.returncode == 0, done.stderr
    assert "warning" in done.stderr and "source_metadata" in done.stderr and "unverified" in done.stderr
    with safe_open(str(tmp_path / "dense.safetensors"), "pt") as handle:
        assert handle.metadata() == {"licence": "cc-by-4.0", "note": "dense source"}
        assert sorted(handle.keys()) == ["conv1.weight", "fc.bias", "fc.weight"]
    quiet = run_cli(tmp_path, "unpack", "old.safetensors", "--out", "dense.pth")  # no metadata written: no warning
    assert quiet.returncode == 0 and quiet.stderr == ""
