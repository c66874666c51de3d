"""Artefacts of the registry and the Hub: their kinds, names, file codec and the facts an entry records.

The lowest layer shared by :mod:`~opentrans_hub.zoo.registry`, :mod:`~opentrans_hub.zoo.remote` and
:mod:`~opentrans_hub.zoo.hub`, so those depend on each other one way only. The mask codecs
(:mod:`.subnetwork`, :mod:`.packed`) need torch and are imported only when a mask is decoded or met: names,
kinds, file hashes and layer selections (what ``opentrans-hub list`` and ``info`` show) stay light.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import TYPE_CHECKING, Any

from ..errors import OpenTransError
from ..io.atomic import read_bytes
from .selection import LayerSelection

if TYPE_CHECKING:
    from .packed import PackedFile
    from .subnetwork import Subnetwork

    Artefact = Subnetwork | LayerSelection | PackedFile

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}")
KIND_FILES = {"subnetwork": "subnetwork.safetensors", "selection": "selection.json",
              "packed": "backbone.sparse.safetensors"}
EXTENSIONS = {"subnetwork": ".safetensors", "selection": ".json", "packed": ".safetensors"}


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid registry name, else raise (names become file names)."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise OpenTransError(f"bad registry name {name!r}: use lower-case letters, digits, '.', '_' and '-', "
                             "starting with a letter or digit (at most 128 characters)")
    return name


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in chunks (base-weight files are hundreds of MB)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise OpenTransError(f"cannot read ({exc.strerror or exc})", path=path) from None
    return digest.hexdigest()


def _codec(kind: str) -> type | None:
    """The class that reads and writes artefacts of ``kind`` (the mask codecs imported on first need)."""
    if kind == "selection":
        return LayerSelection
    if kind == "subnetwork":
        from .subnetwork import Subnetwork

        return Subnetwork
    if kind == "packed":
        from .packed import PackedFile

        return PackedFile
    return None


def kind_of(obj: Artefact) -> str:
    for kind in ("selection", "subnetwork", "packed"):  # a selection is told without importing the mask codecs
        if isinstance(obj, _codec(kind)):
            return kind
    raise OpenTransError(f"expected a Subnetwork, LayerSelection or PackedFile, got {type(obj).__name__}")


def encode(obj: Artefact) -> bytes:
    """The bytes a registry stores for ``obj`` (safetensors for masks and packed files, JSON for selections)."""
    kind_of(obj)  # refuses anything else
    return obj.to_bytes()


def looks_like_json(data: bytes) -> bool:
    """JSON text (an object or a list, after a byte-order mark and blanks), not a safetensors file."""
    return data.removeprefix(b"\xef\xbb\xbf").lstrip()[:1] in (b"{", b"[")


def decode(data: bytes, source: str, kind: str | None = None, expected_sha256: str | None = None) -> Artefact:
    """Decode registry bytes; the kind is sniffed (JSON text: a selection; a packed file declares its format)
    unless given. Hashes verified."""
    if kind is None:
        if looks_like_json(data):
            kind = "selection"
        else:
            from .packed import FORMAT as PACKED_FORMAT
            from .packed import sniff

            kind = "packed" if sniff(data) == PACKED_FORMAT else "subnetwork"
    codec = _codec(kind)
    if codec is None:
        raise OpenTransError(f"unknown artefact kind {kind!r}", path=source)
    obj: Artefact = codec.from_bytes(data, source=source, verify=True)
    if expected_sha256 is not None and obj.sha256 != expected_sha256:
        raise OpenTransError(f"content sha256 {obj.sha256} is not the recorded {expected_sha256}", path=source)
    return obj


def read_artefact(path: str | os.PathLike, expected_sha256: str | None = None) -> Artefact:
    """A subnetwork or packed checkpoint (``.safetensors``) or layer selection (``.json``) from a file, verified."""
    return decode(read_bytes(path), str(path), expected_sha256=expected_sha256)


def summary(obj: Artefact) -> dict[str, Any]:
    """The few facts an entry records about its artefact (shown by ``list``/``info``)."""
    kind = kind_of(obj)
    if kind == "subnetwork":
        return {"arch": obj.arch, "sparsity": obj.sparsity, "layers": len(obj),
                "method": obj.provenance.get("method")}
    if kind == "packed":
        return {"arch": obj.arch, "sparsity": obj.sparsity, "layers": len(obj.reader.mask_names),
                "method": "packed", "subnetwork_sha256": obj.subnetwork.sha256 if obj.reader.mask_names else None,
                "dense_bytes": sum(s.dense_bytes for s in obj.reader.specs.values())}
    return {"arch": obj.arch, "layers": len(obj.layers), "trainable": len(obj.trainable),
            "method": (obj.policy or {}).get("name")}

