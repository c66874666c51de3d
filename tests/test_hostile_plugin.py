"""A plugin written by ``map --write-plugin`` from a crafted checkpoint: nothing from it runs as code.

File names, tensor names and prefixes holding quotes, newlines, terminal escapes, non-ASCII and unpaired
surrogates reach the generated plugin only as data; it installs, imports, maps the tower and passes
``plugins check``; the terminal never receives a raw control character.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from support.cli import command
from support.processes import TESTS, pip_install, python_env
from support.towers import RN_TINY, register, tower

INJECTION = 'ck""" if __import__("os").system("touch PWNED") else """.pth'
PREFIX = "bb\"'\n\x1b[2J\u00e9\u4e2d\udcff."


def run(tmp: Path, *args: str, site: Path | None = None) -> subprocess.CompletedProcess:
    env = python_env(tmp / "custom", TESTS, *([site] if site else []), OMP_NUM_THREADS="1",
                     OPENTRANS_HUB_HOME=str(tmp / "home"))
    return subprocess.run([*command(), *args], capture_output=True, timeout=300, env=env, cwd=tmp)


@pytest.fixture(scope="module")
def crafted(tmp_path_factory) -> Path:
    register()
    tmp = tmp_path_factory.mktemp("hostile_plugin")
    (tmp / "custom").mkdir()
    (tmp / "custom" / "sitecustomize.py").write_text("from support import towers\ntowers.register()\n")
    state = {PREFIX + name: value for name, value in tower(RN_TINY, seed=3).state_dict().items()}
    torch.save({"model": state}, tmp / INJECTION)
    return tmp


def assert_no_control_bytes(data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    assert not [ch for ch in text if not ch.isprintable() and ch not in "\n"], text[:400]


@pytest.mark.slow
def test_crafted_names_stay_data_in_a_written_plugin(crafted):
    done = run(crafted, "map", INJECTION, "--arch", RN_TINY, "--write-plugin", "p", "--name", "x")
    assert done.returncode == 0, done.stderr
    assert_no_control_bytes(done.stdout)
    assert_no_control_bytes(done.stderr)
    module = (crafted / "p" / "x_opentrans" / "__init__.py").read_text()
    assert "PWNED" not in module and "bb" not in module  # constant code: names live in plugin.json
    spec = json.loads((crafted / "p" / "x_opentrans" / "plugin.json").read_text())
    assert spec["rules"][0] == {**spec["rules"][0], "kind": "prefix", "pattern": PREFIX}
    site = crafted / "site"
    pip_install(crafted / "p", site)
    check = run(crafted, "plugins", "check", "x", "--checkpoint", INJECTION, "--arch", RN_TINY, "--json", site=site)
    assert check.returncode == 0, check.stderr
    counts = json.loads(check.stdout.decode().splitlines()[-1])["counts"]
    assert counts["mapped"] == len(list(tower(RN_TINY).parameters())) and counts["mismatched"] == 0
    assert not (crafted / "PWNED").exists() and not Path("PWNED").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["auto", "AUTO", "fcclip", "bad name", "x;y", "a\nb"])
def test_a_written_plugin_cannot_take_a_reserved_or_installed_name(crafted, name):
    done = run(crafted, "map", INJECTION, "--arch", RN_TINY, "--write-plugin", f"q-{abs(hash(name))}", "--name", name)
    assert done.returncode == 2
    lines = done.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in lines[0] and "plugin name" in lines[0], lines
    assert not (crafted / f"q-{abs(hash(name))}").exists()
