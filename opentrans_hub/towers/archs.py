"""Architecture ids and canonical tensor names: what a valid one looks like, and the canonical tower of an id.

Names and ids come from files and the Hub, and they are printed: a name with an ANSI escape, a newline or a
NUL could clear a terminal or forge output lines, so every constructor and decoder refuses anything but
printable dotted identifiers (``layer1.0.conv1.weight``; a layer selection may add a ``:q``-style part) and
ids made of ``[A-Za-z0-9._+@:-]`` segments joined by ``/`` (``open_clip/RN50``).

:func:`canonical_tensors` builds the open_clip tower of an id on the meta device (names and shapes, no
weights), so a subnetwork or selection can be checked against the architecture it declares; it is the only
door to torch here (imported on call), so validating names and ids stays cheap for the command line.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from ..errors import OpenTransError, OpenTransWarning

if TYPE_CHECKING:  # torch is imported by the tower builders only: checking a name or an id needs none
    import torch

_NAME = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*")
_PART_NAME = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*(?::[A-Za-z0-9_]+)?")
_ARCH = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+@:-]*(?:/[A-Za-z0-9][A-Za-z0-9._+@:-]*)*")
_MAX_LEN = 512


def _shown(text: object) -> str:
    return ascii(text)[:80]  # control characters escaped: the error line itself must stay one safe line


def check_tensor_name(name: object, *, part: bool = False, path: str | None = None) -> str:
    """``name`` if it is a canonical tensor name (printable dotted identifier; ``part``: may end in ``:q``)."""
    pattern = _PART_NAME if part else _NAME
    if not isinstance(name, str) or len(name) > _MAX_LEN or not pattern.fullmatch(name):
        raise OpenTransError(f"bad tensor name {_shown(name)}: names are dotted identifiers such as "
                             "layer1.0.conv1.weight (letters, digits, _ and .)", path=path)
    return name


def check_arch(arch: object, *, path: str | None = None) -> str:
    """``arch`` if it is a well-formed architecture id (``open_clip/RN50``, ``timm/resnet50_clip``, ``unknown``)."""
    if not isinstance(arch, str) or len(arch) > _MAX_LEN or not _ARCH.fullmatch(arch):
        raise OpenTransError(f"bad architecture id {_shown(arch)}: expected FAMILY/NAME such as open_clip/RN50 "
                             "(letters, digits and ._+@:- only)", path=path)
    return arch


def canonical_tensors(arch: str) -> dict[str, torch.Tensor]:
    """Canonical parameter name -> a meta tensor of its shape, for the open_clip tower of ``arch``."""
    from .backbones import canonical_shapes

    return canonical_shapes(arch)


_UNKNOWN: set[str] = set()


def known_canonical_tensors(arch: str) -> dict[str, torch.Tensor] | None:
    """Like :func:`canonical_tensors`, but None for an id whose tower is not known (``unknown``, another family,
    a model open_clip does not have)."""
    if arch == "unknown" or arch in _UNKNOWN:
        return None
    try:
        return canonical_tensors(arch)
    except (OpenTransError, RuntimeError, ValueError):
        _UNKNOWN.add(arch)
        return None


def noncanonical(shapes: Mapping[str, Iterable[int]] | Iterable[str], arch: str) -> list[str] | None:
    """Names the tower of ``arch`` does not hold (with that shape, when ``shapes`` maps names to shapes; a
    ``:q``-style part is checked by its parameter). None when the tower of ``arch`` is not known."""
    canon = known_canonical_tensors(arch)
    if canon is None:
        return None
    if not isinstance(shapes, Mapping):
        return [name for name in shapes if name.partition(":")[0] not in canon]
    return [name for name, shape in shapes.items()
            if name not in canon or tuple(canon[name].shape) != tuple(shape)]


def warn_noncanonical(shapes: Mapping[str, Iterable[int]] | Iterable[str], arch: str, what: str,
                      source: str | None) -> list[str] | None:
    """Warn (OpenTransWarning) when names or shapes are not those of ``arch``'s tower; returns the odd names
    (None when the tower of ``arch`` is not known)."""
    odd = noncanonical(shapes, arch)
    if odd:
        where = f"{source}: " if source else ""
        warnings.warn(f"{where}{len(odd)} of {len(list(shapes))} {what} name(s) are not canonical for {arch} "
                      f"(e.g. {odd[0]!r}): the file does not match its declared architecture", OpenTransWarning,
                      stacklevel=3)
    return odd
