"""``opentrans-hub`` command line: one sub-command per module in this package.

Each command module exposes ``register(subparsers)`` which adds its parser and sets ``func`` to a
callable taking the parsed arguments and returning an exit code. Errors (the library's, bad arguments,
files that cannot be read or written) are printed as one line with exit code 2 (no traceback unless
``--debug``, which works before or after the sub-command); running out of memory is one such line too; with
``--json`` the error is also one JSON object ``{"error": ...}`` on stdout. A closed pipe
(``opentrans-hub list | head``) ends the command quietly.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ..errors import OpenTransError

#: command modules, in the order ``--help`` lists them
COMMAND_MODULES = ("demo_cmd", "inspect_cmd", "import_cmd", "plugins_cmd", "map_cmd", "apply_cmd", "prune_cmd",
                   "registry_cmd", "hub_cmd", "pack_cmd", "spectrum_cmd", "select_cmd")


class _UsageError(Exception):
    """A bad command line (argparse's complaint), reported like every other error: one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage block) and goes through :func:`main`'s reporting."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        raise _UsageError(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    from ..version import __version__

    parser = _Parser(prog="opentrans-hub", description="Portable OpenTrans subnetworks and "
                     "layer selections for open-vocabulary segmentation.")
    parser.add_argument("--version", action="version", version=f"opentrans-hub {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{module_name}").register(subparsers)
    _add_debug_everywhere(subparsers)
    return parser


def _add_debug_everywhere(subparsers: argparse._SubParsersAction) -> None:
    """``--debug`` after the sub-command too (SUPPRESS: an absent flag does not reset the top-level one)."""
    for sub in set(subparsers.choices.values()):
        if "--debug" not in sub._option_string_actions:
            sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                _add_debug_everywhere(action)


def _report(command: str | None, message: str, as_json: bool) -> None:
    """The one line of an error on stderr, plus ``{"error": ...}`` on stdout for ``--json``."""
    from ._common import STATE, print_json, printable

    message = printable(message)
    if as_json and not STATE["json_printed"]:  # a command that reported its own failure as JSON keeps it
        print_json({"error": message, "command": command})
    prefix = f"opentrans-hub {command}" if command else "opentrans-hub"
    print(f"{prefix}: error: {message}", file=sys.stderr)


def _one_line_warnings(command: str) -> None:
    """Library warnings (a file that does not match its architecture, emptied layers) as one stderr line each."""
    import warnings

    from ._common import printable

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"opentrans-hub {command}: warning: {printable(str(message))}", file=sys.stderr)

    warnings.showwarning = show


def _quiet_broken_pipe() -> int:
    """The reader went away (``| head``): stop without a traceback; Python must not flush into the pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 141  # what a shell reports for a process ended by SIGPIPE


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    words = argv[:argv.index("--")] if "--" in argv else argv
    debug, as_json = "--debug" in words, "--json" in words
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:
        command = next((w for w in words if not w.startswith("-")), None)
        _report(command if command in _commands(parser) else None, str(exc), as_json)
        return 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    debug = debug or bool(getattr(args, "debug", False))
    as_json = bool(getattr(args, "json", False))
    _one_line_warnings(args.command)
    from ._common import STATE

    STATE["json_printed"] = False
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except OpenTransError as exc:
        if debug:
            raise
        _report(args.command, str(exc), as_json)
        return 2
    except OSError as exc:  # a file the library did not wrap (the error names it), never a traceback
        if debug:
            raise
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        _report(args.command, f"{where}{exc.strerror or exc}", as_json)
        return 2
    except MemoryError:  # an allocation the decode limit allowed but the machine could not give
        if debug:
            raise
        _report(args.command, "out of memory (an input may claim more than this machine holds; lower "
                "OPENTRANS_HUB_MAX_DECODE_BYTES or --max-bytes to refuse such files before decoding)", as_json)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _commands(parser: argparse.ArgumentParser) -> set[str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    return set()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
