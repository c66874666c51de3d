"""Write an installable plugin distribution from an inferred NameMap (``opentrans-hub map --write-plugin``).

The distribution holds a ``pyproject.toml`` declaring the ``opentrans_hub.plugins`` entry point, one module
whose code is the same for every plugin, its data (``plugin.json``: name, architecture, tower path, the rules
with the evidence behind each) and a short README. Nothing read from a checkpoint becomes source code. It is
written into a fresh folder next to ``DIR`` and renamed into place, so a failure leaves nothing behind; an
existing non-empty ``DIR`` is refused.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from ..errors import OpenTransError
from ..naming.namemap import NameMap, Rule

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _coverage(name_map: NameMap, sources: list[str]) -> list[list[str]]:
    """For each rule, the canonical names it acts on when the whole map runs (rules apply in order)."""
    covered: list[list[str]] = [[] for _ in name_map.rules]
    for source in sources:
        name = source
        for index, rule in enumerate(name_map.rules):
            result = rule.apply(name, None)
            if isinstance(result, str):
                covered[index].append(source)
                break
            if result != [(name, None)]:
                covered[index].append(source)
                name = result[0][0]
    return covered


def _evidence_comment(rule: Rule, sources: list[str], report: Any) -> str:
    """What made ``rule``: how many tensors it carries, and their evidence kinds."""
    if rule.kind == "prefix":
        return f"tower found at {rule.pattern!r}: {report.structure}"
    if rule.kind == "unmap":
        reasons = [report.unmapped[s] for s in sources if s in report.unmapped]
        return f"not a counterpart: {reasons[0]}" if reasons else "not a counterpart"
    covered = [report.tensors[s] for s in sources if s in report.tensors]
    kinds: Counter[str] = Counter()
    for info in covered:
        for item in info.evidence:
            if item.startswith("values: equal"):
                kinds["equal values"] += 1
            elif item.startswith("values: r="):
                kinds["correlated values"] += 1
            elif item.startswith("names"):
                kinds["names"] += 1
            elif item.startswith("block "):
                kinds["block structure"] += 1
            elif item == "order of names":
                kinds["name order"] += 1
            elif item.startswith("only shape"):
                kinds["unique shape"] += 1
    low = sum(1 for info in covered if info.confidence == "low")
    detail = ", ".join(f"{kind} {count}" for kind, count in kinds.most_common())
    return f"{len(covered)} tensor(s); evidence: {detail or 'shapes'}" + (f"; {low} low-confidence" if low else "")


def rule_evidence(name_map: NameMap, report: Any) -> list[tuple[Rule, str]]:
    """Each rule with what made it (how many tensors it carries, and their evidence kinds)."""
    coverage = _coverage(name_map, list(report.tensors) + list(report.unmapped))
    return [(rule, _evidence_comment(rule, sources, report)) for rule, sources in zip(name_map.rules, coverage)]


def rule_lines(name_map: NameMap, report: Any) -> list[str]:
    """Each rule's text with its evidence comment (one entry per rule; a crafted name may hold a newline)."""
    return [f"{rule}  # {evidence}" for rule, evidence in rule_evidence(name_map, report)]


def _tower_path(report: Any, target_names: list[str]) -> str | None:
    if report.tower:
        return report.tower.rstrip(".")
    used = {t.split(".")[0] for info in report.tensors.values() for t in info.targets}
    return "" if {n.split(".")[0] for n in target_names} <= used else None


#: the generated module: constant code, the same for every plugin; everything that came from the checkpoint
#: (names, prefixes, rules, the file name) is data in ``plugin.json`` beside it, never source text
_MODULE = '''"""An opentrans-hub plugin written by ``opentrans-hub map --write-plugin``.

Its name, architecture, tower path and name-map rules (each with the evidence that made it) are data, read from
``plugin.json`` beside this file. Check it on a real checkpoint with ``opentrans-hub plugins check``.
"""

import json
from importlib.resources import files

from opentrans_hub import NameMap, Plugin, Rule

_SPEC = json.loads(files(__name__).joinpath("plugin.json").read_text(encoding="utf-8"))
_RULES = NameMap([Rule(kind=r["kind"], pattern=r["pattern"], targets=tuple(r["targets"]), guard=r["guard"],
                       dim=r["dim"], spec=r["spec"]) for r in _SPEC["rules"]])

plugin = Plugin(
    name=_SPEC["name"],
    frameworks=tuple(_SPEC["frameworks"]),
    archs={_SPEC["arch"]: _RULES},
    tower_path=_SPEC["tower_path"],
    description=_SPEC["description"],
)
'''

#: names a generated plugin may not take: the built-in one
RESERVED = {"auto"}


def plugin_spec(name: str, arch: str, name_map: NameMap, report: Any, target_names: list[str],
                source: str = "") -> dict[str, Any]:
    """The generated plugin's data: what ``plugin.json`` holds."""
    rules = [{"kind": rule.kind, "pattern": rule.pattern, "targets": list(rule.targets), "guard": rule.guard,
              "dim": rule.dim, "spec": rule.spec, "evidence": evidence}
             for rule, evidence in rule_evidence(name_map, report)]
    return {"format": "opentrans-hub/plugin-spec", "format_version": 1, "name": name, "frameworks": [name],
            "arch": arch, "tower_path": _tower_path(report, target_names),
            "description": f"{name}: inferred map, tower at {report.tower or '(top level)'}",
            "inferred_from": os.path.basename(source) if source else "", "rules": rules}


def check_plugin_name(name: str) -> None:
    """A new plugin's name: safe characters, not the built-in ``auto``, not an installed plugin's."""
    from .discovery import discover

    if not isinstance(name, str) or not _NAME.match(name):
        raise OpenTransError(f"bad plugin name {name!r}: letters, digits, '.', '_' and '-' only")
    if name.lower() in RESERVED:
        raise OpenTransError(f"plugin name {name!r} is the built-in plugin's; choose another")
    installed = {found.lower() for found in discover()[0]}
    if name.lower() in installed:
        raise OpenTransError(f"plugin name {name!r} is taken by an installed plugin; choose another")


def write_plugin(directory: str | os.PathLike, name: str, arch: str, name_map: NameMap, report: Any,
                 target_names: list[str], source: str = "") -> Path:
    """Write the plugin distribution ``name`` for ``arch`` into ``directory`` (which must not hold anything)."""
    check_plugin_name(name)
    directory = Path(directory)
    if directory.is_symlink() or (directory.exists() and (not directory.is_dir() or any(directory.iterdir()))):
        raise OpenTransError("exists and is not an empty folder; choose a new one (nothing was written)",
                             path=directory)
    module = re.sub(r"\W", "_", name.lower()) + "_opentrans"
    distribution = f"{name.lower()}-opentrans"
    spec = plugin_spec(name, arch, name_map, report, target_names, source)
    pyproject = f'''[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "{distribution}"
version = "0.1.0"
description = "opentrans-hub plugin for {name} (inferred name map)"
requires-python = ">=3.10"
dependencies = ["opentrans-hub"]

[project.entry-points."opentrans_hub.plugins"]
"{name}" = "{module}:plugin"

[tool.setuptools]
packages = ["{module}"]

[tool.setuptools.package-data]
"{module}" = ["plugin.json"]
'''
    readme = f"""# {distribution}

An opentrans-hub plugin for **{name}**, written by `opentrans-hub map --write-plugin` for `{arch}`
({len(report.tensors)} tensors mapped, {len(report.unmapped)} unmapped). The rules and the evidence behind each
are in `{module}/plugin.json`.

```bash
pip install .
opentrans-hub plugins check {name} --checkpoint model_final.pth --arch {arch}
opentrans-hub apply --plugin {name} --subnetwork SUBNETWORK --checkpoint model_final.pth --out pruned.pth
```
"""
    parent = directory.parent if str(directory.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=parent))
    try:
        (staging / module).mkdir()
        (staging / module / "__init__.py").write_text(_MODULE, encoding="utf-8")
        (staging / module / "plugin.json").write_text(json.dumps(spec, indent=1, ensure_ascii=True) + "\n",
                                                      encoding="utf-8")
        (staging / "pyproject.toml").write_text(pyproject)
        (staging / "README.md").write_text(readme)
        if directory.exists():
            directory.rmdir()  # empty (checked above)
        staging.rename(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory
