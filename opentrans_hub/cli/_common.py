"""Small helpers shared by command modules."""

from __future__ import annotations

import json
import sys
from typing import Any

#: set once a command has printed its JSON object (an error then adds none: one object per run)
STATE = {"json_printed": False}


def print_json(obj: Any) -> None:
    """One JSON object on one line of stdout (what scripts parse)."""
    sys.stdout.write(json.dumps(obj, sort_keys=False, default=str) + "\n")
    STATE["json_printed"] = True


def table(rows: list[list[Any]], headers: list[str]) -> str:
    """A plain fixed-width text table."""
    cells = [[printable(str(h)) for h in headers]] + [[printable(str(c)) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def printable(text: str) -> str:
    """``text`` with control characters (ANSI escapes, newlines, NUL) shown escaped: a crafted name in a file
    must not clear a terminal or forge output lines."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def add_overwrite(parser: Any) -> None:
    """``--overwrite``: every command that writes a file refuses an existing one without it."""
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")


def check_out(args: Any, path: Any, *inputs: Any) -> None:
    """Refuse, before any work, an output that exists (without ``--overwrite``), is one of ``inputs``, or is not
    a regular file (link, FIFO, device)."""
    from ..io.atomic import check_output

    if path is not None:
        check_output(path, overwrite=bool(getattr(args, "overwrite", False)), inputs=inputs)


def add_max_bytes(parser: Any) -> None:
    """``--max-bytes``: the most a decode of the input may materialise (``64G``, ``512M``, bytes)."""
    parser.add_argument("--max-bytes", metavar="SIZE", type=_size, default=None,
                        help="refuse inputs that decode to more than SIZE (512M, 64G; default: "
                             "$OPENTRANS_HUB_MAX_DECODE_BYTES, else the least of 64 GiB, memory and address space)")


def _size(text: str) -> int:
    import argparse

    from ..io.limits import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
