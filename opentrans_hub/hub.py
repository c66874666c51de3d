"""Distribution: publish subnetworks/selections to a Hugging Face Hub repo, pull them back, build backbones.

A published repo holds three files:

* ``subnetwork.safetensors`` (or ``selection.json``): the artefact itself;
* ``opentrans_hub.json``: a small manifest (kind, file, content sha256, file sha256, arch, summary);
* ``README.md``: a model card (YAML front matter with ``library_name: opentrans-hub``, tags, ``base_model``
  when known and ``license``; a sparsity table, the method, provenance and how to load it).

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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from .artefacts import KIND_FILES, Artefact, encode, kind_of, summary
from .errors import OpenTransError
from .registry import Registry, default_registry
from .remote import (  # noqa: F401  (parse_hf_ref, MANIFEST: hub's public names before the split)
    _REVISION,
    MANIFEST,
    MANIFEST_FORMAT,
    _endpoint,
    _hub_error,
    check_repo_id,
    fetch,
    parse_hf_ref,
    weights_file,
)
from .selection import LayerSelection
from .subnetwork import Subnetwork

#: open_clip weights tags -> the model id model cards name as ``base_model``
_BASE_MODELS = {("open_clip/RN50", "openai"): "timm/resnet50_clip.openai",
                ("open_clip/RN101", "openai"): "timm/resnet101_clip.openai"}


# --------------------------------------------------------------------------- model card
def _yaml_list(items: list[str]) -> str:
    return "".join(f"\n- {item}" for item in items)


def _base_model(obj: Artefact) -> str | None:
    base = obj.provenance.get("base_model") or obj.provenance.get("base_weights")
    if isinstance(base, str):
        return base
    if isinstance(base, Mapping):
        return _BASE_MODELS.get((obj.arch, base.get("pretrained")))
    return None


def model_card(obj: Artefact, manifest: Mapping[str, Any], license: str | None = None) -> str:
    """README.md text: YAML front matter the Hub indexes, then what the artefact is and how to load it."""
    kind = manifest["kind"]
    tags = ["opentrans-hub", "pruning" if kind == "subnetwork" else "layer-selection", "clip",
            "open-vocabulary-segmentation"]
    base = _base_model(obj)
    license = license or obj.provenance.get("license") or "apache-2.0"
    front = ["library_name: opentrans-hub", f"license: {license}", f"tags:{_yaml_list(tags)}"]
    if base:
        front.append(f"base_model: {base}")
    name = manifest.get("name") or manifest["file"]
    lines = ["---", *front, "---", "", f"# {name}", ""]
    method = obj.provenance.get("method") if kind == "subnetwork" else obj.policy.get("name")
    if kind == "subnetwork":
        stats = obj.stats()
        lines += [f"A pruned subnetwork (boolean keep-masks) of the CLIP image encoder `{obj.arch}`, stored in "
                  "opentrans-hub's bit-packed safetensors format, keyed by open_clip's canonical tensor names.", "",
                  "| masked tensors | weights | kept | sparsity |", "|---:|---:|---:|---:|",
                  f"| {stats['num_layers']} | {stats['total_params']:,} | {stats['kept_params']:,} | "
                  f"{stats['sparsity']:.2%} |", "", "<details><summary>Per-layer sparsity</summary>", "",
                  "| tensor | shape | kept | sparsity |", "|---|---|---:|---:|"]
        lines += [f"| `{layer['name']}` | {'x'.join(map(str, layer['shape']))} | {layer['kept']:,} | "
                  f"{layer['sparsity']:.2%} |" for layer in stats["layers"]]
        lines += ["", "</details>", ""]
    else:
        lines += [f"A layer selection for the CLIP image encoder `{obj.arch}`: {len(obj.trainable)} of "
                  f"{len(obj.layers)} layers are fine-tuned, the rest stay frozen.", ""]
    lines += ["## Method", "", f"`{method}`", "", "```json",
              json.dumps(obj.provenance if kind == "subnetwork" else {"policy": obj.policy, **obj.provenance},
                         indent=1, sort_keys=True, default=str), "```", "",
              "## Provenance", "", f"- content sha256: `{manifest['sha256']}`",
              f"- file `{manifest['file']}` sha256: `{manifest['file_sha256']}`",
              f"- created with {manifest.get('library', 'opentrans-hub')}", "",
              "## How to load", "", "```bash", "pip install opentrans-hub",
              "opentrans-hub pull hf://ORG/REPO --name my-subnetwork   # ORG/REPO: this repo", "```", "",
              "```python", "import opentrans_hub as oth",
              f"obj = oth.load_{'subnetwork' if kind == 'subnetwork' else 'selection'}(\"hf://ORG/REPO\")",
              "```", ""]
    return "\n".join(lines)


def export_folder(obj: Artefact, folder: str | os.PathLike, name: str | None = None,
                  license: str | None = None) -> dict[str, Any]:
    """Write the artefact, its manifest and a model card into ``folder``; returns the manifest."""
    from . import __version__

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    kind = kind_of(obj)
    data = encode(obj)
    manifest = {"format": MANIFEST_FORMAT, "format_version": 1, "name": name, "kind": kind, "file": KIND_FILES[kind],
                "sha256": obj.sha256, "file_sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                "library": f"opentrans-hub {__version__}", **summary(obj)}
    (folder / KIND_FILES[kind]).write_bytes(data)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str) + "\n", encoding="utf-8")
    (folder / "README.md").write_text(model_card(obj, manifest, license=license), encoding="utf-8")
    return manifest


# --------------------------------------------------------------------------- push / pull
def push(ref: str | os.PathLike | Artefact, repo_id: str, revision: str | None = None, private: bool = False,
         registry: Registry | None = None, endpoint: str | None = None, commit_message: str | None = None,
         license: str | None = None) -> dict[str, Any]:
    """Publish a registry name, file or object to ``repo_id`` (created if missing) on ``revision``."""
    from huggingface_hub import HfApi

    check_repo_id(repo_id)
    if revision is not None and not _REVISION.fullmatch(revision):
        raise OpenTransError(f"bad revision {revision!r}")
    if isinstance(ref, (Subnetwork, LayerSelection)):
        obj, name = ref, None
    else:
        obj, _ = (registry or default_registry()).resolve(ref)
        name = os.fspath(ref) if re.fullmatch(r"[a-z0-9][a-z0-9._-]*", os.fspath(ref)) else None
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise OpenTransError(f"push to {repo_id}: HF_HUB_OFFLINE is set, and publishing needs the network "
                             "(unset HF_HUB_OFFLINE to push)")
    api = HfApi(endpoint=_endpoint(endpoint))
    with tempfile.TemporaryDirectory(prefix="opentrans-hub-push-") as tmp:
        manifest = export_folder(obj, tmp, name=name, license=license)
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
            raise _hub_error(exc, f"push to {repo_id} at {api.endpoint}") from None
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


# --------------------------------------------------------------------------- backbones
def _check_same_arch(tower_arch: str, sub_arch: str, allow_partial: bool) -> None:
    """Two open_clip ids that differ are two architectures (RN50 and RN101 share their first blocks' shapes)."""
    from .backbones import parse_arch

    if sub_arch == "unknown":
        return
    try:
        tower, sub = parse_arch(tower_arch), parse_arch(sub_arch)
    except OpenTransError:
        return
    if tower[0] == sub[0] == "open_clip" and tower != sub and not allow_partial:
        raise OpenTransError(f"the subnetwork is for {sub_arch}, the tower is open_clip/{tower[1]}; nothing was "
                             "applied (allow_partial=True applies what fits and leaves the rest dense)")


def load_backbone(arch: str = "RN50", pretrained: str | os.PathLike | None = None,
                  subnetwork: str | os.PathLike | Subnetwork | None = None,
                  selection: str | os.PathLike | LayerSelection | None = None, exact: bool = False,
                  strict: bool = True, registry: Registry | None = None, allow_partial: bool = False) -> nn.Module:
    """A CLIP visual tower (canonical open_clip names) with an optional subnetwork and layer selection.

    ``arch``: ``RN50`` / ``open_clip/ViT-B-16`` / ``timm/resnet50_clip``. ``pretrained``: a tag (``openai``),
    a local weights file or ``hf://ORG/REPO[@REV]/FILE``. ``subnetwork`` / ``selection``: a registry name,
    ``hf://`` reference, path or object. ``exact=False`` bakes the zeros into plain weights (inference);
    ``exact=True`` keeps the masks so pruned weights stay exactly zero while training. A selection sets
    ``requires_grad`` through :meth:`LayerSelection.apply` (biases follow their weight, norms freeze).
    A subnetwork of another architecture (an RN50 one on an RN101 tower, whose extra blocks it cannot cover) is
    refused unless ``allow_partial`` (then ``tower.opentrans_subnetwork["dense"]`` lists what stays dense).
    """
    from .backbones import build_visual
    from .registry import load_selection, load_subnetwork
    from .sparsity import apply_subnetwork, bake

    tower = build_visual(arch, weights_file(pretrained))  # a bare name means open_clip
    if subnetwork is not None:
        sub = load_subnetwork(subnetwork, registry)
        _check_same_arch(arch, sub.arch, allow_partial)
        report = apply_subnetwork(tower, sub, strict=strict, allow_partial=allow_partial, scope="")
        if not exact:
            bake(tower)
        tower.opentrans_subnetwork = {"sha256": sub.sha256, "arch": sub.arch, "sparsity": sub.sparsity,
                                      "dense": list(report.uncovered)}
    if selection is not None:
        chosen = load_selection(selection, registry)
        _check_same_arch(arch, chosen.arch, allow_partial)
        report = chosen.apply(tower, strict=strict)  # listed layers as selected; norms and the rest frozen
        tower.opentrans_selection = {"sha256": chosen.sha256, "trainable": len(report.trainable)}
    return tower
