"""The package's modules import each other one way only (DESIGN: no import cycles), lazy imports included."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "opentrans_hub"


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        package = module.rsplit(".", 1)[0] if "." in module else ""
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level and node.module:
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if package else []
                target = ".".join([p for p in base if p] + [node.module])
                deps.add(target.split(".")[0] if target.split(".")[0] != "cli" else target)
        graph[module] = deps
    return graph


def test_no_import_cycles_between_core_modules():
    graph = {m: d for m, d in _graph().items() if not m.startswith("cli")}
    core = set(graph)

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for dep in graph.get(todo.pop(), ()):
                if dep in core and dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
        return seen

    cycles = sorted(m for m in core if m in reach(m))
    assert not cycles, f"modules on an import cycle: {cycles}"
    assert "registry" not in reach("remote") and "hub" not in reach("registry")
    assert "plugins" not in reach("checkpoints")
