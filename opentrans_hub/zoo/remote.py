"""Fetching from a Hugging Face Hub: ``hf://`` references, download through the HF cache, verified artefacts.

Below the registry (which resolves ``hf://`` names through :func:`fetch`) and below :mod:`~opentrans_hub.zoo.hub`
(which adds publishing and naming pulled artefacts), so the package has no import cycle.
``hf_hub_download`` with a revision is used, so the normal HF cache and ``HF_HUB_OFFLINE=1`` work; both
hashes (file and content) are checked before anything is returned. ``HF_ENDPOINT`` picks the server.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import OpenTransError
from ..formats.artefacts import KIND_FILES, decode

if TYPE_CHECKING:
    from ..formats.artefacts import Artefact

MANIFEST = "opentrans_hub.json"
MANIFEST_FORMAT = "opentrans-hub/hub-manifest"
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_HF_REF = re.compile(r"hf://(?P<repo>[^@/]+/[^@/]+)(?:@(?P<rev>[^/]+))?(?:/(?P<file>[^/]+))?")


# --------------------------------------------------------------------------- references
def parse_hf_ref(ref: str) -> tuple[str, str | None, str | None]:
    """``hf://ORG/REPO[@REVISION][/FILE]`` -> (repo_id, revision or None, file or None)."""
    m = _HF_REF.fullmatch(ref)
    if not m or not _REPO_ID.fullmatch(m.group("repo")):
        raise OpenTransError(f"bad Hub reference {ref!r}: expected hf://ORG/REPO[@REVISION][/FILE]")
    rev, file = m.group("rev"), m.group("file")
    if rev is not None and not _REVISION.fullmatch(rev):
        raise OpenTransError(f"bad revision {rev!r} in {ref!r}")
    if file is not None and file not in KIND_FILES.values():
        raise OpenTransError(f"refusing file {file!r} in {ref!r}: expected one of {', '.join(KIND_FILES.values())}")
    return m.group("repo"), rev, file


def check_repo_id(repo_id: str) -> str:
    if not isinstance(repo_id, str) or not _REPO_ID.fullmatch(repo_id):
        raise OpenTransError(f"bad repo id {repo_id!r}: expected ORG/REPO")
    return repo_id


# --------------------------------------------------------------------------- downloads
def _endpoint(endpoint: str | None) -> str | None:
    """The explicit endpoint, else ``HF_ENDPOINT`` as set now (huggingface_hub reads it once, at import)."""
    return endpoint or os.environ.get("HF_ENDPOINT") or None


def _hub_error(exc: Exception, what: str) -> OpenTransError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return OpenTransError(f"{what}: {type(exc).__name__}: {first[:300]}")


def _download(repo_id: str, filename: str, revision: str | None, endpoint: str | None,
              cache_dir: str | os.PathLike | None) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, endpoint=_endpoint(endpoint),
                                    cache_dir=cache_dir or os.environ.get("HF_HUB_CACHE") or None))
    except Exception as exc:  # huggingface_hub raises many types (HTTP, offline, not found)
        raise _hub_error(exc, f"hf://{repo_id}@{revision or 'main'}/{filename}") from None


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        raise OpenTransError("manifest is not valid JSON", path=path) from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise OpenTransError("not an opentrans-hub manifest", path=path)
    kind, file = manifest.get("kind"), manifest.get("file")
    if kind not in KIND_FILES or file != KIND_FILES[kind]:
        raise OpenTransError(f"manifest names kind {kind!r} and file {file!r}; refusing anything but "
                             f"{', '.join(KIND_FILES.values())}", path=path)
    for key in ("sha256", "file_sha256"):
        if not isinstance(manifest.get(key), str) or not re.fullmatch(r"[0-9a-f]{64}", manifest[key]):
            raise OpenTransError(f"manifest has no valid {key}", path=path)
    return manifest


def fetch(ref: str, endpoint: str | None = None,
          cache_dir: str | os.PathLike | None = None) -> tuple[Artefact, dict[str, Any]]:
    """Download ``hf://ORG/REPO[@REV][/FILE]`` and verify both hashes (the manifest's file and content sha256).

    Returns the artefact and a record (repo, revision, commit, local path, hashes).
    """
    repo_id, revision, wanted = parse_hf_ref(ref)
    manifest_path = _download(repo_id, MANIFEST, revision, endpoint, cache_dir)
    manifest = _read_manifest(manifest_path)
    if wanted is not None and wanted != manifest["file"]:
        raise OpenTransError(f"{ref}: the repo's manifest publishes {manifest['file']!r}, not {wanted!r}")
    path = _download(repo_id, manifest["file"], revision, endpoint, cache_dir)
    data = path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != manifest["file_sha256"]:
        raise OpenTransError(f"{ref}: file sha256 {actual[:16]}... is not the manifest's "
                             f"{manifest['file_sha256'][:16]}... (tampered or corrupted download)", path=path)
    obj = decode(data, str(path), kind=manifest["kind"], expected_sha256=manifest["sha256"])
    commit = path.parent.name  # hf cache layout: snapshots/<commit>/<file>
    record = {"ref": ref, "repo_id": repo_id, "revision": revision or "main", "commit": commit, "path": str(path),
              "kind": manifest["kind"], "sha256": obj.sha256, "file_sha256": actual}
    return obj, record


def weights_file(pretrained: str | os.PathLike | None, endpoint: str | None = None) -> str | os.PathLike | None:
    """``hf://ORG/REPO[@REV]/FILE`` weights are downloaded (HF cache); tags and paths pass through."""
    if isinstance(pretrained, str) and pretrained.startswith("hf://"):
        m = re.fullmatch(r"hf://([^@/]+/[^@/]+)(?:@([^/]+))?/(.+)", pretrained)
        if not m or not _REPO_ID.fullmatch(m.group(1)) or ".." in m.group(3).split("/"):
            raise OpenTransError(f"bad Hub weights reference {pretrained!r}: expected hf://ORG/REPO[@REV]/FILE")
        return _download(m.group(1), m.group(3), m.group(2), endpoint, None)
    return pretrained


