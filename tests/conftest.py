"""Test session set-up: ``tests/`` on sys.path (for ``support``), a clean environment, shared fixtures.

Helpers live in ``support/`` (imported as ``support.<module>``), subprocess entry points in ``workers/``.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

# The suite must not depend on the user's environment (HF_HUB_OFFLINE=1, a token, a mirror endpoint, a registry
# folder) nor write into their caches. huggingface_hub reads its variables once, at import, so this happens
# here, before any test module imports it; subprocesses inherit the cleaned environment. Tests that need a
# variable set it themselves (monkeypatch, or an explicit env for a subprocess).
_USER_PREFIXES = ("HF_", "HUGGING_FACE_", "HUGGINGFACE_", "OPENTRANS_HUB_")
for _key in [k for k in os.environ if k.startswith(_USER_PREFIXES)]:
    del os.environ[_key]
_SCRATCH = tempfile.mkdtemp(prefix="opentrans-hub-tests-")
atexit.register(shutil.rmtree, _SCRATCH, ignore_errors=True)
os.environ.update({"HF_HOME": os.path.join(_SCRATCH, "hf"), "OPENTRANS_HUB_HOME": os.path.join(_SCRATCH, "home"),
                   "OPENTRANS_HUB_CACHE": os.path.join(_SCRATCH, "cache"), "HF_HUB_DISABLE_TELEMETRY": "1"})
os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(1)

# The one place that puts tests/ on sys.path: test modules import ``support.*`` under any pytest import mode.
# Subprocesses get it on PYTHONPATH from support.processes.
_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from support.towers import make_tiny_resnet  # noqa: E402


@pytest.fixture(autouse=True)
def _private_registry_and_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own registry folder and caches (tests may still point them elsewhere)."""
    root = tmp_path_factory.mktemp("env")
    monkeypatch.setenv("OPENTRANS_HUB_HOME", str(root / "home"))
    monkeypatch.setenv("OPENTRANS_HUB_CACHE", str(root / "cache"))


@pytest.fixture
def tiny_resnet() -> torch.nn.Module:
    return make_tiny_resnet()


@pytest.fixture
def rn50_visual() -> torch.nn.Module:
    """The full open_clip RN50 visual tower, random init (no downloads here)."""
    from opentrans_hub.towers.backbones import build_visual

    torch.manual_seed(0)
    return build_visual("open_clip/RN50")
