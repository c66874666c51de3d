"""``opentrans-hub plugins list|check|preset``: installed framework plugins, how one fits a real checkpoint, and
the framework's own fine-tuning modes as layer selections."""

from __future__ import annotations

import argparse

from ._common import add_overwrite, check_out, print_json, table


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("plugins", help="list framework plugins; check one against a checkpoint")
    sub = parser.add_subparsers(dest="plugins_command", metavar="ACTION", required=True)

    listing = sub.add_parser("list", help="plugins found through the 'opentrans_hub.plugins' entry points")
    listing.add_argument("--json", action="store_true", help="print one JSON object")
    listing.set_defaults(func=run_list)

    check = sub.add_parser("check", help="map a plugin's names onto a real checkpoint and report the fit")
    check.add_argument("plugin", help="plugin name (see 'plugins list')")
    check.add_argument("--checkpoint", required=True, help="framework checkpoint (.pth via weights_only, "
                       ".safetensors)")
    check.add_argument("--arch", default=None, help="architecture id, e.g. open_clip/RN50 (default: the plugin's "
                       "first, or the subnetwork's)")
    check.add_argument("--subnetwork", default=None, help="also map this subnetwork (name or file) and report the "
                       "sparsity it would leave")
    check.add_argument("--strict", action="store_true", help="exit 2 when names stay unmapped")
    add_tower_option(check)
    check.add_argument("--json", action="store_true", help="print one JSON object")
    check.set_defaults(func=run_check)

    preset = sub.add_parser("preset", help="write a framework's own fine-tuning mode as a layer selection")
    preset.add_argument("plugin", help="plugin name (see 'plugins list')")
    preset.add_argument("name", nargs="?", default=None, help="preset name (omit to list the plugin's presets)")
    preset.add_argument("--arch", default=None, help="architecture id (default: the plugin's first)")
    preset.add_argument("--out", default=None, help="where to write the selection JSON (needed with a name)")
    preset.add_argument("--json", action="store_true", help="print one JSON object")
    add_overwrite(preset)
    preset.set_defaults(func=run_preset)


def add_tower_option(parser: argparse.ArgumentParser) -> None:
    """``--tower PREFIX`` for the ``auto`` plugin: where to look when two copies of the tower fit (a teacher)."""
    parser.add_argument("--tower", default=None, metavar="PREFIX", help="with --plugin auto: only look for the "
                        "tower under this prefix (when two copies fit, e.g. a frozen teacher beside the trained one)")


def plugin_for(name: str, tower: str | None):
    """The plugin ``name``; ``tower`` is for ``auto`` only (a written plugin's rules already say where its tower is)."""
    from ..errors import OpenTransError
    from ..transfer.auto import AutoPlugin
    from ..transfer.discovery import get_plugin

    plugin = get_plugin(name)
    if tower is not None:
        if not isinstance(plugin, AutoPlugin):
            raise OpenTransError(f"--tower is for the 'auto' plugin; plugin {name!r} knows where its tower is")
        plugin.tower = tower
    return plugin


def run_list(args: argparse.Namespace) -> int:
    from ..transfer.discovery import list_plugins

    plugins, errors = list_plugins()
    if args.json:
        print_json({"plugins": [p.describe() for p in plugins], "errors": [e.to_dict() for e in errors]})
        return 0
    if plugins:
        rows = [[p.name, ", ".join(p.frameworks), ", ".join(p.archs), p.tower_path if p.tower_path is not None
                 else "(locator)", p.source] for p in plugins]
        print(table(rows, ["plugin", "frameworks", "archs", "tower", "from"]))
    else:
        print("no plugins installed (install e.g. ./plugins/* with pip)")
    print("auto (built in): infers the name map from each checkpoint or model; 'opentrans-hub map' shows it")
    for error in errors:
        print(f"BROKEN {error.name} ({error.value}, {error.source or '?'}): {error.error}")
    return 0


def run_check(args: argparse.Namespace) -> int:
    from ..errors import OpenTransError
    from ..zoo.registry import load_subnetwork

    plugin = plugin_for(args.plugin, args.tower)
    subnetwork = load_subnetwork(args.subnetwork) if args.subnetwork else None
    info = plugin.check(args.checkpoint, arch=args.arch, subnetwork=subnetwork)
    counts = info["counts"]
    if args.json:
        print_json(info)
    else:
        print(f"{plugin.name} on {args.checkpoint} ({info['arch']}): mapped {counts['mapped']}, dropped "
              f"{counts['dropped']}, unmapped {counts['unmapped']}, shape mismatches {counts['mismatched']}; "
              f"kept sparsity {info['kept_sparsity']:.2%} over {info['mapped_params']:,} mapped weights")
        for item in info["dropped"]:
            print(f"  dropped   {item['source']}: {item['reason']}")
        for item in info["unmapped"]:
            print(f"  unmapped  {item['source']}: {item['reason']}")
        for item in info["mismatched"]:
            print(f"  MISMATCH  {item['source']} -> {item['target']}: {tuple(item['expected'])} vs "
                  f"{tuple(item['got'])}")
    if counts["mismatched"]:
        raise OpenTransError(f"{counts['mismatched']} shape mismatch(es): the plugin does not fit this checkpoint",
                             path=args.checkpoint)
    if args.strict and counts["unmapped"]:
        raise OpenTransError(f"strict: {counts['unmapped']} name(s) found no destination", path=args.checkpoint)
    return 0


def run_preset(args: argparse.Namespace) -> int:
    from ..errors import OpenTransError
    from ..transfer.discovery import get_plugin

    plugin = get_plugin(args.plugin)
    if args.name is None:
        if args.out is not None:
            raise OpenTransError(f"plugins preset: name the preset to write to {args.out} (presets of "
                                 f"{plugin.name!r}: {', '.join(plugin.presets) or 'none'})")
        if args.json:
            print_json({"plugin": plugin.name, "presets": dict(plugin.presets)})
        elif plugin.presets:
            print(table([[name, pattern] for name, pattern in plugin.presets.items()], ["preset", "trains"]))
        else:
            print(f"plugin {plugin.name!r} offers no presets")
        return 0
    if args.out is None:
        raise OpenTransError("plugins preset: --out FILE is needed to write the selection")
    check_out(args, args.out)
    selection = plugin.selection_preset(args.name, args.arch)
    path = selection.save(args.out)
    policy = selection.policy
    if args.json:
        print_json({"path": str(path), "sha256": selection.sha256, "arch": selection.arch, "policy": policy,
                    "trainable": selection.trainable, "frozen": selection.frozen})
    else:
        print(f"{path}: {plugin.name} preset {args.name} on {selection.arch}: {len(selection.trainable)} of "
              f"{len(selection.layers)} tower parameters trainable ({policy['trainable_params']:,} of "
              f"{policy['total_params']:,} weights); sha256 {selection.sha256[:16]}")
    return 0
