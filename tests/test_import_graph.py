"""The package's floors import only downward, and no modules import each other in a cycle (lazy imports too).

The order is the one ``docs/design.md`` draws: a module may import its own floor and the floors below it.
Every import counts: module level or inside a function, ``from .x import y``, ``from . import x`` and absolute
``opentrans_hub.x`` imports alike.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "opentrans_hub"

#: bottom to top; the first dotted part of a module names its floor ("" is the package's own __init__)
FLOORS = [
    {"version", "errors"},
    {"io"},
    {"naming"},
    {"towers"},
    {"formats"},
    {"sparsity"},
    {"methods"},
    {"zoo"},
    {"transfer"},
    {"integrations"},
    {"demo"},
    {"cli"},
    {"", "__main__", "plugins"},  # the lazy public API, ``python -m``, and the 0.2 plugin import path
]

#: upward imports allowed by name, each for a reason a reader can check
UPWARD = {
    ("formats.selection", "methods.select"): "LayerSelection.reselect, a convenience door to the policies",
    ("formats.selection", "transfer.selection"): "LayerSelection.apply, a convenience door to applying",
}


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """Every package module ``module`` imports, resolved to the deepest known module."""
    is_package = path.name == "__init__.py"
    here = module.split(".") if module else []
    package = here if is_package else here[:-1]
    found = set()

    def add(target: str) -> None:
        while target and target not in known:
            target = target.rpartition(".")[0]
        found.add(target)

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
            elif node.module and node.module.split(".")[0] == "opentrans_hub":
                base = []
                node_module = node.module.split(".", 1)[1] if "." in node.module else ""
                targets = [node_module] if node_module else []
                for alias in node.names:
                    targets.append(".".join(p for p in (node_module, alias.name) if p))
                for target in targets:
                    add(target)
                continue
            else:
                continue
            prefix = ".".join([*base, *([node.module] if node.module else [])])
            submodules = [f"{prefix}.{alias.name}" if prefix else alias.name for alias in node.names]
            submodules = [name for name in submodules if name in known]  # ``from . import x``
            found.update(submodules)
            if len(submodules) < len(node.names):
                add(prefix)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "opentrans_hub":
                    add(alias.name.partition(".")[2])
    found.discard(module)
    return found


def _floor(module: str) -> int:
    head = module.split(".")[0]
    for level, names in enumerate(FLOORS):
        if head in names:
            return level
    raise AssertionError(f"module {module!r} sits on no floor: add its subpackage to FLOORS (and docs/design.md)")


GRAPH = {module: _imports(module, path, set(_modules())) for module, path in _modules().items()}


def test_the_resolver_sees_every_import_form():
    assert "formats.packed" in GRAPH["zoo.packing"]  # ``from ..formats import packed as sf``
    assert "version" in GRAPH["cli"]  # lazy, inside a function
    assert "errors" in GRAPH["transfer.inference.rules"]  # three dots up
    assert "transfer.plugins" in GRAPH["plugins"]


def test_every_module_imports_only_its_own_floor_or_below():
    upward = sorted(f"{module} -> {dep}" for module, deps in GRAPH.items() for dep in deps
                    if _floor(dep) > _floor(module) and (module, dep) not in UPWARD)
    assert not upward, "imports that go up a floor:\n" + "\n".join(upward)


def test_allowed_upward_imports_still_exist():
    stale = [pair for pair in UPWARD if pair[1] not in GRAPH.get(pair[0], set())]
    assert not stale, f"allowed upward imports that no longer exist (drop them): {stale}"


def test_no_import_cycles():
    """(The allowed upward imports are lazy, made at call time, so they are left out.)"""

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            module = todo.pop()
            for dep in GRAPH.get(module, ()):
                if dep not in seen and (module, dep) not in UPWARD:
                    seen.add(dep)
                    todo.append(dep)
        return seen

    cycles = sorted(m for m in GRAPH if m and m in reach(m))
    assert not cycles, f"modules on an import cycle: {cycles}"


def test_a_cycle_or_an_upward_import_would_be_seen(tmp_path):
    """The checks above can fail: a module written to import upward is reported."""
    bad = tmp_path / "opentrans_hub" / "io"
    bad.mkdir(parents=True)
    (bad / "probe.py").write_text("def f():\n    from ..zoo import registry\n    from . import atomic\n")
    deps = _imports("io.probe", bad / "probe.py", set(_modules()) | {"io.probe"})
    assert deps == {"zoo.registry", "io.atomic"}
    assert any(_floor(dep) > _floor("io.probe") for dep in deps)


@pytest.mark.parametrize("statement", [
    "import opentrans_hub", "import opentrans_hub as oth; oth.__version__",
    "from opentrans_hub import OpenTransError, OpenTransWarning",
    "from opentrans_hub import NameMap, Rule, Plugin, LayerSelection, OpenTransError",
    "from opentrans_hub import MappingReport, Registry, get_plugin, list_plugins, TIMM_CLIP_RESNET_RULES",
    "from opentrans_hub.plugins import ENTRY_POINT_GROUP, Plugin, get_plugin, list_plugins",  # the 0.2 path
    "from opentrans_hub.cli import build_parser; build_parser()",
])
def test_the_public_api_loads_without_torch(statement):
    code = f"{statement}; import sys; print([m for m in ('torch', 'numpy', 'scipy') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"{statement!r} imported {out.stdout.strip()}"


def test_the_torch_check_can_fail():
    code = "from opentrans_hub import Subnetwork; import sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"  # the mask codec needs torch, and the check above would see it
