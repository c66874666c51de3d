"""Distribution: publish subnetworks, selections and packed backbones to a Hugging Face Hub repo, pull them
back, build backbones.

A published repo holds three files:

* ``subnetwork.safetensors`` (or ``selection.json``, ``backbone.sparse.safetensors``): the artefact itself;
* ``opentrans_hub.json``: a small manifest (kind, file, content sha256, file sha256, arch, summary);
* ``README.md``: a model card (YAML front matter with ``library_name: opentrans-hub``, tags, ``base_model``
  when known and ``license``; a sparsity table, the method, provenance and how to load it);
* a selection's card shows ``alpha.png``: alpha per layer, the trainable split and its learning-rate scales.

``push`` uses ``HfApi.create_repo(exist_ok=True)`` and ``upload_folder``; ``pull`` uses
``hf_hub_download`` with a revision, so the normal HF cache and ``HF_HUB_OFFLINE=1`` work, and checks both
hashes before anything is returned. Tokens come from the usual HF environment/config (``HF_TOKEN``,
``hf auth login``), never from arguments. ``HF_ENDPOINT`` picks the server.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import OpenTransError
from ..formats.artefacts import KIND_FILES, encode, kind_of, summary
from ..formats.packed import PackedFile
from ..formats.selection import LayerSelection
from ..formats.subnetwork import Subnetwork
from .cards import model_card, write_card_plot  # noqa: F401  (model_card: hub's public name before the split)
from .registry import Registry, default_registry
from .remote import (  # noqa: F401  (parse_hf_ref, MANIFEST: hub's public names before the split)
    MANIFEST,
    MANIFEST_FORMAT,
    REVISION_PATTERN,
    check_repo_id,
    fetch,
    hub_endpoint,
    hub_error,
    parse_hf_ref,
    weights_file,
)

if TYPE_CHECKING:
    from ..formats.artefacts import Artefact


def export_folder(obj: Artefact, folder: str | os.PathLike, name: str | None = None,
                  license: str | None = None, base_model: str | None = None,
                  repo_id: str | None = None) -> dict[str, Any]:
    """Write the artefact, its manifest and a model card into ``folder``; returns the manifest."""
    from ..version import __version__

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    kind = kind_of(obj)
    data = encode(obj)
    manifest = {"format": MANIFEST_FORMAT, "format_version": 1, "name": name, "kind": kind, "file": KIND_FILES[kind],
                "sha256": obj.sha256, "file_sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                "library": f"opentrans-hub {__version__}", **summary(obj)}
    (folder / KIND_FILES[kind]).write_bytes(data)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str) + "\n", encoding="utf-8")
    plot = write_card_plot(obj, kind, folder)
    (folder / "README.md").write_text(model_card(obj, manifest, license=license, base=base_model,
                                                          repo_id=repo_id, plot=plot), encoding="utf-8")
    return manifest


# --------------------------------------------------------------------------- push / pull
def push(ref: str | os.PathLike | Artefact, repo_id: str, revision: str | None = None, private: bool = False,
         registry: Registry | None = None, endpoint: str | None = None, commit_message: str | None = None,
         license: str | None = None, base_model: str | None = None) -> dict[str, Any]:
    """Publish a registry name, file or object to ``repo_id`` (created if missing) on ``revision``.

    Subnetworks, layer selections and packed sparse checkpoints (``opentrans-hub pack``) alike; the model
    card names ``base_model`` (given, else from the mask's provenance) and how the repo relates to it.
    """
    from huggingface_hub import HfApi

    check_repo_id(repo_id)
    if revision is not None and not REVISION_PATTERN.fullmatch(revision):
        raise OpenTransError(f"bad revision {revision!r}")
    if isinstance(ref, (Subnetwork, LayerSelection, PackedFile)):
        obj, name = ref, None
    else:
        obj, _ = (registry or default_registry()).resolve(ref)
        name = os.fspath(ref) if re.fullmatch(r"[a-z0-9][a-z0-9._-]*", os.fspath(ref)) else None
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise OpenTransError(f"push to {repo_id}: HF_HUB_OFFLINE is set, and publishing needs the network "
                             "(unset HF_HUB_OFFLINE to push)")
    api = HfApi(endpoint=hub_endpoint(endpoint))
    with tempfile.TemporaryDirectory(prefix="opentrans-hub-push-") as tmp:
        manifest = export_folder(obj, tmp, name=name, license=license, base_model=base_model, repo_id=repo_id)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision is not None:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            info = api.upload_folder(repo_id=repo_id, folder_path=tmp, revision=revision,
                                     commit_message=commit_message or f"opentrans-hub: {name or manifest['kind']} "
                                                                      f"{manifest['sha256'][:12]}")
        except Exception as exc:  # HTTP errors, refused or unreachable endpoints, a missing token: whatever the
            # HTTP client raises (huggingface_hub's transport has changed clients before), one line naming the
            # repo and the endpoint, never a traceback
            raise hub_error(exc, f"push to {repo_id} at {api.endpoint}") from None
    return {"repo_id": repo_id, "revision": revision or "main", "commit": info.oid, "commit_url": info.commit_url,
            "ref": f"hf://{repo_id}@{info.oid}", **manifest}


def pull(ref: str, name: str | None = None, registry: Registry | None = None, endpoint: str | None = None,
         cache_dir: str | os.PathLike | None = None) -> tuple[Artefact, dict[str, Any]]:
    """Download ``hf://ORG/REPO[@REV][/FILE]``, verify both hashes, optionally add it to a registry as ``name``.

    Returns the artefact and a record (repo, revision, commit, local path, hashes).
    """
    obj, record = fetch(ref, endpoint=endpoint, cache_dir=cache_dir)
    if name is not None:
        entry = (registry or default_registry()).add(obj, name, source=f"hf://{record['repo_id']}@{record['commit']}",
                                                     overwrite=True)
        record["name"] = entry.name
    return obj, record
