"""The 0.2 import path of the plugin API, kept so plugins written against it still load.

New plugins import the public names: ``from opentrans_hub import Plugin`` (see ``docs/plugins.md``).
"""

from .transfer.discovery import ENTRY_POINT_GROUP, get_plugin, list_plugins
from .transfer.plugins import Plugin

__all__ = ["ENTRY_POINT_GROUP", "Plugin", "get_plugin", "list_plugins"]
