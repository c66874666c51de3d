"""Issue 12 item 8: compute_metrics refuses what it cannot measure instead of returning [] or garbage."""

from __future__ import annotations

import pytest
import torch

from opentrans_hub import OpenTransError, compute_metrics
from opentrans_hub.methods.spectral import check_settings, default_cache_dir


def test_nan_integer_and_all_zero_weights_are_refused():
    weight = torch.randn(8, 8)
    weight[0, 0] = float("nan")
    with pytest.raises(OpenTransError, match="NaN or inf.*|tensor 'a.weight'"):
        compute_metrics({"a.weight": weight}, cache=False)
    with pytest.raises(OpenTransError, match="no floating-point.*torch.int64"):
        compute_metrics({"a.weight": torch.ones(8, 8, dtype=torch.int64)}, cache=False)
    with pytest.raises(OpenTransError, match="all zeros"):
        compute_metrics({"a.weight": torch.zeros(8, 8), "b.weight": torch.zeros(4, 4, 3, 3)}, cache=False)
    with pytest.raises(OpenTransError, match="no Conv/Linear weight"):
        compute_metrics({"bn.weight": torch.ones(8)}, cache=False)
    # one emptied layer among real ones is measured (a fully pruned layer has no fit, but is reported)
    metrics = compute_metrics({"a.weight": torch.zeros(8, 8), "b.weight": torch.randn(8, 8)}, cache=False)
    assert [m.name for m in metrics] == ["a.weight", "b.weight"]


BAD_SETTINGS = [({"conv_norm": float("nan")}, "conv_norm"), ({"conv_norm": 0}, "conv_norm"),
                ({"max_aspect": -5.0}, "max_aspect"), ({"device": "bogus"}, "unknown device"),
                ({"device": "mps"}, "cpu or cuda")]


@pytest.mark.parametrize("settings, match", BAD_SETTINGS)
def test_bad_settings_are_refused_before_any_work(settings, match):
    with pytest.raises(OpenTransError, match=match):
        check_settings(**settings)


def test_disk_cache_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("OPENTRANS_HUB_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c" / "spectral"
    monkeypatch.delenv("OPENTRANS_HUB_CACHE")
    monkeypatch.setenv("OPENTRANS_HUB_HOME", str(tmp_path / "h"))
    assert default_cache_dir() == tmp_path / "h" / "cache" / "spectral"  # never ~/.cache when a home is given
