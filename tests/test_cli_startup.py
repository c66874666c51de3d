"""The light commands (``--version``, ``--help``, ``list``, ``info``, ``plugins list``) start without torch.

Each case runs the installed ``opentrans-hub`` script in a fresh process with the worktree first on
``PYTHONPATH``, a private registry and cache, and no HF_* variables of the user. A tiny wrapper runs the script
unchanged (``runpy``) and, at exit, writes the names of every module the process imported, so the check sees
imports made by ``importlib`` too (command modules, plugin entry points), which ``-X importtime`` does not list.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.cli import SCRIPT, cli_env
from support.processes import python_env
from support.towers import make_tiny_resnet

from opentrans_hub import LayerSelection, Subnetwork
from opentrans_hub.cli import COMMAND_MODULES
from opentrans_hub.formats.subnetwork import default_provenance
from opentrans_hub.version import __version__
from opentrans_hub.zoo.registry import Registry

REPO = Path(__file__).resolve().parents[1]
#: what a light command must not import: the tensor stacks and what only transfers, downloads or towers need
HEAVY = ("torch", "numpy", "scipy", "open_clip", "safetensors", "huggingface_hub")
FIRST_PARTY = {"fcclip", "hanovs", "deeplabv3-opentrans", "deeplabv3-d2", "deeplabv3-torchvision", "timm-clip-resnet",
               "catseg", "san"}

_WRAPPER = """
import atexit, json, runpy, sys
report, target = sys.argv[1], sys.argv[2]
atexit.register(lambda: open(report, "w").write(json.dumps(sorted(sys.modules))))
sys.argv = sys.argv[2:]
if target == "-m":
    sys.argv[0] = "opentrans-hub"
    runpy.run_module("opentrans_hub", run_name="__main__", alter_sys=True)
else:
    runpy.run_path(target, run_name="__main__")
"""


def run_traced(root: Path, *args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run ``opentrans-hub ARGS`` in ``root``; returns the process and the modules it imported."""
    report = root / "modules.json"
    report.unlink(missing_ok=True)
    target = [str(SCRIPT)] if SCRIPT.exists() else ["-m"]
    path = python_env(REPO)["PYTHONPATH"]
    proc = subprocess.run([sys.executable, "-c", _WRAPPER, str(report), *target, *args], capture_output=True,
                          text=True, timeout=120, cwd=root, env=cli_env(root, PYTHONPATH=path))
    return proc, set(json.loads(report.read_text()))


def heavy(modules: set[str]) -> list[str]:
    return [name for name in HEAVY if name in modules]


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """A folder whose private registry (``.home``, what cli_env points at) holds a selection and a subnetwork."""
    root = tmp_path_factory.mktemp("startup")
    tower = make_tiny_resnet()
    weights = {n: p for n, p in tower.named_parameters() if p.dim() >= 2}
    registry = Registry(root / ".home")
    selection = LayerSelection([{"name": n, "alpha": 2.0 + i / 10, "trainable": i % 2 == 0}
                                for i, n in enumerate(weights)], arch="open_clip/RN50", policy={"name": "median"})
    registry.add(selection, "tiny-sel")
    gen = torch.Generator().manual_seed(0)
    sub = Subnetwork({n: torch.rand(p.shape, generator=gen) > 0.5 for n, p in weights.items()},
                     arch="open_clip/RN50", provenance=default_provenance("random"))
    registry.add(sub, "tiny-sub")
    sub.save(root / "tiny.safetensors")
    return root


def test_version_imports_nothing_heavy(home):
    proc, modules = run_traced(home, "--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"opentrans-hub {__version__}\n"
    assert not heavy(modules), heavy(modules)


def test_help_builds_every_command_without_torch(home):
    proc, modules = run_traced(home, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: opentrans-hub")
    for command in ("demo", "inspect", "import", "plugins", "map", "apply", "prune", "list", "info", "verify",
                    "push", "pull", "pack", "unpack", "spectrum", "select"):
        assert f"\n    {command} " in proc.stdout, command
    assert {f"opentrans_hub.cli.{name}" for name in COMMAND_MODULES} <= modules  # every parser was built
    assert not heavy(modules), heavy(modules)


def test_list_shows_entries_and_recipes_without_torch(home):
    proc, modules = run_traced(home, "list")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["name", "kind", "arch", "status", "detail", "sha256"]
    rows = {line.split()[0]: line for line in lines[2:]}
    assert {"tiny-sel", "tiny-sub", "rn50-openai-imp21"} <= set(rows)
    assert "selection" in rows["tiny-sel"] and "local" in rows["tiny-sel"]
    sparsity = Registry(home / ".home").load("tiny-sub").sparsity
    assert f"{sparsity:.2%} sparse" in rows["tiny-sub"] and "subnetwork" in rows["tiny-sub"]
    assert "recipe (materialised on first use)" in rows["rn50-openai-imp21"]
    assert not heavy(modules), heavy(modules)

    proc, modules = run_traced(home, "list", "--json", "--debug")
    assert proc.returncode == 0, proc.stderr
    listing = json.loads(proc.stdout)
    assert listing["registry"] == str(home / ".home")
    names = {row["name"]: row for row in listing["entries"]}
    assert names["tiny-sel"]["kind"] == "selection" and names["tiny-sub"]["kind"] == "subnetwork"
    assert not heavy(modules), heavy(modules)


def test_info_of_a_recipe_and_of_a_selection_without_torch(home):
    proc, modules = run_traced(home, "info", "rn50-openai-imp21")
    assert proc.returncode == 0, proc.stderr
    assert "status: recipe (materialised on first use)" in proc.stdout
    assert "arch: open_clip/RN50" in proc.stdout and "method: global-magnitude-compounding" in proc.stdout
    assert not heavy(modules), heavy(modules)

    proc, modules = run_traced(home, "info", "tiny-sel", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["kind"] == "selection" and info["verified"] is True and info["policy"] == {"name": "median"}
    assert not heavy(modules), heavy(modules)


def test_an_unknown_name_is_one_line_and_light(home):
    proc, modules = run_traced(home, "info", "no-such-entry")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["opentrans-hub info: error: no registry entry or built-in recipe "
                                                "named 'no-such-entry' (see `opentrans-hub list`)"]
    assert not heavy(modules), heavy(modules)


def test_plugins_list_loads_every_plugin_without_torch(home):
    proc, modules = run_traced(home, "plugins", "list")
    assert proc.returncode == 0, proc.stderr
    listed = {line.split()[0] for line in proc.stdout.splitlines()[2:] if line.strip()}
    assert FIRST_PARTY <= listed, "install them: pip install ./plugins/*"
    assert "BROKEN" not in proc.stdout and "auto (built in)" in proc.stdout
    assert {"opentrans_hub_san", "opentrans_hub_timm", "opentrans_hub_fcclip"} <= modules  # they were imported
    assert not heavy(modules), heavy(modules)

    proc, modules = run_traced(home, "plugins", "list", "--json")
    assert proc.returncode == 0, proc.stderr
    listing = json.loads(proc.stdout)
    assert FIRST_PARTY <= {p["name"] for p in listing["plugins"]} and listing["errors"] == []
    assert not heavy(modules), heavy(modules)


@pytest.mark.parametrize("args", [("inspect", "tiny.safetensors"), ("info", "tiny-sub")])
def test_the_check_sees_torch_where_a_command_needs_it(home, args):
    """Reading masks needs torch: the same check reports it, so a light command that pulled it in would fail."""
    proc, modules = run_traced(home, *args)
    assert proc.returncode == 0, proc.stderr
    assert "torch" in modules and "opentrans_hub.formats.subnetwork" in modules
