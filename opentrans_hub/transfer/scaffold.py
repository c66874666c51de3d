"""Write an installable plugin distribution from an inferred NameMap (``opentrans-hub map --write-plugin``).

The distribution holds a ``pyproject.toml`` declaring the ``opentrans_hub.plugins`` entry point, one module with
the :class:`~opentrans_hub.plugins.Plugin` and its rules (each rule commented with the evidence that made it),
and a short README. It is written into a fresh folder next to ``DIR`` and renamed into place, so a failure
leaves nothing behind; an existing non-empty ``DIR`` is refused.
"""

from __future__ import annotations

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


def rules_text(name_map: NameMap, report: Any) -> str:
    """The rule text with one evidence comment per rule."""
    coverage = _coverage(name_map, list(report.tensors) + list(report.unmapped))
    return "\n".join(f"{rule}  # {_evidence_comment(rule, sources, report)}"
                     for rule, sources in zip(name_map.rules, coverage))


def _tower_path(report: Any, target_names: list[str]) -> str | None:
    if report.tower:
        return report.tower.rstrip(".")
    used = {t.split(".")[0] for info in report.tensors.values() for t in info.targets}
    return "" if {n.split(".")[0] for n in target_names} <= used else None


def write_plugin(directory: str | os.PathLike, name: str, arch: str, name_map: NameMap, report: Any,
                 target_names: list[str], source: str = "") -> Path:
    """Write the plugin distribution ``name`` for ``arch`` into ``directory`` (which must not hold anything)."""
    if not _NAME.match(name):
        raise OpenTransError(f"bad plugin name {name!r}: letters, digits, '.', '_' and '-' only")
    directory = Path(directory)
    if directory.is_symlink() or (directory.exists() and (not directory.is_dir() or any(directory.iterdir()))):
        raise OpenTransError("exists and is not an empty folder; choose a new one (nothing was written)",
                             path=directory)
    module = re.sub(r"\W", "_", name.lower()) + "_opentrans"
    distribution = f"{name.lower()}-opentrans"
    tower_path = _tower_path(report, target_names)
    body = rules_text(name_map, report).replace("\\", "\\\\").replace('"""', '\\"\\"\\"')
    origin = source or "a checkpoint"
    module_text = f'''"""opentrans-hub plugin for {name}, inferred by ``opentrans-hub map`` from {origin}.

Rules carry open_clip's canonical {arch} tower names onto {name}'s parameter names; each is commented with the
evidence that made it. Check it on a real checkpoint with ``opentrans-hub plugins check {name} --checkpoint ...``.
"""

from opentrans_hub import Plugin

_MAP = """
{body}
"""

plugin = Plugin(
    name={name!r},
    frameworks=({name!r},),
    archs={{{arch!r}: _MAP}},
    tower_path={tower_path!r},
    description={f"{name}: inferred map, tower at {report.tower or '(top level)'}"!r},
)
'''
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
{name} = "{module}:plugin"

[tool.setuptools]
packages = ["{module}"]
'''
    readme = f"""# {distribution}

An opentrans-hub plugin for **{name}**, written by `opentrans-hub map --write-plugin` from
{source or "a checkpoint"} for `{arch}` (tower at `{report.tower or "the top level"}`, {len(report.tensors)} tensors
mapped, {len(report.unmapped)} unmapped). The rules and the evidence behind each are in `{module}/__init__.py`.

```bash
pip install .
opentrans-hub plugins check {name} --checkpoint model_final.pth --arch {arch}
opentrans-hub apply --plugin {name} --subnetwork SUBNETWORK --checkpoint model_final.pth --out pruned.pth
```
"""
    compile(module_text, f"{module}/__init__.py", "exec")  # never write a module that does not parse
    parent = directory.parent if str(directory.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=parent))
    try:
        (staging / module).mkdir()
        (staging / module / "__init__.py").write_text(module_text)
        (staging / "pyproject.toml").write_text(pyproject)
        (staging / "README.md").write_text(readme)
        if directory.exists():
            directory.rmdir()  # empty (checked above)
        staging.rename(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory
