"""The ``unmap`` NameMap rule plugins use for namesakes that are not counterparts, and the config fragments."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from opentrans_hub import NameMap, OpenTransError
from opentrans_hub.naming.namemap import Unmapped
from opentrans_hub.transfer.discovery import get_plugin

REPO = Path(__file__).resolve().parents[1]


def test_unmap_reports_a_namesake_as_unmapped_not_as_a_mismatch():
    name_map = NameMap.parse("""
        unmap ^conv1\\.weight$   # a 7x7 stem conv has CLIP's name and another shape
        prefix backbone.
    """)
    assert str(name_map) == "unmap ^conv1\\.weight$\nprefix backbone."
    assert NameMap.parse(str(name_map)) == name_map
    masks = {"conv1.weight": torch.ones(32, 3, 3, 3, dtype=torch.bool),
             "layer1.0.conv1.weight": torch.ones(64, 64, 1, 1, dtype=torch.bool)}
    target = {"backbone.conv1.weight": (64, 3, 7, 7), "backbone.layer1.0.conv1.weight": (64, 64, 1, 1)}
    out, report = name_map.resolve(masks, target)
    assert list(out) == ["backbone.layer1.0.conv1.weight"]
    assert [s for s, _ in report.unmapped] == ["conv1.weight"] and not report.mismatched and report.ok
    assert "no counterpart" in report.unmapped[0][1]
    report.check(strict=False)
    with pytest.raises(OpenTransError, match="strict: 1 name"):
        report.check(strict=True)
    assert isinstance(name_map.map_name("conv1.weight"), Unmapped)
    assert name_map.map_name("layer1.0.conv1.weight") == ["backbone.layer1.0.conv1.weight"]
    # without the rule the same target is a shape mismatch, which refuses the whole transfer
    _, plain = NameMap.prefix("backbone.").resolve(masks, target)
    assert plain.mismatched and not plain.ok


FRAGMENTS = sorted({REPO / "configs" / n for n in ("catseg.yaml", "san.yaml", "deeplabv3-d2.yaml")}
                   | {p for p in (REPO / "configs").glob("*.yaml") if "OPENTRANS:" in p.read_text()})


@pytest.mark.parametrize("path", FRAGMENTS, ids=lambda p: p.name)
def test_config_fragments_use_the_integration_keys(path):
    from opentrans_hub.integrations.detectron2 import DEFAULTS

    node = yaml.safe_load(path.read_text())["MODEL"]["OPENTRANS"]
    assert set(node) - {"IMP"} <= set(DEFAULTS), path.name
    if node.get("PLUGIN"):
        plugin = get_plugin(node["PLUGIN"])
        assert plugin.covers(node.get("ARCH", DEFAULTS["ARCH"]))
