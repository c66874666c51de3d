"""Plugins are found only through the ``opentrans_hub.plugins`` entry points, first-party and third-party alike."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from support.processes import TESTS, install_copy, python_env

from opentrans_hub import NameMap, OpenTransError
from opentrans_hub.transfer.discovery import list_plugins
from opentrans_hub.transfer.plugins import Plugin

FIXTURE = Path(__file__).parent / "fixtures" / "oth-demo-plugin"
FIRST_PARTY = {"fcclip", "hanovs", "deeplabv3-opentrans", "deeplabv3-d2", "deeplabv3-torchvision", "timm-clip-resnet",
               "catseg", "san", "maftplus", "maskadapter", "sed"}
REPO = Path(__file__).resolve().parents[1]


def test_first_party_plugins_are_installed_distributions():
    plugins, errors = list_plugins(refresh=True)
    by_name = {p.name: p for p in plugins}
    assert FIRST_PARTY <= set(by_name), "install them: pip install ./plugins/*"
    assert not [e for e in errors if e.name in FIRST_PARTY]
    for name in FIRST_PARTY:
        plugin = by_name[name]
        assert plugin.source.startswith("opentrans-hub-"), plugin.source  # came from its own distribution
        assert plugin.default_arch.startswith("open_clip/")
        assert isinstance(plugin.name_map(plugin.default_arch), NameMap)
        if plugin.config:  # detectron2 frameworks ship a config fragment naming the plugin
            fragment = yaml.safe_load((REPO / plugin.config).read_text())
            assert fragment["MODEL"]["OPENTRANS"]["PLUGIN"] == name, plugin.config
    assert {p.name for p in plugins if p.config} >= {"fcclip", "hanovs", "deeplabv3-opentrans", "deeplabv3-d2",
                                                     "catseg", "san"}
    with pytest.raises(OpenTransError, match="does not cover"):
        by_name["fcclip"].name_map("open_clip/ViT-B-16")
    assert by_name["fcclip"].name_map("open_clip/RN50x64") == by_name["fcclip"].name_map("open_clip/RN50")


def test_core_imports_no_plugin_by_name():
    core = (REPO / "opentrans_hub").rglob("*.py")
    packages = [p.name for p in (REPO / "plugins").glob("*/opentrans_hub_*")]
    assert packages
    for path in core:
        text = path.read_text()
        assert not any(package in text for package in packages), path


def test_first_party_plugins_use_only_public_names():
    """Plugins import ``opentrans_hub``'s public names (never its modules), so the core can move its insides."""
    import ast

    import opentrans_hub as oth

    sources = list((REPO / "plugins").glob("*/opentrans_hub_*/*.py"))
    assert len(sources) >= 6
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "opentrans_hub":
                assert node.module == "opentrans_hub", (path, node.module)
                assert {alias.name for alias in node.names} <= set(oth.__all__), path
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("opentrans_hub.") for a in node.names), path


def test_plugin_declaration_errors_are_clear():
    with pytest.raises(OpenTransError, match="declares no architectures"):
        Plugin(name="x", frameworks=("X",), archs={})
    with pytest.raises(OpenTransError, match="plugin 'x', arch 'open_clip/RN50'"):
        Plugin(name="x", frameworks=("X",), archs={"open_clip/RN50": "rename ^a -> b if g1 ~ 3"})
    with pytest.raises(OpenTransError, match="no module 'missing.path'"):
        Plugin(name="x", frameworks=("X",), archs={"open_clip/RN50": ""}, tower_path="missing.path").locate_tower(
            torch.nn.Linear(2, 2))


@pytest.fixture(scope="module")
def third_party_site(tmp_path_factory) -> Path:
    """The fixture package installed by pip into a private directory (a real .dist-info with entry points)."""
    site = install_copy(FIXTURE, tmp_path_factory.mktemp("third_party"))
    assert list(site.glob("oth_demo_plugin-0.3.0.dist-info"))
    return site


def _run(site: Path, *argv: str) -> subprocess.CompletedProcess:
    env = python_env(site, TESTS)
    return subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_third_party_plugin_is_discovered_and_broken_ones_are_reported(third_party_site):
    # one real process with the private directory on its path runs `plugins list --json`, then `plugins list`
    script = "import sys; from opentrans_hub.cli import main; main(['plugins', 'list', '--json']); " \
             "print('@@SPLIT@@'); main(['plugins', 'list'])"
    done = _run(third_party_site, "-c", script)
    assert done.returncode == 0, done.stderr
    json_part, text_part = done.stdout.split("@@SPLIT@@\n")
    listing = json.loads(json_part.strip().splitlines()[-1])
    names = {p["name"]: p for p in listing["plugins"]}
    assert {"toyseg", "toyseg-factory"} <= set(names)
    assert FIRST_PARTY <= set(names)  # a broken neighbour does not hide anyone
    assert names["toyseg"]["source"] == "oth-demo-plugin 0.3.0"
    assert names["toyseg"]["tower_path"] == "encoder.clip"
    errors = {e["name"]: e for e in listing["errors"]}
    assert set(errors) == {"broken", "not-a-plugin"}
    assert "ImportError" in errors["broken"]["error"] and "not installed" in errors["broken"]["error"]
    assert "int" in errors["not-a-plugin"]["error"]
    assert "toyseg" in text_part and "BROKEN broken" in text_part

    # this process does not have the private directory on its path: the plugin does not exist here
    plugins, errors = list_plugins(refresh=True)
    assert "toyseg" not in {p.name for p in plugins} and "broken" not in {e.name for e in errors}


@pytest.mark.slow
def test_third_party_plugin_applies_a_subnetwork(third_party_site):
    script = textwrap.dedent("""
        import json, torch
        from support.towers import make_tiny_resnet
        import opentrans_hub as oth
        from opentrans_hub.transfer.discovery import get_plugin

        tower = make_tiny_resnet(seed=0)
        gen = torch.Generator().manual_seed(0)
        masks = {n: torch.rand(p.shape, generator=gen) < 0.5 for n, p in tower.named_parameters()
                 if n.endswith("weight") and p.dim() >= 2}
        sub = oth.Subnetwork(masks, arch="open_clip/RN50")

        class Box(torch.nn.Module):
            pass

        clip = Box()  # ToySeg's tower: open_clip's modules, stages called stageN, no attention pool
        for name, child in tower.named_children():
            if name != "attnpool":
                setattr(clip, name.replace("layer", "stage"), child)
        model = Box(); model.encoder = Box(); model.encoder.clip = clip
        plugin = get_plugin("toyseg")
        assert plugin.locate_tower(model) is clip
        report = plugin.apply(model, sub, strict=True)
        ok = all(torch.equal(dict(model.named_parameters())[d] == 0, ~masks[s] | (tower.get_parameter(s) == 0))
                 for s, d in report.mapped)
        try:
            get_plugin("broken")
        except oth.OpenTransError as exc:
            broken = str(exc)
        print(json.dumps({"counts": report.to_dict()["counts"], "ok": ok, "broken": broken,
                          "pairs": dict(report.mapped)}))
    """)
    done = _run(third_party_site, "-c", script)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["ok"]
    assert result["counts"]["unmapped"] == 0 and result["counts"]["dropped"] == 4  # attnpool q/k/v/c_proj
    assert result["pairs"]["layer3.0.conv2.weight"] == "encoder.clip.stage3.0.conv2.weight"
    assert "failed to load" in result["broken"] and "ImportError" in result["broken"]
