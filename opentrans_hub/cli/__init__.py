"""``opentrans-hub`` command line: one sub-command per module in this package.

Each command module exposes ``register(subparsers)`` which adds its parser and sets ``func`` to a
callable taking the parsed arguments and returning an exit code. Errors of the library are printed as one
line (no traceback unless ``--debug``) with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import OpenTransError

#: command modules, in the order ``--help`` lists them
COMMAND_MODULES = ("demo_cmd", "inspect_cmd", "import_cmd", "plugins_cmd", "map_cmd", "apply_cmd", "prune_cmd",
                   "registry_cmd", "hub_cmd", "spectrum_cmd", "select_cmd")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="opentrans-hub", description="Portable OpenTrans subnetworks and "
                                     "layer selections for open-vocabulary segmentation.")
    parser.add_argument("--version", action="version", version=f"opentrans-hub {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{module_name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except OpenTransError as exc:
        if args.debug:
            raise
        print(f"opentrans-hub {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
