"""NameMap: ordered rules that carry canonical (open_clip) tensor names onto a framework's names.

Rules apply in order to every canonical name (and, optionally, a tensor that travels with it):

* ``prefix P``                         prepend ``P`` to the name;
* ``rename REGEX -> TEMPLATE [if GUARD]`` replace the first match; the template may use ``{gN}`` and
  integer arithmetic ``{gN+K}`` / ``{gN-K}``; the guard compares captures with integers
  (``g1 < 9 and g2 >= 0``). Rules whose guard is false leave the name alone;
* ``drop REGEX``                        the name has no counterpart by design (reported as dropped);
* ``unmap REGEX``                       the target has no faithful counterpart although a namesake may exist
  (torchvision's 7x7 ``conv1``): reported as unmapped, so ``strict`` fails on it;
* ``transpose REGEX [-> TEMPLATE]``     transpose a 2-D tensor (and optionally rename);
* ``unsqueeze REGEX DIM [-> TEMPLATE]`` add a dimension;
* ``split REGEX DIM -> T1, T2, ...``    split along ``DIM`` into equal parts, one destination each;
* ``reshape REGEX SPEC [-> TEMPLATE]``   reshape to ``SPEC``: comma-separated sizes, ``*`` keeps the source's size
  at that position and one ``-1`` takes the rest (``*,*,1,1``: a Linear weight as a 1x1 convolution;
  ``*,*``: back; ``1,1,-1``: a vector with two leading dimensions).

Destinations are resolved by name against the target's real parameters and shape-checked before any
weight changes (see :meth:`NameMap.resolve`). The text form above is what plugins and config files use;
``NameMap.parse`` reads it and ``str(name_map)`` writes it back.
"""

from __future__ import annotations

import re
from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import OpenTransError

if TYPE_CHECKING:  # rules only call tensor methods: parsing and printing a map needs no torch
    import torch

_TEMPLATE_FIELD = re.compile(r"\{g(\d+)(?:([+-])(\d+))?\}")
_GUARD_TERM = re.compile(r"^\s*g(\d+)\s*(<=|>=|==|!=|<|>)\s*(-?\d+)\s*$")


_INTEGER = re.compile(r"-?[0-9]+")


def _integer(text: str | None) -> int | None:
    """``text`` as an int when it is one written in ASCII digits (``str.isdigit`` also takes '¹', which ``int``
    refuses); a captured name part is untrusted input."""
    return int(text) if text is not None and _INTEGER.fullmatch(text) else None


def _fill(template: str, match: re.Match) -> str:
    def field(m: re.Match) -> str:
        group = int(m.group(1))
        try:
            value = match.group(group)
        except IndexError:
            raise OpenTransError(f"template {template!r} names group {group}, the pattern has fewer") from None
        if value is None:
            raise OpenTransError(f"template {template!r}: group {group} did not take part in the match")
        if m.group(2) is None:
            return value
        number = _integer(value)
        if number is None:
            raise OpenTransError(f"template {template!r}: arithmetic on group {group}, which captured {value!r} "
                                 "(not an integer); narrow the pattern or add a guard")
        offset = int(m.group(3)) * (1 if m.group(2) == "+" else -1)
        return str(number + offset)

    return _TEMPLATE_FIELD.sub(field, template)


def _parse_guard(text: str | None) -> tuple[tuple[int, str, int], ...]:
    if not text:
        return ()
    terms = []
    for part in re.split(r"\band\b", text):
        m = _GUARD_TERM.match(part)
        if not m:
            raise OpenTransError(f"bad guard {text!r}: use terms like 'g1 < 9' joined by 'and'")
        terms.append((int(m.group(1)), m.group(2), int(m.group(3))))
    return tuple(terms)


_COMPARE = {"<": int.__lt__, "<=": int.__le__, ">": int.__gt__, ">=": int.__ge__, "==": int.__eq__,
            "!=": int.__ne__}


def _guard_holds(guard: tuple[tuple[int, str, int], ...], match: re.Match) -> bool:
    for group, op, value in guard:
        captured = _integer(match.group(group))
        if captured is None or not _COMPARE[op](captured, value):
            return False
    return True


def common_module_prefix(names: Iterable[str]) -> str:
    """The deepest module holding every tensor in ``names``: their longest common dotted prefix without the
    attribute, ending with ``.`` (``""`` when they share none, or there are no names)."""
    common: list[str] = []
    for tokens in zip(*(name.split(".")[:-1] for name in names)):
        if len(set(tokens)) != 1:
            break
        common.append(tokens[0])
    return ".".join(common) + "." if common else ""


class Unmapped(str):
    """The reason an ``unmap`` rule gives: :meth:`NameMap.map` returns it like a drop reason."""


@dataclass(frozen=True)
class Rule:
    """One step of a NameMap. ``kind`` is one of prefix, rename, drop, unmap, transpose, unsqueeze, split."""

    kind: str
    pattern: str = ""
    targets: tuple[str, ...] = ()
    guard: str | None = None
    dim: int = 0
    spec: str = ""
    _regex: re.Pattern | None = field(default=None, compare=False, repr=False)
    _guard: tuple = field(default=(), compare=False, repr=False)

    def __post_init__(self):
        if self.kind not in {"prefix", "rename", "drop", "unmap", "transpose", "unsqueeze", "split", "reshape"}:
            raise OpenTransError(f"unknown rule kind {self.kind!r}")
        if self.kind != "prefix":
            try:
                object.__setattr__(self, "_regex", re.compile(self.pattern))
            except re.error as exc:
                raise OpenTransError(f"bad regex {self.pattern!r} in {self.kind} rule: {exc}") from None
        if self.kind in {"rename"} and len(self.targets) != 1:
            raise OpenTransError(f"rename rule {self.pattern!r} needs exactly one target")
        if self.kind == "split" and len(self.targets) < 2:
            raise OpenTransError(f"split rule {self.pattern!r} needs at least two targets")
        object.__setattr__(self, "_guard", _parse_guard(self.guard))
        if self.kind == "reshape":
            _parse_spec(self.spec)
        elif self.spec:
            raise OpenTransError(f"only reshape rules take a shape spec, not {self.kind}")

    def __str__(self) -> str:
        if self.kind == "prefix":
            return f"prefix {self.pattern}"
        if self.kind in {"drop", "unmap"}:
            return f"{self.kind} {self.pattern}"
        dim = f" {self.dim}" if self.kind in {"split", "unsqueeze"} else (f" {self.spec}" if self.spec else "")
        arrow = f" -> {', '.join(self.targets)}" if self.targets else ""
        guard = f" if {self.guard}" if self.guard else ""
        return f"{self.kind} {self.pattern}{dim}{arrow}{guard}"

    def apply(self, name: str, tensor: torch.Tensor | None) -> list[tuple[str, torch.Tensor | None]] | str:
        """Return the (name, tensor) pairs this rule produces, or a reason string when it drops the name."""
        if self.kind == "prefix":
            return [(self.pattern + name, tensor)]
        match = self._regex.search(name)
        if match is None or not _guard_holds(self._guard, match):
            return [(name, tensor)]
        if self.kind == "drop":
            return f"dropped by rule '{self}'"
        if self.kind == "unmap":
            return Unmapped(f"no counterpart in the target (rule '{self}')")
        renamed = [name[:match.start()] + _fill(t, match) + name[match.end():] for t in self.targets] or [name]
        if self.kind == "rename":
            return [(renamed[0], tensor)]
        if self.kind == "transpose":
            if tensor is not None and tensor.dim() != 2:
                raise OpenTransError(f"transpose rule needs a 2-D tensor, got shape {tuple(tensor.shape)}",
                                     tensor=name)
            return [(renamed[0], None if tensor is None else tensor.t().contiguous())]
        if self.kind == "unsqueeze":
            return [(renamed[0], None if tensor is None else tensor.unsqueeze(self.dim))]
        if self.kind == "reshape":
            return [(renamed[0], None if tensor is None else _reshape(tensor, self.spec, name))]
        # split
        parts = len(self.targets)
        if tensor is None:
            return [(target, None) for target in renamed]
        if tensor.shape[self.dim] % parts:
            raise OpenTransError(f"cannot split dim {self.dim} of shape {tuple(tensor.shape)} into {parts}",
                                 tensor=name)
        chunks = tensor.chunk(parts, dim=self.dim)
        return [(target, chunk.contiguous()) for target, chunk in zip(renamed, chunks)]


def _parse_spec(spec: str) -> tuple[int | None, ...]:
    """``"*,*,1,1"`` -> (None, None, 1, 1): None keeps the source's size there; one -1 is inferred."""
    items: list[int | None] = []
    for item in spec.split(","):
        item = item.strip()
        if item == "*":
            items.append(None)
        elif re.fullmatch(r"-1|[1-9]\d*", item):
            items.append(int(item))
        else:
            raise OpenTransError(f"bad reshape spec {spec!r}: use sizes, '*' (keep) and one -1, e.g. *,*,1,1")
    if not items or items.count(-1) > 1:
        raise OpenTransError(f"bad reshape spec {spec!r}: use sizes, '*' (keep) and one -1, e.g. *,*,1,1")
    return tuple(items)


def _reshape(tensor: torch.Tensor, spec: str, name: str) -> torch.Tensor:
    items = _parse_spec(spec)
    if any(item is None and i >= tensor.dim() for i, item in enumerate(items)):
        raise OpenTransError(f"reshape {spec}: '*' past the last dimension of shape {tuple(tensor.shape)}",
                             tensor=name)
    shape = [tensor.shape[i] if item is None else item for i, item in enumerate(items)]
    try:
        return tensor.reshape(shape)
    except RuntimeError:
        raise OpenTransError(f"cannot reshape {tuple(tensor.shape)} to {spec}", tensor=name) from None


_LINE = re.compile(
    r"^(?P<kind>prefix|rename|drop|unmap|transpose|unsqueeze|split|reshape)\s+(?P<pattern>\S+)"
    r"(?:\s+(?P<dim>-?\d+|[-\d*]+(?:,[-\d*]+)+|\*))?(?:\s*->\s*(?P<targets>.+?))?(?:\s+if\s+(?P<guard>.+))?\s*$"
)


@dataclass
class MappingReport:
    """What a NameMap did with each canonical name against a concrete target."""

    mapped: list[tuple[str, str]] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)
    unmapped: list[tuple[str, str]] = field(default_factory=list)
    mismatched: list[tuple[str, str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    #: target weights of the tower that the subnetwork's architecture has no counterpart for (left dense)
    uncovered: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatched

    def to_dict(self) -> dict[str, Any]:
        return {
            "mapped": [{"source": s, "target": t} for s, t in self.mapped],
            "dropped": [{"source": s, "reason": r} for s, r in self.dropped],
            "unmapped": [{"source": s, "reason": r} for s, r in self.unmapped],
            "mismatched": [{"source": s, "target": t, "expected": list(e), "got": list(g)}
                           for s, t, e, g in self.mismatched],
            "uncovered": list(self.uncovered),
            "counts": {"mapped": len(self.mapped), "dropped": len(self.dropped), "unmapped": len(self.unmapped),
                       "mismatched": len(self.mismatched), "uncovered": len(self.uncovered)},
        }

    def summary(self) -> str:
        lines = [f"mapped {len(self.mapped)}, dropped {len(self.dropped)}, unmapped {len(self.unmapped)}, "
                 f"shape mismatches {len(self.mismatched)}"]
        lines += [f"  dropped   {s}: {r}" for s, r in self.dropped]
        lines += [f"  unmapped  {s}: {r}" for s, r in self.unmapped]
        lines += [f"  MISMATCH  {s} -> {t}: mask shape {tuple(e)} vs target {tuple(g)}"
                  for s, t, e, g in self.mismatched]
        lines += [f"  dense     {name}: no counterpart in the subnetwork's architecture" for name in self.uncovered]
        return "\n".join(lines)

    def check(self, strict: bool = False, source: str | None = None) -> None:
        """Raise when shapes disagree, or (``strict``) when any name found no destination."""
        if self.mismatched:
            s, t, e, g = self.mismatched[0]
            raise OpenTransError(f"{len(self.mismatched)} shape mismatch(es), first {s} -> {t}: "
                                 f"{tuple(e)} vs target {tuple(g)}; nothing was applied", path=source, tensor=s)
        if strict and self.unmapped:
            s, reason = self.unmapped[0]
            raise OpenTransError(f"strict: {len(self.unmapped)} name(s) found no destination, first {s} ({reason}); "
                                 "nothing was applied", path=source, tensor=s)


class NameMap:
    """An ordered list of rules; the identity map when empty."""

    def __init__(self, rules: Iterable[Rule] = ()):
        self.rules: tuple[Rule, ...] = tuple(rules)

    # ------------------------------------------------------------ construction
    @classmethod
    def identity(cls) -> NameMap:
        return cls()

    @classmethod
    def prefix(cls, prefix: str) -> NameMap:
        return cls([Rule("prefix", prefix)])

    @classmethod
    def parse(cls, text: str | Sequence[str]) -> NameMap:
        """Read the text form: one rule per line (or list item); blank lines and `` #`` comments skipped."""
        lines = text.splitlines() if isinstance(text, str) else list(text)
        rules = []
        for number, raw in enumerate(lines, 1):
            line = re.sub(r"(^|\s)#.*$", "", raw).strip()
            if not line:
                continue
            m = _LINE.match(line)
            if not m:
                raise OpenTransError(f"name map line {number}: cannot parse {raw!r}")
            targets = tuple(t.strip() for t in (m.group("targets") or "").split(",") if t.strip())
            kind = m.group("kind")
            dim = m.group("dim")
            if dim is not None and kind not in {"split", "unsqueeze", "reshape"}:
                raise OpenTransError(f"name map line {number}: only split/unsqueeze/reshape take a dimension: {raw!r}")
            if kind in {"split", "unsqueeze", "reshape"} and dim is None:
                raise OpenTransError(f"name map line {number}: {kind} needs a dimension: {raw!r}")
            if kind == "reshape":
                if len(targets) > 1:
                    raise OpenTransError(f"name map line {number}: reshape takes one target: {raw!r}")
                rules.append(Rule(kind, m.group("pattern"), targets, m.group("guard"), 0, dim))
                continue
            if not re.fullmatch(r"-?\d+", dim or "0"):
                raise OpenTransError(f"name map line {number}: {kind} takes one integer dimension: {raw!r}")
            rules.append(Rule(kind, m.group("pattern"), targets, m.group("guard"), int(dim or 0)))
        return cls(rules)

    def then(self, other: NameMap) -> NameMap:
        """This map's rules followed by ``other``'s."""
        return NameMap(self.rules + other.rules)

    def __str__(self) -> str:
        return "\n".join(str(rule) for rule in self.rules)

    def __repr__(self) -> str:
        return f"NameMap({[str(r) for r in self.rules]})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NameMap) and self.rules == other.rules

    # ------------------------------------------------------------ mapping
    def map(self, name: str, tensor: torch.Tensor | None = None) -> list[tuple[str, torch.Tensor | None]] | str:
        """Run every rule on ``name``: a list of (destination, tensor), or the reason it was dropped."""
        items: list[tuple[str, torch.Tensor | None]] = [(name, tensor)]
        for rule in self.rules:
            produced: list[tuple[str, torch.Tensor | None]] = []
            for item_name, item_tensor in items:
                result = rule.apply(item_name, item_tensor)
                if isinstance(result, str):
                    return result
                produced.extend(result)
            items = produced
        return items

    def map_name(self, name: str) -> list[str] | str:
        """Destinations of ``name`` without a tensor (layer selections), or the drop reason."""
        result = self.map(name, None)
        return result if isinstance(result, str) else [n for n, _ in result]

    def _destinations(self, source: str, tensor: torch.Tensor | None, targets: Container[str],
                      report: MappingReport) -> list[tuple[str, torch.Tensor | None]]:
        """Map one name; record a drop, an unmap or a missing destination in ``report`` (then return [])."""
        result = self.map(source, tensor)
        if isinstance(result, Unmapped):
            report.unmapped.append((source, str(result)))
            return []
        if isinstance(result, str):
            report.dropped.append((source, result))
            return []
        missing = [dest for dest, _ in result if dest not in targets]
        if missing:
            report.unmapped.append((source, f"no tensor {missing[0]!r} in the target"))
            return []
        return result

    def resolve_names(self, names: Iterable[str], targets: Container[str]) -> MappingReport:
        """Map names without tensors (layer selections) onto ``targets``; ``report.mapped`` pairs them.

        Like :meth:`resolve`, a name whose destinations are not all in ``targets`` is unmapped, and
        ``drop``/``unmap`` rules are reported as such; there are no shapes to check.
        """
        report = MappingReport()
        for source in names:
            report.mapped.extend((source, dest) for dest, _ in self._destinations(source, None, targets, report))
        return report

    def resolve(self, tensors: Mapping[str, torch.Tensor],
                target_shapes: Mapping[str, Sequence[int]]) -> tuple[dict[str, torch.Tensor], MappingReport]:
        """Map every canonical tensor and check it against ``target_shapes`` (name -> shape).

        Returns the destination tensors and a report; nothing is changed anywhere. A destination that
        several sources reach is an error (two masks for one weight).
        """
        report = MappingReport()
        out: dict[str, torch.Tensor] = {}
        origin: dict[str, str] = {}
        for source, tensor in tensors.items():
            result = self._destinations(source, tensor, target_shapes, report)
            for dest, mapped in result:
                expected = tuple(target_shapes[dest])
                if tuple(mapped.shape) != expected:
                    report.mismatched.append((source, dest, tuple(mapped.shape), expected))
                    continue
                if dest in origin:
                    raise OpenTransError(f"both {origin[dest]!r} and {source!r} map onto {dest!r}", tensor=dest)
                origin[dest] = source
                out[dest] = mapped
                report.mapped.append((source, dest))
        return out, report
