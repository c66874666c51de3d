"""Plugins: how one OVS framework names the CLIP image encoder, found only through entry points.

A plugin is a :class:`Plugin` object that a distribution declares under the entry-point group
``opentrans_hub.plugins``::

    [project.entry-points."opentrans_hub.plugins"]
    myframework = "my_package.opentrans:plugin"

It says which frameworks and architectures it covers, gives one :class:`~opentrans_hub.naming.namemap.NameMap`
per architecture id (canonical open_clip names -> the framework's full parameter names), and where the
visual tower sits in a live model. From that alone it can transfer a Subnetwork or a LayerSelection onto
a live model (run-time mode, for frameworks whose checkpoints never hold CLIP) or onto a checkpoint file.

The core never imports a plugin by name: :func:`list_plugins` reads the entry points, and a plugin that
fails to load is reported next to the others instead of breaking them.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import OpenTransError
from ..formats.selection import LayerSelection
from ..formats.subnetwork import Subnetwork
from ..io.checkpoints import LoadedCheckpoint, load_checkpoint, target_state  # noqa: F401  (LoadedCheckpoint re-exported)
from ..naming.namemap import MappingReport, NameMap
from ..sparsity.masks import unwrap
from ..towers.backbones import canonical_shapes  # noqa: F401  (re-exported: it lived here)
from ..zoo.registry import load_selection, load_subnetwork

ENTRY_POINT_GROUP = "opentrans_hub.plugins"


@dataclass
class Plugin:
    """What opentrans-hub needs to know about one framework.

    ``archs`` maps architecture ids (``open_clip/RN50``; shell patterns such as ``open_clip/RN*`` allowed)
    to a NameMap or its text form, from canonical tower names to the framework's full names.
    ``tower_path`` is the dotted attribute path of the visual tower in the framework's model (``""``: the
    model is the tower); plugins whose tower is split over several modules pass ``locator`` instead
    (model -> a module presenting the tower).
    ``config`` names the detectron2 config fragment shipped in ``configs/`` for detectron2 frameworks.
    """

    name: str
    frameworks: tuple[str, ...]
    archs: Mapping[str, NameMap | str]
    tower_path: str | None = None
    description: str = ""
    config: str | None = None
    locator: Callable[[nn.Module], nn.Module] | None = field(default=None, repr=False)
    source: str = field(default="", compare=False)  # the distribution it came from (set by discovery)

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise OpenTransError(f"a plugin needs a non-empty name, got {self.name!r}")
        if isinstance(self.frameworks, str):
            self.frameworks = (self.frameworks,)
        self.frameworks = tuple(self.frameworks)
        if not self.archs:
            raise OpenTransError(f"plugin {self.name!r} declares no architectures")
        parsed: dict[str, NameMap] = {}
        for arch, name_map in self.archs.items():
            try:
                parsed[arch] = name_map if isinstance(name_map, NameMap) else NameMap.parse(name_map)
            except OpenTransError as exc:
                raise OpenTransError(f"plugin {self.name!r}, arch {arch!r}: {exc}") from None
        self.archs = parsed

    # ------------------------------------------------------------------ names
    @property
    def default_arch(self) -> str:
        """The first architecture declared without wildcards (what ``check`` uses without ``--arch``)."""
        concrete = self.concrete_archs()
        if concrete:
            return concrete[0]
        raise OpenTransError(f"plugin {self.name!r} declares only patterns; pass an architecture id")

    def covers(self, arch: str) -> bool:
        return any(arch == key or fnmatch.fnmatchcase(arch, key) for key in self.archs)

    def name_map(self, arch: str) -> NameMap:
        """The NameMap for ``arch`` (exact id first, then the first matching pattern)."""
        if arch in self.archs:
            return self.archs[arch]
        for key, name_map in self.archs.items():
            if fnmatch.fnmatchcase(arch, key):
                return name_map
        raise OpenTransError(f"plugin {self.name!r} does not cover architecture {arch!r}; "
                             f"it covers {', '.join(self.archs)}")

    def map_for(self, arch: str, target: Any) -> NameMap:
        """The NameMap for ``arch`` on ``target`` (a model, state dict or path); the ``auto`` plugin infers it."""
        return self.name_map(arch)

    def locate_tower(self, model: nn.Module) -> nn.Module:
        """The framework's module holding the CLIP image encoder inside a live ``model``."""
        if self.locator is not None:
            return self.locator(model)
        if self.tower_path is None:
            raise OpenTransError(f"plugin {self.name!r} declares no tower_path")
        try:
            return model.get_submodule(self.tower_path)
        except AttributeError:
            raise OpenTransError(f"plugin {self.name!r}: the model has no module {self.tower_path!r} "
                                 f"(is it a {' / '.join(self.frameworks)} model?)") from None

    # ------------------------------------------------------------------ live models (run-time mode)
    def apply(self, model: nn.Module, subnetwork: Subnetwork | str | os.PathLike, strict: bool = False,
              arch: str | None = None, allow_partial: bool = False) -> MappingReport:
        """Zero ``subnetwork``'s pruned weights in ``model`` and keep them zero while training.

        ``model`` is the whole framework model (names as in its state dict; DDP wrappers are looked
        through); ``subnetwork`` may be a registry name or file; ``arch`` overrides the subnetwork's
        architecture id. All-or-nothing: nothing changes when a shape disagrees, when (far) fewer names map
        than this plugin's layout promises (the error names the installed plugin that fits), or when the tower
        holds Conv/Linear weights the architecture has no counterpart for (another architecture) unless
        ``allow_partial`` (then listed in ``report.uncovered``, left dense).
        """
        from ..sparsity.masks import apply_masks
        from .apply import parameter_shapes

        subnetwork = load_subnetwork(subnetwork)
        model = unwrap(model)
        masks, report = self._resolve(subnetwork, parameter_shapes(model), arch, strict, allow_partial, "", None,
                                      model)
        apply_masks(model, masks)
        return report

    def _scope(self) -> str | None:
        if self.tower_path is None:
            return None
        return f"{self.tower_path}." if self.tower_path else ""

    def _resolve(self, subnetwork: Subnetwork, shapes: Mapping[str, tuple[int, ...]], arch: str | None, strict: bool,
                 allow_partial: bool, ddp: str, source: str | None, target: Any
                 ) -> tuple[dict[str, torch.Tensor], MappingReport]:
        """The apply pipeline's plan with this plugin's name map, tower scope and promise (how many names its
        layout maps), so a wrong plugin is refused with a hint naming the one that fits."""
        from .apply import plan_masks

        arch = arch or subnetwork.arch
        name_map = self.map_for(arch, target)
        if ddp:
            name_map = name_map.then(NameMap.prefix(ddp))
        promised = sum(1 for name in subnetwork if not isinstance(name_map.map_name(name), str))
        scope = self._scope()
        return plan_masks(subnetwork, name_map, shapes, arch=arch, strict=strict, allow_partial=allow_partial,
                          scope=None if scope is None else ddp + scope, source=source, promised=promised,
                          hint=lambda: self._hint(shapes, list(subnetwork), arch))

    def _hint(self, targets: Any, names: list[str], arch: str) -> str:
        """``; it fits plugin 'X' (n of m names)`` for the installed plugin that maps most of ``names``."""
        ranked = rank_plugins(targets, names, arch)
        best = [(p, n) for p, n in ranked if p != self.name and n > 0]
        if best:
            return f"; the target fits plugin {best[0][0]!r} ({best[0][1]} of {len(names)} names map)"
        return "; no installed plugin maps it either (see 'opentrans-hub plugins check')"

    def map_selection(self, selection: LayerSelection, target_names: Any,
                      arch: str | None = None) -> tuple[dict[str, bool], MappingReport]:
        """Framework parameter name -> trainable, for every selected layer that has a destination.

        ``target_names`` is any collection of the framework's tensor names (a state dict, a list). Only the
        selected layers themselves are listed (what a trainer that freezes by name needs). Nothing mapped, or
        far fewer than the layout promises, is an error naming the installed plugin that fits.
        """
        from .coverage import require_mapped

        wanted = selection.params
        targets = set(target_names)
        name_map = self.map_for(arch or selection.arch, target_names)
        report = name_map.resolve_names(wanted, targets)
        promised = sum(1 for name in wanted if not isinstance(name_map.map_name(name), str))
        require_mapped(report, len(wanted), promised=promised, what="selection",
                       hint=lambda: self._hint(targets, list(wanted), arch or selection.arch))
        out: dict[str, bool] = {}
        for source, dest in report.mapped:
            out[dest] = out.get(dest, False) or wanted[source]
        return out, report

    def apply_selection(self, model: nn.Module, selection: LayerSelection | str | os.PathLike, strict: bool = False,
                        arch: str | None = None, **options: Any) -> Any:
        """Set ``requires_grad`` in ``model`` from ``selection`` through this plugin's NameMap.

        Uses :func:`~opentrans_hub.transfer.selection.select_trainable` with the scope set to the plugin's tower, so
        the framework's decoder and text tower are never touched; ``options`` (``biases``, ``norms``,
        ``others``) pass through. Plugins whose tower is split (no ``tower_path``) change only the selected
        layers and their biases unless told otherwise. Returns the SelectionReport; all-or-nothing.
        """
        from .selection import select_trainable

        selection = load_selection(selection)
        model = unwrap(model)
        name_map = self.map_for(arch or selection.arch, model)
        tower_path = self.tower_path_for(model, arch or selection.arch)
        if tower_path is not None:
            options.setdefault("scope", f"{tower_path}." if tower_path else "")
        else:
            options.setdefault("norms", "keep")
            options.setdefault("others", "keep")
        return select_trainable(model, selection, name_map=name_map, strict=strict, **options)

    def tower_path_for(self, model: nn.Module, arch: str) -> str | None:
        """``tower_path`` (the ``auto`` plugin: the prefix it found in ``model``)."""
        return self.tower_path

    # ------------------------------------------------------------------ checkpoints
    def apply_checkpoint(self, path_in: str | os.PathLike, subnetwork: Subnetwork | str | os.PathLike,
                         path_out: str | os.PathLike, strict: bool = False, arch: str | None = None,
                         allow_partial: bool = False) -> MappingReport:
        """Rewrite a framework checkpoint with ``subnetwork``'s pruned weights zeroed.

        Nesting (``model``/``state_dict``...), a DDP ``module.`` prefix and every other entry are kept; every
        tensor the subnetwork does not touch is written bit-identical. The output is written atomically (never
        over ``path_in``), and nothing is written when :meth:`apply` would refuse (shapes, nothing or too little
        mapped, another architecture) or, with ``strict``, a name finds no destination.
        """
        from ..io.atomic import check_output
        from .apply import zero_state

        check_output(path_out, inputs=(path_in,))
        subnetwork = load_subnetwork(subnetwork)
        loaded = load_checkpoint(path_in)
        tensors = {k: v for k, v in loaded.state.items() if isinstance(v, torch.Tensor)}
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        masks, report = self._resolve(subnetwork, shapes, arch, strict, allow_partial, loaded.ddp_prefix,
                                      os.fspath(path_in), path_in)
        loaded.write(path_out, zero_state(loaded.state, masks, os.fspath(path_in)))
        return report

    def check(self, target: nn.Module | str | os.PathLike | Mapping[str, Any], arch: str | None = None,
              subnetwork: Subnetwork | None = None) -> dict[str, Any]:
        """How well this plugin fits a real checkpoint file, state dict or live model.

        Without a subnetwork, every parameter of the canonical ``arch`` tower is mapped (so the report
        shows which tower tensors the framework holds); with one, its masks are. ``kept_sparsity`` is the
        fraction of exact zeros over the mapped weight tensors (2-D and up: conv kernels, matrices) —
        after applying ``subnetwork`` in memory when one is given — i.e. the sparsity the framework's copy
        of the tower has (or would have).
        Without ``arch`` (and subnetwork) every declared architecture is tried and the best fit is reported
        (fewest shape mismatches, then most mapped, then fewest unmapped; ``arch_detected``).
        """
        target = unwrap(target) if isinstance(target, nn.Module) else target  # the report names the inner model
        state, source = target_state(target)
        tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        ddp = "module." if tensors and all(k.startswith("module.") for k in tensors) else ""

        def resolve(candidate: str) -> tuple[dict[str, torch.Tensor], MappingReport]:
            name_map = self.map_for(candidate, {k[len(ddp):]: v for k, v in tensors.items()})
            if ddp:
                name_map = name_map.then(NameMap.prefix(ddp))
            sources = subnetwork.masks if subnetwork is not None else canonical_shapes(candidate)
            return name_map.resolve(sources, shapes)

        detected = arch is None and subnetwork is None
        arch = arch or (subnetwork.arch if subnetwork is not None else self.default_arch)
        masks, report = resolve(arch)
        if detected:
            def fit(r: MappingReport) -> tuple[int, int, int]:
                return (-len(r.mismatched), len(r.mapped), -len(r.unmapped))

            for candidate in self.concrete_archs()[1:]:
                _, other = resolve(candidate)
                if fit(other) > fit(report):
                    arch, report = candidate, other
        zeros = numel = 0
        for _, dest in report.mapped:
            weight = tensors[dest]
            if weight.dim() < 2:  # norms, biases, embeddings vectors: not what subnetworks prune
                continue
            if subnetwork is not None:
                weight = weight.masked_fill(~masks[dest].to(weight.device), 0)
            zeros += int((weight == 0).sum())
            numel += weight.numel()
        info = report.to_dict()
        info.update({"plugin": self.name, "arch": arch, "arch_detected": detected,
                     "target": source or type(target).__name__,
                     "subnetwork": subnetwork.sha256 if subnetwork is not None else None,
                     "target_tensors": len(tensors), "mapped_params": numel, "zeros": zeros,
                     "kept_sparsity": zeros / numel if numel else 0.0, "ok": report.ok})
        info["counts"]["kept_sparsity"] = info["kept_sparsity"]
        return info

    def concrete_archs(self) -> list[str]:
        """The declared architecture ids that are not patterns."""
        return [arch for arch in self.archs if not any(ch in arch for ch in "*?[")]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "frameworks": list(self.frameworks), "archs": list(self.archs),
                "tower_path": self.tower_path, "config": self.config, "description": self.description,
                "source": self.source}


# ---------------------------------------------------------------------- plugin ranking
def rank_plugins(targets: Any, names: list[str], arch: str) -> list[tuple[str, int]]:
    """(plugin name, how many of ``names`` reach ``targets``) for every installed plugin covering ``arch``, best
    first; a DDP ``module.`` prefix on every target is looked through. What a "wrong plugin" error suggests."""
    targets = set(targets)
    ddp = NameMap.prefix("module.") if targets and all(t.startswith("module.") for t in targets) else None
    ranked = []
    for plugin in list_plugins()[0]:
        if not plugin.covers(arch):
            continue
        name_map = plugin.name_map(arch)
        if ddp is not None:
            name_map = name_map.then(ddp)
        report = name_map.resolve_names(names, targets)
        ranked.append((plugin.name, len({s for s, _ in report.mapped})))
    return sorted(ranked, key=lambda item: -item[1])


# ---------------------------------------------------------------------- discovery
@dataclass(frozen=True)
class PluginError:
    """An entry point that did not give a usable plugin (reported, never fatal to the others)."""

    name: str
    value: str
    error: str
    source: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "entry_point": self.value, "error": self.error, "source": self.source}


_CACHE: tuple[dict[str, Plugin], list[PluginError]] | None = None


def _load(entry_point: Any) -> Plugin:
    obj = entry_point.load()
    if not isinstance(obj, Plugin) and callable(obj):
        obj = obj()
    if not isinstance(obj, Plugin):
        raise OpenTransError(f"entry point gives a {type(obj).__name__}, expected an opentrans_hub.plugins.Plugin "
                             "(or a callable returning one)")
    if obj.name != entry_point.name:
        raise OpenTransError(f"entry point {entry_point.name!r} gives a plugin named {obj.name!r}")
    return obj


def discover(refresh: bool = False) -> tuple[dict[str, Plugin], list[PluginError]]:
    """All plugins declared under the ``opentrans_hub.plugins`` entry-point group, and the ones that failed."""
    global _CACHE
    if _CACHE is not None and not refresh:
        return _CACHE
    from importlib.metadata import entry_points

    plugins: dict[str, Plugin] = {}
    errors: list[PluginError] = []
    claims: dict[str, list[tuple[Plugin, str]]] = {}
    for entry_point in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: (ep.name, ep.value)):
        dist = getattr(entry_point, "dist", None)
        source = f"{dist.metadata['Name']} {dist.version}" if dist is not None else ""
        try:
            plugin = _load(entry_point)
        except Exception as exc:  # a broken plugin must not take the others down
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            errors.append(PluginError(entry_point.name, entry_point.value, f"{type(exc).__name__}: {message}"[:500],
                                      source))
            continue
        plugin.source = source
        claims.setdefault(plugin.name, []).append((plugin, entry_point.value))
    for name, claimants in claims.items():
        if len(claimants) == 1:
            plugins[name] = claimants[0][0]
            continue
        # two distributions claim one name: using either would be a silent choice, so the name is unusable
        everyone = " and ".join(f"{p.source or '?'} ({value})" for p, value in claimants)
        for plugin, value in claimants:
            errors.append(PluginError(name, value, f"duplicate plugin name: registered by {everyone}; uninstall "
                                      "one of them", plugin.source))
    _CACHE = (plugins, sorted(errors, key=lambda e: (e.name, e.value)))
    return _CACHE


def list_plugins(refresh: bool = False) -> tuple[list[Plugin], list[PluginError]]:
    """(plugins sorted by name, entry points that failed to load)."""
    plugins, errors = discover(refresh)
    return [plugins[name] for name in sorted(plugins)], list(errors)


def get_plugin(name: str) -> Plugin:
    """The plugin registered under ``name``; a clear error lists what is installed (and why it failed)."""
    plugins, errors = discover()
    if name in plugins:
        return plugins[name]
    if name == AUTO:
        return AutoPlugin()
    for error in errors:
        if error.name == name:
            if error.error.startswith("duplicate plugin name"):
                raise OpenTransError(f"plugin {name!r}: {error.error}")
            raise OpenTransError(f"plugin {name!r} failed to load from {error.value}: {error.error}")
    known = ", ".join(sorted(plugins)) or "none installed"
    raise OpenTransError(f"no plugin named {name!r} (installed: {known}); plugins are found through the "
                         f"{ENTRY_POINT_GROUP!r} entry-point group")


# ---------------------------------------------------------------------- auto
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

    def name_map(self, arch: str) -> NameMap:
        raise OpenTransError("the 'auto' plugin has no fixed rules: it infers them per model or checkpoint "
                             "(use it where a target is given, or run 'opentrans-hub map' to see them)")

    def map_for(self, arch: str, target: Any) -> NameMap:
        import logging

        from .inference import infer_name_map

        if not isinstance(target, (nn.Module, Mapping, str, os.PathLike)):
            raise OpenTransError("the 'auto' plugin needs the target's tensors (a model, state dict or checkpoint), "
                                 f"not a {type(target).__name__}")
        name_map, report = infer_name_map(target, arch, weights=self.weights, tower=self.tower)
        self.last_report = report
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
