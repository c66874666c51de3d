"""The one error type the library raises for bad input.

Every message names the file (and the tensor, where there is one), so a user who gets a corrupted mask or
a checkpoint that does not fit knows which file to look at without reading a traceback.
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
        super().__init__(f"{': '.join(where)}: {message}" if where else message)


class OpenTransWarning(UserWarning):
    """Something worked but is likely not what the user meant (a file that does not match its architecture,
    layers pruned away entirely): shown by default, never silent."""
