"""The one error type the library raises for bad input.

Every message names the file (and the tensor, where there is one), so a user who gets a corrupted mask or
a checkpoint that does not fit knows which file to look at without reading a traceback. A message is one line:
control characters a file put into it (a newline in a recorded hash) are shown escaped.
"""

from __future__ import annotations

import os


class OpenTransError(Exception):
    """Bad input or a failed contract: a clear, one-line message naming the file and tensor."""

    def __init__(self, message: str, *, path: str | os.PathLike | None = None, tensor: str | None = None):
        self.path = os.fspath(path) if path is not None else None
        self.tensor = tensor
        where = []
        if self.path is not None:
            where.append(self.path)
        if tensor is not None:
            where.append(f"tensor {tensor!r}")
        self.detail = message
        text = f"{': '.join(where)}: {message}" if where else message
        if not text.isprintable():
            text = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)
        super().__init__(text)


class OpenTransWarning(UserWarning):
    """Something worked but is likely not what the user meant (a file that does not match its architecture,
    layers pruned away entirely): shown by default, never silent."""
