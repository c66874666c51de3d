"""Named subnetworks and layer selections: a user registry, the built-in recipe index, Hub repos, plain files.

A reference (``ref``) is resolved from four sources, in this order:

1. a name in the **user registry** (``$OPENTRANS_HUB_HOME``, else the platform's user data folder);
2. a name in the **built-in index** (``masks/index.json``): a recipe that reproduces the artefact
   deterministically from named base weights; it is materialised into the user registry on first use
   when those weights are available (:func:`run_recipe`);
3. a **Hub repo**: ``hf://ORG/REPO[@REVISION]`` (pulled with :mod:`opentrans_hub.hub`);
4. a **plain path** to a ``.safetensors`` subnetwork or a ``.json`` layer selection.

Layout of a registry root (all writes: temp file + ``os.replace`` under one file lock)::

    <root>/entries/<name>.json            entry: kind, sha256 (content), file_sha256 (bytes), arch, source...
    <root>/objects/<file_sha256>.<ext>    the artefact, content-addressed (immutable once written)
    <root>/.lock                          filelock guarding every write

Names match ``[a-z0-9][a-z0-9._-]*`` (at most 128 characters); an entry whose file would lie outside
``objects/`` is refused. Every load checks the file's sha256 and the artefact's content sha256.
Overwriting a name deletes the object no entry uses any more; a reader that loses that race re-reads the entry.

Recipes pin their base weights by the weights FILE's sha256. The file is found as given (``weights=``),
else in ``$OPENTRANS_HUB_WEIGHTS_DIR`` (default ``~/.cache/clip``, open_clip's download cache), else
downloaded only when asked (``download=True`` / ``--download``); nothing is fetched implicitly.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._atomic import atomic_write_bytes, atomic_write_text, read_bytes
from .errors import OpenTransError
from .selection import LayerSelection
from .subnetwork import Subnetwork

ENV_HOME = "OPENTRANS_HUB_HOME"
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}")
ENTRY_FORMAT = "opentrans-hub/registry-entry"
INDEX_FORMAT = "opentrans-hub/index"
KIND_FILES = {"subnetwork": "subnetwork.safetensors", "selection": "selection.json"}
_EXT = {"subnetwork": ".safetensors", "selection": ".json"}
_OBJECT_NAME = re.compile(r"objects/[0-9a-f]{64}\.(safetensors|json)")
_LOCK_TIMEOUT_S = 120.0

Artefact = Subnetwork | LayerSelection


# --------------------------------------------------------------------------- names and places
def check_name(name: str) -> str:
    """Return ``name`` if it is a valid registry name, else raise (names become file names)."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise OpenTransError(f"bad registry name {name!r}: use lower-case letters, digits, '.', '_' and '-', "
                             "starting with a letter or digit (at most 128 characters)")
    return name


def default_root() -> Path:
    """``$OPENTRANS_HUB_HOME``, else the platform's per-user data folder for opentrans-hub."""
    env = os.environ.get(ENV_HOME)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("opentrans-hub", appauthor=False))


def builtin_index_dir() -> Path:
    """The shipped ``masks/`` folder: the package data copy in a wheel, the repo folder when editable."""
    packaged = Path(__file__).resolve().parent / "masks"
    if (packaged / "index.json").is_file():
        return packaged
    return Path(__file__).resolve().parent.parent / "masks"


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


# --------------------------------------------------------------------------- artefacts
def kind_of(obj: Artefact) -> str:
    if isinstance(obj, Subnetwork):
        return "subnetwork"
    if isinstance(obj, LayerSelection):
        return "selection"
    raise OpenTransError(f"expected a Subnetwork or LayerSelection, got {type(obj).__name__}")


def encode(obj: Artefact) -> bytes:
    """The bytes a registry stores for ``obj`` (safetensors for masks, JSON for selections)."""
    kind_of(obj)  # refuses anything else
    return obj.to_bytes()


def decode(data: bytes, source: str, kind: str | None = None, expected_sha256: str | None = None) -> Artefact:
    """Decode registry bytes; the kind is sniffed (JSON starts with ``{``) unless given. Hashes verified."""
    if kind is None:
        kind = "selection" if looks_like_json(data) else "subnetwork"
    codec = {"subnetwork": Subnetwork, "selection": LayerSelection}.get(kind)
    if codec is None:
        raise OpenTransError(f"unknown artefact kind {kind!r}", path=source)
    obj: Artefact = codec.from_bytes(data, source=source, verify=True)
    if expected_sha256 is not None and obj.sha256 != expected_sha256:
        raise OpenTransError(f"content sha256 {obj.sha256} is not the recorded {expected_sha256}", path=source)
    return obj


def looks_like_json(data: bytes) -> bool:
    """JSON text (an object or a list, after a byte-order mark and blanks), not a safetensors file."""
    return data.removeprefix(b"\xef\xbb\xbf").lstrip()[:1] in (b"{", b"[")


def read_artefact(path: str | os.PathLike, expected_sha256: str | None = None) -> Artefact:
    """A subnetwork (``.safetensors``) or layer selection (``.json``) from a plain file, verified."""
    return decode(read_bytes(path), str(path), expected_sha256=expected_sha256)


def summary(obj: Artefact) -> dict[str, Any]:
    """The few facts an entry records about its artefact (shown by ``list``/``info``)."""
    if isinstance(obj, Subnetwork):
        return {"arch": obj.arch, "sparsity": obj.sparsity, "layers": len(obj),
                "method": obj.provenance.get("method")}
    return {"arch": obj.arch, "layers": len(obj.layers), "trainable": len(obj.trainable),
            "method": (obj.policy or {}).get("name")}


# --------------------------------------------------------------------------- entries
@dataclass
class Entry:
    """One named artefact in a registry: where it lives and the hashes it must match."""

    name: str
    kind: str
    sha256: str
    file_sha256: str
    path: Path
    source: str = "local"
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "sha256": self.sha256, "file_sha256": self.file_sha256,
                "path": str(self.path), "source": self.source, **self.meta}

    def load(self) -> Artefact:
        """Read and verify (file bytes, then content) the artefact."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            raise _ObjectGone(f"registry entry {self.name!r}: its file is missing", path=self.path) from None
        except OSError as exc:
            raise OpenTransError(f"registry entry {self.name!r}: cannot read ({exc.strerror or exc})",
                                 path=self.path) from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != self.file_sha256:
            raise OpenTransError(f"registry entry {self.name!r}: file sha256 {actual[:16]}... is not the recorded "
                                 f"{self.file_sha256[:16]}... (file changed or tampered with)", path=self.path)
        return decode(data, str(self.path), kind=self.kind, expected_sha256=self.sha256)


class _ObjectGone(OpenTransError):
    """An entry's object vanished: a concurrent overwrite replaced the entry (readers re-read it)."""


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class Registry:
    """Named subnetworks and layer selections under ``root`` plus the built-in recipe index.

    ``index_dir`` points at a recipe index (default: the shipped ``masks/``); tests pass their own.
    """

    def __init__(self, root: str | os.PathLike | None = None, index_dir: str | os.PathLike | None = None):
        self.root = Path(root).expanduser() if root is not None else default_root()
        self.index_dir = Path(index_dir) if index_dir is not None else builtin_index_dir()

    def __repr__(self) -> str:
        return f"Registry(root={str(self.root)!r}, index={str(self.index_dir)!r})"

    # ----------------------------------------------------------------- places
    @property
    def entries_dir(self) -> Path:
        return self.root / "entries"

    @property
    def objects_dir(self) -> Path:
        return self.root / "objects"

    @contextlib.contextmanager
    def _lock(self):
        """The registry's write lock (a file lock, so it holds across processes)."""
        from filelock import FileLock, Timeout

        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OpenTransError(f"cannot create the registry folder ({exc.strerror or exc})", path=self.root) from None
        lock = FileLock(str(self.root / ".lock"), timeout=_LOCK_TIMEOUT_S)
        try:
            lock.acquire()
        except Timeout:
            raise OpenTransError(f"registry is locked by another process for over {_LOCK_TIMEOUT_S:.0f} s",
                                 path=self.root / ".lock") from None
        try:
            yield
        finally:
            lock.release()

    def _entry_path(self, name: str) -> Path:
        return self.entries_dir / f"{check_name(name)}.json"

    # ----------------------------------------------------------------- reading
    def entry(self, name: str) -> Entry | None:
        """The user-registry entry called ``name``, or None. A malformed entry file raises."""
        path = self._entry_path(name)
        try:
            raw = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise OpenTransError(f"cannot read ({exc.strerror or exc})", path=path) from None
        try:
            data = json.loads(raw)
        except ValueError:
            raise OpenTransError("registry entry is not valid JSON", path=path) from None
        if not isinstance(data, dict) or data.get("format") != ENTRY_FORMAT:
            raise OpenTransError("not an opentrans-hub registry entry", path=path)
        kind, rel = data.get("kind"), data.get("file")
        if kind not in KIND_FILES:
            raise OpenTransError(f"unknown kind {kind!r}", path=path)
        if not isinstance(rel, str) or not _OBJECT_NAME.fullmatch(rel):
            raise OpenTransError(f"refusing entry file {rel!r}: entries may only point into objects/", path=path)
        target = (self.root / rel).resolve()
        if not target.is_relative_to(self.objects_dir.resolve()):
            raise OpenTransError(f"refusing entry file {rel!r}: it escapes the registry", path=path)
        for key in ("sha256", "file_sha256"):
            if not isinstance(data.get(key), str) or not re.fullmatch(r"[0-9a-f]{64}", data[key]):
                raise OpenTransError(f"entry has no valid {key}", path=path)
        if data.get("name") != name:
            raise OpenTransError(f"entry file names {data.get('name')!r}, expected {name!r}", path=path)
        meta = {k: v for k, v in data.items()
                if k not in {"format", "name", "kind", "sha256", "file_sha256", "file", "source"}}
        return Entry(name, kind, data["sha256"], data["file_sha256"], target, str(data.get("source", "local")), meta)

    def load(self, name: str) -> Artefact | None:
        """Load and verify the user entry ``name`` (None if absent); re-reads the entry if a concurrent
        overwrite removed the object between reading the entry and reading its file."""
        for _ in range(5):
            entry = self.entry(name)
            if entry is None:
                return None
            try:
                return entry.load()
            except _ObjectGone:
                continue
        return self.entry(name).load() if self.entry(name) is not None else None

    def names(self) -> list[str]:
        """Names in the user registry (sorted)."""
        if not self.entries_dir.is_dir():
            return []
        return sorted(p.stem for p in self.entries_dir.glob("*.json") if NAME_PATTERN.fullmatch(p.stem))

    def recipes(self) -> dict[str, dict[str, Any]]:
        """The built-in index: name -> recipe (settings to reproduce the artefact)."""
        return load_index(self.index_dir)

    def list(self) -> list[dict[str, Any]]:
        """Every name: user entries first, then built-in recipes not yet materialised."""
        rows = []
        for name in self.names():
            try:
                entry = self.entry(name)
            except OpenTransError as exc:  # one broken entry must not hide the others
                rows.append({"name": name, "kind": "?", "source": "local", "status": f"broken: {exc.detail}"})
                continue
            if entry is not None:
                rows.append({**entry.to_dict(), "status": "local"})
        have = {row["name"] for row in rows}
        for name, recipe in self.recipes().items():
            if name not in have:
                rows.append({"name": name, "kind": recipe["kind"], "arch": recipe["arch"], "source": "builtin",
                             "status": "recipe (materialised on first use)", "method": recipe["method"],
                             "description": recipe.get("description", "")})
        return rows

    def info(self, name: str) -> dict[str, Any]:
        """Everything known about ``name`` (user entry, else built-in recipe)."""
        entry = self.entry(check_name(name))
        if entry is not None:
            obj = entry.load()
            out = {**entry.to_dict(), "status": "local", "verified": True}
            if isinstance(obj, Subnetwork):
                out["provenance"] = obj.provenance
                out["stats"] = {k: v for k, v in obj.stats().items() if k != "layers"}
            else:
                out["policy"] = obj.policy
                out["provenance"] = obj.provenance
            return out
        recipe = self.recipes().get(name)
        if recipe is not None:
            return {"name": name, "status": "recipe (materialised on first use)", "source": "builtin", **recipe}
        raise OpenTransError(f"no registry entry or built-in recipe named {name!r} (see `opentrans-hub list`)")

    # ----------------------------------------------------------------- writing
    def add(self, obj_or_path: Artefact | str | os.PathLike, name: str, source: str | None = None,
            overwrite: bool = False, extra: Mapping[str, Any] | None = None) -> Entry:
        """Store a subnetwork/selection (object or file, verified first) under ``name``; atomic and locked."""
        check_name(name)
        if isinstance(obj_or_path, (Subnetwork, LayerSelection)):
            obj, default_source = obj_or_path, "python"
        else:
            obj, default_source = read_artefact(obj_or_path), f"file:{Path(obj_or_path).resolve()}"
        kind = kind_of(obj)
        data = encode(obj)
        digest = hashlib.sha256(data).hexdigest()
        rel = f"objects/{digest}{_EXT[kind]}"
        record = {"format": ENTRY_FORMAT, "name": name, "kind": kind, "sha256": obj.sha256, "file_sha256": digest,
                  "file": rel, "bytes": len(data), "source": source or default_source, "added": _now(),
                  **summary(obj), **dict(extra or {})}
        with self._lock():
            try:
                existing = self.entry(name)
            except OpenTransError:
                if not overwrite:
                    raise
                existing = None  # a broken entry may be replaced
            if existing is not None and not overwrite:
                if existing.sha256 == obj.sha256 and existing.kind == kind:
                    return existing
                raise OpenTransError(f"registry name {name!r} is taken by another {existing.kind} "
                                     f"(sha256 {existing.sha256[:12]}); choose another name or overwrite",
                                     path=self._entry_path(name))
            target = self.root / rel
            if not target.is_file() or hashlib.sha256(target.read_bytes()).hexdigest() != digest:
                atomic_write_bytes(target, data)
            atomic_write_text(self._entry_path(name), json.dumps(record, indent=1, default=str) + "\n")
            if existing is not None and existing.path != target:
                self._drop_if_unused(existing.path)
        entry = self.entry(name)
        assert entry is not None
        return entry

    def remove(self, name: str) -> None:
        """Delete the entry ``name`` (and its object when no other entry uses it)."""
        with self._lock():
            entry = self.entry(name)
            if entry is None:
                raise OpenTransError(f"no registry entry named {name!r}")
            self._entry_path(name).unlink()
            self._drop_if_unused(entry.path)

    def _drop_if_unused(self, path: Path) -> None:
        """Delete an object no entry points at any more (caller holds the lock)."""
        for other in self.names():
            try:
                entry = self.entry(other)
            except OpenTransError:
                continue  # a broken entry must not stop the clean-up of others
            if entry is not None and entry.path == path:
                return
        path.unlink(missing_ok=True)

    # ----------------------------------------------------------------- resolving
    def resolve(self, ref: str | os.PathLike, weights: str | os.PathLike | None = None) -> tuple[Artefact, str]:
        """Load ``ref`` (name, ``hf://ORG/REPO[@REV][/FILE]`` or path), verified; returns (artefact, source).

        ``weights`` is a local base-weights file for materialising a built-in recipe on first use.
        """
        text = os.fspath(ref)
        if text.startswith("hf://"):
            from .hub import pull

            obj, _ = pull(text)
            return obj, text
        if NAME_PATTERN.fullmatch(text):
            obj = self.load(text)
            if obj is not None:
                return obj, f"registry:{text}"
            if text in self.recipes():
                self.materialise(text, weights=weights)
                return self.load(text), f"registry:{text}"
        path = Path(text).expanduser()
        if path.is_dir():
            raise OpenTransError("is a directory, expected a subnetwork (.safetensors) or selection (.json) file",
                                 path=text)
        if path.is_file():
            return read_artefact(path), f"file:{path}"
        if NAME_PATTERN.fullmatch(text):
            raise OpenTransError(f"no registry entry, built-in recipe or file named {text!r} "
                                 f"(registry {self.root}; see `opentrans-hub list`)")
        raise OpenTransError("no such file, and not a registry name or hf:// reference", path=text)

    def get_subnetwork(self, ref: str | os.PathLike, weights: str | os.PathLike | None = None) -> Subnetwork:
        obj, source = self.resolve(ref, weights=weights)
        if not isinstance(obj, Subnetwork):
            raise OpenTransError(f"{source} is a layer selection, not a subnetwork")
        return obj

    def get_selection(self, ref: str | os.PathLike, weights: str | os.PathLike | None = None) -> LayerSelection:
        obj, source = self.resolve(ref, weights=weights)
        if not isinstance(obj, LayerSelection):
            raise OpenTransError(f"{source} is a subnetwork, not a layer selection")
        return obj

    def verify(self, ref: str | os.PathLike) -> dict[str, Any]:
        """Re-check a name's (or file's) hashes; a user entry must match its file and content sha256."""
        text = os.fspath(ref)
        entry = self.entry(text) if NAME_PATTERN.fullmatch(text) else None
        if entry is not None:
            obj = self.load(text)
            return {"name": text, "kind": entry.kind, "sha256": obj.sha256, "file_sha256": entry.file_sha256,
                    "path": str(entry.path), "ok": True}
        obj, source = self.resolve(text)
        return {"ref": text, "source": source, "kind": kind_of(obj), "sha256": obj.sha256, "ok": True}

    def materialise(self, name: str, weights: str | os.PathLike | None = None, download: bool = False,
                    progress: bool = False) -> Entry:
        """Run the built-in recipe ``name`` on its base weights and store the result under ``name``."""
        recipe = self.recipes().get(check_name(name))
        if recipe is None:
            raise OpenTransError(f"no built-in recipe named {name!r}")
        obj = run_recipe(recipe, weights=weights, download=download, progress=progress)
        return self.add(obj, name, source=f"builtin-recipe:{name}", extra={"recipe": recipe["method"]})


# --------------------------------------------------------------------------- built-in recipes
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
    from .backbones import build_visual, load_visual_weights, visual_state_dict

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
    :func:`opentrans_hub.imp.magnitude_masks`.
    """
    from .backbones import weights_sha256
    from .imp import PruneScope, magnitude_masks
    from .subnetwork import default_provenance

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


# --------------------------------------------------------------------------- module-level doors
_DEFAULT: dict[str, Registry] = {}


def default_registry() -> Registry:
    """The registry at :func:`default_root` (re-created when ``$OPENTRANS_HUB_HOME`` changes)."""
    root = str(default_root())
    if root not in _DEFAULT:
        _DEFAULT.clear()
        _DEFAULT[root] = Registry(root)
    return _DEFAULT[root]


def load_subnetwork(ref: str | os.PathLike | Subnetwork, registry: Registry | None = None) -> Subnetwork:
    """A verified Subnetwork from a registry name, ``hf://`` reference or path (objects pass through)."""
    if isinstance(ref, Subnetwork):
        return ref
    return (registry or default_registry()).get_subnetwork(ref)


def load_selection(ref: str | os.PathLike | LayerSelection, registry: Registry | None = None) -> LayerSelection:
    """A verified LayerSelection from a registry name, ``hf://`` reference or path (objects pass through)."""
    if isinstance(ref, LayerSelection):
        return ref
    return (registry or default_registry()).get_selection(ref)
