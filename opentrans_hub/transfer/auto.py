"""The ``auto`` plugin: no rules written by anyone; the NameMap is inferred from each target when it is used.

Built in (not an entry point): :func:`~opentrans_hub.transfer.discovery.get_plugin` gives it for ``"auto"``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..errors import OpenTransError
from ..naming.namemap import NameMap
from .plugins import Plugin

if TYPE_CHECKING:
    from torch import nn

AUTO = "auto"


class AutoPlugin(Plugin):
    """``auto``: no rules written by anyone; the NameMap is inferred from each target when it is used.

    The inference (:func:`opentrans_hub.transfer.inference.infer_name_map`) finds the tower by its block structure,
    pairs tensors by values, names and shapes, refuses ambiguous layouts, and the rules it used are logged
    (``logging.getLogger("opentrans_hub")``, INFO). ``tower`` restricts the search (``--tower``), ``weights``
    adds the base tower's values as evidence.
    """

    def __init__(self, tower: str | None = None, weights: Any = None):
        super().__init__(name=AUTO, frameworks=("any (inferred at run time)",), archs={"open_clip/*": NameMap()},
                         description="infers the name map from each target (opentrans-hub map shows it)")
        self.tower = tower
        self.weights = weights
        self.last_report: Any = None
        self.last_map: NameMap | None = None

    def name_map(self, arch: str) -> NameMap:
        raise OpenTransError("the 'auto' plugin has no fixed rules: it infers them per model or checkpoint "
                             "(use it where a target is given, or run 'opentrans-hub map' to see them)")

    def map_for(self, arch: str, target: Any) -> NameMap:
        import logging

        from torch import nn

        from .inference import infer_name_map

        if not isinstance(target, (nn.Module, Mapping, str, os.PathLike)):
            raise OpenTransError("the 'auto' plugin needs the target's tensors (a model, state dict or checkpoint), "
                                 f"not a {type(target).__name__}")
        name_map, report = infer_name_map(target, arch, weights=self.weights, tower=self.tower)
        self.last_report, self.last_map = report, name_map
        logging.getLogger("opentrans_hub").info("plugin 'auto' on %s: tower %r, %d tensors mapped, %d unmapped; "
                                                "rules:\n%s", arch, report.tower, len(report.tensors),
                                                len(report.unmapped), report.rules)
        return name_map

    def tower_path_for(self, model: nn.Module, arch: str) -> str | None:
        report = self.last_report
        if report is None or report.arch != arch:
            self.map_for(arch, model)
            report = self.last_report
        if report.tower:
            return report.tower.rstrip(".")
        return None
