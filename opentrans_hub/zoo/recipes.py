"""Built-in recipes: the shipped index (``masks/``) of artefacts reproduced deterministically from named
base weights, which the registry materialises on first use.

Recipes pin their base weights by the weights FILE's sha256. The file is found as given (``weights=``),
else in ``$OPENTRANS_HUB_WEIGHTS_DIR`` (default ``~/.cache/clip``, open_clip's download cache), else
downloaded only when asked (``download=True`` / ``--download``); nothing is fetched implicitly.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import OpenTransError
from ..formats.artefacts import check_name, file_sha256

if TYPE_CHECKING:  # reading the index (``list``, ``info``) needs no torch; running a recipe imports it
    from ..formats.subnetwork import Subnetwork

INDEX_FORMAT = "opentrans-hub/index"
RECIPE_FORMAT = "opentrans-hub/recipe"
RECIPE_METHODS = ("global-magnitude-compounding",)
_RECIPE_KEYS = ("name", "kind", "arch", "base_weights", "method", "settings")


def load_index(index_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Read ``<index_dir>/index.json`` and the recipe files it names (which must stay inside ``index_dir``)."""
    index_dir = Path(index_dir)
    path = index_dir / "index.json"
    if not path.is_file():
        return {}
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise OpenTransError(f"cannot read the recipe index ({exc})", path=path) from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT or not isinstance(index.get("entries"), list):
        raise OpenTransError("not an opentrans-hub recipe index", path=path)
    out: dict[str, dict[str, Any]] = {}
    root = index_dir.resolve()
    for item in index["entries"]:
        if not isinstance(item, dict) or not isinstance(item.get("recipe"), str):
            raise OpenTransError(f"index entry {item!r} needs a 'recipe' file", path=path)
        name = check_name(item.get("name", ""))
        recipe_path = (index_dir / item["recipe"]).resolve()
        if not recipe_path.is_relative_to(root):
            raise OpenTransError(f"recipe file {item['recipe']!r} escapes the index folder", path=path)
        try:
            recipe = json.loads(recipe_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise OpenTransError(f"cannot read recipe ({exc})", path=recipe_path) from None
        if not isinstance(recipe, dict) or recipe.get("format") != RECIPE_FORMAT:
            raise OpenTransError("not an opentrans-hub recipe", path=recipe_path)
        missing = [key for key in _RECIPE_KEYS if key not in recipe]
        if missing:
            raise OpenTransError(f"recipe lacks {', '.join(missing)}", path=recipe_path)
        if recipe["name"] != name:
            raise OpenTransError(f"recipe is called {recipe['name']!r}, the index says {name!r}", path=recipe_path)
        if recipe["method"] not in RECIPE_METHODS or recipe["kind"] != "subnetwork":
            raise OpenTransError(f"unsupported recipe method/kind {recipe['method']!r}/{recipe['kind']!r}",
                                 path=recipe_path)
        sha = recipe["base_weights"].get("sha256") if isinstance(recipe["base_weights"], dict) else None
        if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise OpenTransError("recipe base_weights needs the sha256 of the weights file", path=recipe_path)
        out[name] = {**recipe, "recipe_file": str(recipe_path)}
    return out


def _find_base_weights(recipe: Mapping[str, Any], weights: str | os.PathLike | None, download: bool) -> Path:
    """The base-weights file: given, else open_clip's download cache, else (only if asked) downloaded."""
    base = recipe["base_weights"]
    if weights is not None:
        return Path(weights).expanduser()
    url, filename = base.get("url"), base.get("file")
    candidates = [Path(os.environ.get("OPENTRANS_HUB_WEIGHTS_DIR", "~/.cache/clip")).expanduser() / filename] \
        if filename else []
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    if download and url:
        from open_clip.pretrained import download_pretrained_from_url

        try:
            return Path(download_pretrained_from_url(url))
        except Exception as exc:  # network errors come in many types
            raise OpenTransError(f"recipe {recipe['name']!r}: downloading its base weights failed ({exc})") from None
    raise OpenTransError(
        f"recipe {recipe['name']!r} needs its base weights: {recipe['arch']} pretrained "
        f"{base.get('pretrained')!r} ({filename or 'weights file'}, sha256 {base['sha256'][:16]}...), which are not "
        f"available here (looked in {', '.join(map(str, candidates)) or 'no cache'}). Pass the file with "
        "--weights PATH (Python: weights=PATH), or allow --download.")


def _load_base_tower(recipe: Mapping[str, Any], path: Path):
    """Build the recipe's tower and load the (already hash-checked) weights file into it."""
    from ..towers.backbones import build_visual, load_visual_weights, visual_state_dict

    visual = build_visual(recipe["arch"])
    try:
        load_visual_weights(visual, path)
        return visual
    except OpenTransError as first:
        import zipfile

        if not zipfile.is_zipfile(path):
            raise
        # OpenAI's release files are TorchScript archives; their sha256 was pinned above, so they are trusted
        import warnings

        import torch

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
                state = torch.jit.load(str(path), map_location="cpu").state_dict()
        except Exception:
            raise first from None
        state = visual_state_dict(state)
        expected = visual.state_dict()
        for name, tensor in expected.items():
            if name not in state or tuple(state[name].shape) != tuple(tensor.shape):
                raise OpenTransError("TorchScript weights do not fit the tower", path=path, tensor=name) from None
        visual.load_state_dict({k: state[k].float() if state[k].is_floating_point() else state[k]
                                for k in expected}, strict=True)
        return visual


def run_recipe(recipe: Mapping[str, Any], weights: str | os.PathLike | None = None, download: bool = False,
               progress: bool = False) -> Subnetwork:
    """Reproduce a recipe's subnetwork from its base weights (whose file sha256 must match the recipe).

    ``global-magnitude-compounding``: ``rounds`` rounds, each pruning ``rate`` of the live weights by global
    magnitude over the scope (Conv2d weights except the first conv, by default), with no training between
    rounds, so the result is deterministic given the weights. Pruning is done by
    :func:`opentrans_hub.methods.imp.magnitude_masks`.
    """
    from ..formats.subnetwork import Subnetwork, default_provenance
    from ..methods.imp import PruneScope, magnitude_masks
    from ..towers.backbones import weights_sha256

    path = _find_base_weights(recipe, weights, download)
    expected = recipe["base_weights"]["sha256"]
    actual = file_sha256(path)
    if actual != expected:
        raise OpenTransError(f"base weights sha256 {actual[:16]}... is not the {expected[:16]}... recipe "
                             f"{recipe['name']!r} was defined on (wrong or modified weights file)", path=path)
    visual = _load_base_tower(recipe, path)
    settings = dict(recipe["settings"])
    rounds, rate = int(settings.get("rounds", 1)), float(settings.get("rate", 0.1))
    scope = PruneScope(**settings.get("scope", {}))
    selected = scope.select(visual)
    tensors = {name: param.detach() for name, (_, param) in selected.items()}
    masks: dict | None = None
    from tqdm.auto import tqdm

    for _ in tqdm(range(rounds), desc=f"materialising {recipe['name']}", disable=not progress, unit="round"):
        masks = magnitude_masks(tensors, masks, rate=rate, ranking=scope.ranking, min_density=scope.min_density)
    provenance = default_provenance(recipe["method"], rounds=rounds, rate=rate, scope=scope.to_dict(),
                                    retrain_between_rounds=False)
    if recipe.get("license"):
        provenance["license"] = recipe["license"]  # the base weights' license carries over to the mask
    provenance.update({"recipe": recipe["name"],
                       "base_weights": {**recipe["base_weights"], "weights_sha256": weights_sha256(visual)}})
    return Subnetwork(masks or {}, arch=recipe["arch"], provenance=provenance)



def builtin_index_dir() -> Path:
    """The shipped ``masks/`` folder: the package data copy in a wheel, the repo folder when editable."""
    package = Path(__file__).resolve().parents[1]
    packaged = package / "masks"
    if (packaged / "index.json").is_file():
        return packaged
    return package.parent / "masks"

