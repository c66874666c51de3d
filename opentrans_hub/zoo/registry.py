"""Named subnetworks and layer selections: a user registry, the built-in recipe index, Hub repos, plain files.

A reference (``ref``) is resolved from four sources, in this order:

1. a name in the **user registry** (``$OPENTRANS_HUB_HOME``, else the platform's user data folder);
2. a name in the **built-in index** (``masks/index.json``): a recipe that reproduces the artefact
   deterministically from named base weights; it is materialised into the user registry on first use
   when those weights are available (:func:`run_recipe`);
3. a **Hub repo**: ``hf://ORG/REPO[@REVISION]`` (fetched with :mod:`opentrans_hub.zoo.remote`);
4. a **plain path** to a ``.safetensors`` subnetwork or a ``.json`` layer selection.

Layout of a registry root (all writes: temp file + ``os.replace`` under one file lock)::

    <root>/entries/<name>.json            entry: kind, sha256 (content), file_sha256 (bytes), arch, source...
    <root>/objects/<file_sha256>.<ext>    the artefact, content-addressed (immutable once written)
    <root>/.lock                          filelock guarding every write

Names match ``[a-z0-9][a-z0-9._-]*`` (at most 128 characters); an entry whose file would lie outside
``objects/`` is refused. Every load checks the file's sha256 and the artefact's content sha256.
Overwriting a name deletes the object no entry uses any more; a reader that loses that race re-reads the entry.

Dependencies run one way: artefacts <- recipes, remote <- registry <- hub.
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
from typing import TYPE_CHECKING, Any

from ..errors import OpenTransError
from ..formats.artefacts import (  # noqa: F401  (re-exported: the registry's public names before the split)
    EXTENSIONS,
    KIND_FILES,
    NAME_PATTERN,
    check_name,
    decode,
    encode,
    file_sha256,
    kind_of,
    read_artefact,
    summary,
)
from ..formats.selection import LayerSelection
from ..io.atomic import atomic_write_bytes, atomic_write_text
from .recipes import builtin_index_dir, load_index, run_recipe  # noqa: F401  (re-exported)
from .remote import fetch

if TYPE_CHECKING:  # the mask codecs need torch: listing and describing entries does not
    from ..formats.artefacts import Artefact
    from ..formats.subnetwork import Subnetwork

ENV_HOME = "OPENTRANS_HUB_HOME"
ENTRY_FORMAT = "opentrans-hub/registry-entry"
_OBJECT_NAME = re.compile(r"objects/[0-9a-f]{64}\.(safetensors|json)")
_LOCK_TIMEOUT_S = 120.0


def default_root() -> Path:
    """``$OPENTRANS_HUB_HOME``, else the platform's per-user data folder for opentrans-hub."""
    env = os.environ.get(ENV_HOME)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("opentrans-hub", appauthor=False))


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
            if entry.kind == "subnetwork":
                out["provenance"] = obj.provenance
                out["stats"] = {k: v for k, v in obj.stats().items() if k != "layers"}
            elif entry.kind == "packed":
                out["provenance"] = obj.provenance
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
        """Store a subnetwork, selection or packed checkpoint (object or file, verified first) under ``name``;
        atomic and locked."""
        check_name(name)
        if isinstance(obj_or_path, (str, os.PathLike)):
            obj, default_source = read_artefact(obj_or_path), f"file:{Path(obj_or_path).resolve()}"
        else:
            obj, default_source = obj_or_path, "python"
        kind = kind_of(obj)  # refuses anything but the three artefact kinds
        data = encode(obj)
        digest = hashlib.sha256(data).hexdigest()
        rel = f"objects/{digest}{EXTENSIONS[kind]}"
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
            obj, _ = fetch(text)
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
        kind = kind_of(obj)
        if kind == "packed":
            return obj.subnetwork  # the mask a packed checkpoint was pruned with
        if kind != "subnetwork":
            raise OpenTransError(f"{source} is a layer selection, not a subnetwork")
        return obj

    def get_selection(self, ref: str | os.PathLike, weights: str | os.PathLike | None = None) -> LayerSelection:
        obj, source = self.resolve(ref, weights=weights)
        if not isinstance(obj, LayerSelection):
            raise OpenTransError(f"{source} is a {kind_of(obj)}, not a layer selection")
        return obj

    def verify(self, ref: str | os.PathLike) -> dict[str, Any]:
        """Re-check a name's (or file's) hashes; a user entry must match its file and content sha256."""
        text = os.fspath(ref)
        entry = self.entry(text) if NAME_PATTERN.fullmatch(text) else None
        if entry is not None:
            obj = self.load(text)
            out = {"name": text, "kind": entry.kind, "sha256": obj.sha256, "file_sha256": entry.file_sha256,
                   "path": str(entry.path), "ok": True}
        else:
            obj, source = self.resolve(text)
            out = {"ref": text, "source": source, "kind": kind_of(obj), "sha256": obj.sha256, "ok": True}
        if kind_of(obj) == "packed" and obj.reader.unverified_fields:  # an old packed file: say what it leaves out
            out["unhashed_fields"] = list(obj.reader.unverified_fields)
        return out

    def materialise(self, name: str, weights: str | os.PathLike | None = None, download: bool = False,
                    progress: bool = False) -> Entry:
        """Run the built-in recipe ``name`` on its base weights and store the result under ``name``."""
        recipe = self.recipes().get(check_name(name))
        if recipe is None:
            raise OpenTransError(f"no built-in recipe named {name!r}")
        obj = run_recipe(recipe, weights=weights, download=download, progress=progress)
        return self.add(obj, name, source=f"builtin-recipe:{name}", extra={"recipe": recipe["method"]})


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
    from ..formats.subnetwork import Subnetwork

    if isinstance(ref, Subnetwork):
        return ref
    return (registry or default_registry()).get_subnetwork(ref)


def load_selection(ref: str | os.PathLike | LayerSelection, registry: Registry | None = None) -> LayerSelection:
    """A verified LayerSelection from a registry name, ``hf://`` reference or path (objects pass through)."""
    if isinstance(ref, LayerSelection):
        return ref
    return (registry or default_registry()).get_selection(ref)
