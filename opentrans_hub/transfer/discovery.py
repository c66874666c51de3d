"""Finding plugins: every :class:`~opentrans_hub.transfer.plugins.Plugin` declared under the entry-point group
``opentrans_hub.plugins``, plus the built-in ``auto`` plugin by name.

The core never imports a plugin by name: :func:`list_plugins` reads the entry points, and a plugin that
fails to load (or two distributions claiming one name) is reported next to the others instead of breaking them.
Importing this module also tells :mod:`.plugins` where installed plugins come from, so a "wrong plugin" error
can name the one that fits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import OpenTransError
from .auto import AUTO, AutoPlugin
from .plugins import SOURCES, Plugin

ENTRY_POINT_GROUP = "opentrans_hub.plugins"


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


SOURCES["entry_points"] = lambda: list_plugins()[0]
