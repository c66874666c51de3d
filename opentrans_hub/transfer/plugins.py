"""Plugins: how one OVS framework names the CLIP image encoder, as a :class:`Plugin` object.

A distribution declares its plugin under the entry-point group ``opentrans_hub.plugins``::

    [project.entry-points."opentrans_hub.plugins"]
    myframework = "my_package.opentrans:plugin"

It says which frameworks and architectures it covers, gives one :class:`~opentrans_hub.naming.namemap.NameMap`
per architecture id (canonical open_clip names -> the framework's full parameter names), and where the
visual tower sits in a live model. From that alone it can transfer a Subnetwork or a LayerSelection onto
a live model (run-time mode, for frameworks whose checkpoints never hold CLIP) or onto a checkpoint file.

Finding plugins is :mod:`.discovery`'s job (entry points; a broken plugin is reported, never fatal); the ``auto``
plugin, which infers its map per target, is :mod:`.auto`. Declaring a plugin imports no torch: plugin packages
are imported by ``opentrans-hub plugins list``, which must start at once; torch comes with the first transfer.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import OpenTransError
from ..formats.selection import LayerSelection
from ..naming.namemap import MappingReport, NameMap
from ..zoo.registry import load_selection, load_subnetwork

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..formats.subnetwork import Subnetwork


@dataclass
class Plugin:
    """What opentrans-hub needs to know about one framework.

    ``archs`` maps architecture ids (``open_clip/RN50``; shell patterns such as ``open_clip/RN*`` allowed)
    to a NameMap or its text form, from canonical tower names to the framework's full names.
    ``tower_path`` is the dotted attribute path of the visual tower in the framework's model (``""``: the
    model is the tower); plugins whose tower is split over several modules pass ``locator`` instead
    (model -> a module presenting the tower).
    ``config`` names the detectron2 config fragment shipped in ``configs/`` for detectron2 frameworks.
    ``presets`` names the framework's own choices of trainable tower parameters (its fine-tuning modes): preset
    name -> a regular expression searched in each canonical parameter name; :meth:`selection_preset` turns one
    into a LayerSelection.
    """

    name: str
    frameworks: tuple[str, ...]
    archs: Mapping[str, NameMap | str]
    tower_path: str | None = None
    description: str = ""
    config: str | None = None
    locator: Callable[[nn.Module], nn.Module] | None = field(default=None, repr=False)
    presets: Mapping[str, str] = field(default_factory=dict)
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
        if not isinstance(self.presets, Mapping):
            raise OpenTransError(f"plugin {self.name!r}: presets must map names to regular expressions, "
                                 f"got a {type(self.presets).__name__}")
        self.presets = dict(self.presets)
        for preset, pattern in self.presets.items():
            try:
                if not isinstance(preset, str) or not preset or not isinstance(pattern, str):
                    raise OpenTransError("a preset is a non-empty name -> a regular expression")
                re.compile(pattern)
            except (re.error, OpenTransError) as exc:
                raise OpenTransError(f"plugin {self.name!r}, preset {preset!r}: {exc}") from None

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
        from ..sparsity.masks import apply_masks, unwrap
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
        installed = installed_plugins()
        if installed is None:
            return "; 'opentrans-hub plugins check' shows how each installed plugin fits"
        ranked = rank_plugins(installed, targets, names, arch)
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
        from ..sparsity.masks import unwrap
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
        import torch

        from ..io.atomic import check_output
        from ..io.checkpoints import load_checkpoint
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
        import torch
        from torch import nn

        from ..io.checkpoints import target_state
        from ..sparsity.masks import unwrap
        from ..towers.backbones import canonical_shapes

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

    def selection_preset(self, name: str, arch: str | None = None) -> LayerSelection:
        """Preset ``name`` as a LayerSelection over every canonical parameter of ``arch``'s tower (default: the
        plugin's first architecture): trainable where the preset's expression is found in the name.

        Every parameter is listed (weights, biases, norms), so applying the selection reproduces inside the tower
        what the framework's own fine-tuning mode sets trainable. A preset that trains nothing on ``arch`` is an
        error: a selection that freezes the whole tower is the framework's frozen mode, not a choice of layers.
        """
        from ..towers.backbones import canonical_shapes

        if name not in self.presets:
            offered = ", ".join(self.presets) or "none"
            raise OpenTransError(f"plugin {self.name!r} has no preset {name!r} (presets: {offered})")
        arch = arch or self.default_arch
        self.name_map(arch)  # refuses an architecture the plugin does not cover
        pattern = re.compile(self.presets[name])
        shapes = canonical_shapes(arch)
        layers = [{"name": param, "trainable": bool(pattern.search(param))} for param in shapes]
        trainable = sum(shapes[layer["name"]].numel() for layer in layers if layer["trainable"])
        if not trainable:
            raise OpenTransError(f"preset {name!r} of plugin {self.name!r} trains no parameter of {arch}'s tower")
        policy = {"name": f"preset:{self.name}/{name}", "pattern": self.presets[name], "trainable_params": trainable,
                  "total_params": sum(t.numel() for t in shapes.values())}
        return LayerSelection(layers, arch=arch, policy=policy,
                              provenance={"plugin": self.name, "preset": name, "source": self.source})

    def concrete_archs(self) -> list[str]:
        """The declared architecture ids that are not patterns."""
        return [arch for arch in self.archs if not any(ch in arch for ch in "*?[")]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "frameworks": list(self.frameworks), "archs": list(self.archs),
                "tower_path": self.tower_path, "config": self.config, "description": self.description,
                "presets": dict(self.presets), "source": self.source}


# ---------------------------------------------------------------------- plugin ranking
#: where the installed plugins come from: source name -> a function listing them. Discovery (entry points, in
#: :mod:`.discovery`, which imports this module) adds itself when imported, so a "wrong plugin" error can name
#: the installed plugin that fits without this module importing discovery.
SOURCES: dict[str, Callable[[], list[Plugin]]] = {}


def installed_plugins() -> list[Plugin] | None:
    """Every plugin the registered sources list (first of a name wins), or None when no source is registered."""
    if not SOURCES:
        return None
    found: dict[str, Plugin] = {}
    for source in SOURCES.values():
        for plugin in source():
            found.setdefault(plugin.name, plugin)
    return list(found.values())


def rank_plugins(plugins: Iterable[Plugin], targets: Any, names: list[str], arch: str) -> list[tuple[str, int]]:
    """(plugin name, how many of ``names`` reach ``targets``) for each of ``plugins`` covering ``arch``, best
    first; a DDP ``module.`` prefix on every target is looked through. What a "wrong plugin" error suggests."""
    targets = set(targets)
    ddp = NameMap.prefix("module.") if targets and all(t.startswith("module.") for t in targets) else None
    ranked = []
    for plugin in plugins:
        if not plugin.covers(arch):
            continue
        name_map = plugin.name_map(arch)
        if ddp is not None:
            name_map = name_map.then(ddp)
        report = name_map.resolve_names(names, targets)
        ranked.append((plugin.name, len({s for s, _ in report.mapped})))
    return sorted(ranked, key=lambda item: -item[1])
