"""Did an apply reach what it should? Refuse the silent no-ops of a transfer before any weight changes.

* :func:`require_mapped`: a subnetwork or selection of which no name reached the target (the wrong plugin, a
  wrong prefix), or far fewer names than the layout promises, is an error, not "mapped 0".
* :func:`uncovered_weights` / :func:`check_coverage`: the Conv/Linear weights in the target's tower that the
  subnetwork's architecture has no counterpart for (an RN50 subnetwork on an RN101 tower leaves ``layer3.6``
  to ``layer3.22`` dense). That is refused unless the caller allows a partial apply, and then it is reported.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

from ..errors import OpenTransError
from ..naming.namemap import MappingReport, NameMap, common_module_prefix
from ..towers.archs import known_canonical_tensors

#: an apply that maps less than this share of what the layout promises is refused (a wrong plugin or prefix)
MIN_MAPPED_SHARE = 0.5


def require_mapped(report: MappingReport, total: int, *, promised: int | None = None, what: str = "subnetwork",
                   hint: str | Callable[[], str] = "", source: str | None = None) -> None:
    """Raise when nothing of ``total`` names was mapped, or fewer than half of the ``promised`` ones (``hint``,
    or the text it returns, ends the message: e.g. which plugin fits instead)."""
    mapped = len({s for s, _ in report.mapped})
    expected = total if promised is None else promised
    if not (total and mapped == 0) and not (expected and mapped < MIN_MAPPED_SHARE * expected):
        return
    hint = hint() if callable(hint) else hint
    if total and mapped == 0:
        raise OpenTransError(f"nothing was applied: none of the {total} {what} names reached the target "
                             f"({len(report.unmapped)} unmapped, {len(report.dropped)} dropped){hint}", path=source)
    if expected and mapped < MIN_MAPPED_SHARE * expected:
        raise OpenTransError(f"nothing was applied: only {mapped} of the {expected} {what} names the layout maps "
                             f"reached the target ({len(report.unmapped)} unmapped){hint}", path=source)


def default_scope(destinations: Sequence[str]) -> tuple[str, ...]:
    """Where the tower sits, from the names a subnetwork reached: their deepest common module, else (a tower at
    the top level, or split over several modules) the top-level modules they reach."""
    common = common_module_prefix(destinations)
    if common:
        return (common,)
    return tuple(sorted({dest.split(".")[0] + "." for dest in destinations if "." in dest}))


def uncovered_weights(arch: str, name_map: NameMap, shapes: Mapping[str, Sequence[int]], mapped: Iterable[str],
                      scope: str | Sequence[str] | None = None) -> tuple[tuple[str, ...], list[str] | None]:
    """(scope, weights in scope that neither ``mapped`` nor any tensor of ``arch``'s tower reaches).

    Weights are the tensors named ``*weight`` with 2 dims or more (Conv/Linear/attention projections). A
    target tensor that a rule declares a namesake without counterpart (``unmap``, torchvision's 7x7 ``conv1``)
    counts as known. The list is None when ``arch``'s tower is not known (nothing can be said).
    """
    mapped = list(mapped)
    prefixes = default_scope(mapped) if scope is None else ((scope,) if isinstance(scope, str) else tuple(scope))
    canon = known_canonical_tensors(arch)
    if canon is None:
        return prefixes, None
    namesakes = NameMap([rule for rule in name_map.rules if rule.kind != "unmap"])
    known = set(mapped)
    for name in canon:
        dests = namesakes.map_name(name)
        if not isinstance(dests, str):
            known.update(dests)
    weights = [n for n, shape in shapes.items()
               if n.endswith("weight") and len(shape) >= 2 and any(n.startswith(p) for p in prefixes)]
    return prefixes, [n for n in weights if n not in known]


def check_coverage(arch: str, name_map: NameMap, shapes: Mapping[str, Sequence[int]], report: MappingReport,
                   scope: str | Sequence[str] | None = None, allow_partial: bool = False,
                   source: str | None = None) -> list[str]:
    """Refuse (unless ``allow_partial``) a target tower with weights ``arch`` has no counterpart for; the ones
    left dense are recorded in ``report.uncovered`` either way."""
    prefixes, uncovered = uncovered_weights(arch, name_map, shapes, [d for _, d in report.mapped], scope)
    report.uncovered = list(uncovered or [])
    if uncovered and not allow_partial:
        where = " or ".join(repr(p) for p in prefixes if p) or "the model"
        raise OpenTransError(f"{len(uncovered)} Conv/Linear weight(s) under {where} have no counterpart in {arch} "
                             f"(first {uncovered[0]}): the target looks like another architecture; nothing was "
                             "applied (allow_partial=True / --allow-partial leaves them dense)", path=source,
                             tensor=uncovered[0])
    return report.uncovered


def check_same_arch(target_arch: str, artefact_arch: str, allow_partial: bool, what: str = "subnetwork") -> None:
    """Refuse an artefact made for another open_clip architecture than the target's (RN50 and RN101 share their
    first blocks' shapes, so names and shapes alone map an RN50 subnetwork onto most of an RN101 tower)."""
    from ..towers.backbones import parse_arch

    if "unknown" in (target_arch, artefact_arch) or allow_partial:
        return
    try:
        target, artefact = parse_arch(target_arch), parse_arch(artefact_arch)
    except OpenTransError:
        return
    if target[0] == artefact[0] == "open_clip" and target != artefact:
        raise OpenTransError(f"the {what} is for {artefact_arch}, the target is open_clip/{target[1]}; nothing was "
                             "applied (allow_partial / --allow-partial applies what fits and leaves the rest dense)")
