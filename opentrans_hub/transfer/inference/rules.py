"""Turn inferred tensor pairs into a compact NameMap, and prove it reproduces them.

Pairs are generalised over their numbers (``layer3.2.bn2`` -> ``res4.2.conv2.norm``: ``layer(\\d+)\\.(\\d+)\\.bn(\\d+)``
-> ``res{g1+1}.{g2}.conv{g3}.norm``), grouped by the pattern they share, guarded where a pattern would also catch
names of another group (SAN's ``if g1 < 9``), and ordered so that no rule re-renames another rule's output. Only the
differing head of a name is rewritten; the common tail (leaf names) is left alone, and the tower prefix comes last.
The result is resolved against the target's real names and shapes: a canonical tensor the rules would carry onto a
namesake the inference rejected gets an ``unmap`` rule, and any other difference falls back to one anchored rule
per tensor, or fails loudly.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ...errors import OpenTransError
from ...naming.namemap import NameMap, Rule, common_module_prefix
from .match import find_blocks

_DIGITS = re.compile(r"\d+")


def _pattern(text: str, capture: bool) -> str:
    """Escape ``text``; digit runs become ``(\\d+)`` captures (or stay literal)."""
    out, last = [], 0
    for m in _DIGITS.finditer(text):
        out.append(re.escape(text[last:m.start()]))
        out.append(r"(\d+)" if capture else m.group())
        last = m.end()
    out.append(re.escape(text[last:]))
    return "".join(out)


def _skeleton(text: str) -> tuple[str, list[int]]:
    return _DIGITS.sub("#", text), [int(d) for d in _DIGITS.findall(text)]


def _split_head(source: str, target: str, block: str | None) -> tuple[str, str, bool]:
    """The differing heads of two names (the common tail of path segments is kept as it is)."""
    cs, ts = source.split("."), target.split(".")
    tail = 0
    limit = min(len(cs), len(ts)) - 1
    if block:
        limit = min(limit, len(cs) - len(block.split(".")))
    while tail < limit and cs[-1 - tail] == ts[-1 - tail]:
        tail += 1
    return ".".join(cs[:len(cs) - tail]), ".".join(ts[:len(ts) - tail]), tail > 0


def _solve_slots(members: list[dict[str, Any]], slots: int) -> list[tuple[str, int, int]] | None:
    """For each target number: ('g', capture, offset) consistent over all members, or ('lit', value, 0)."""
    solved = []
    captures = len(members[0]["caps"])
    for j in range(slots):
        found = None
        order = ([j] if j < captures else []) + [k for k in range(captures) if k != j]
        for k in order:
            offsets = {m["nums"][j] - m["caps"][k] for m in members}
            if len(offsets) == 1:
                offset = offsets.pop()
                if found is None or (offset == 0 and found[2] != 0):
                    found = ("g", k, offset)
                if offset == 0:
                    break
        if found is None:
            values = {m["nums"][j] for m in members}
            if len(values) != 1:
                return None
            found = ("lit", values.pop(), 0)
        solved.append(found)
    return solved


def _template(skeleton: str, solved: list[tuple[str, int, int]]) -> str:
    pieces = skeleton.split("#")
    out = [pieces[0]]
    for (kind, k, offset), piece in zip(solved, pieces[1:]):
        if kind == "lit":
            out.append(str(k))
        else:
            out.append("{g" + str(k + 1) + (f"{offset:+d}" if offset else "") + "}")
        out.append(piece)
    return "".join(out)


def _guard(regex: re.Pattern, members: list[dict[str, Any]], names: Sequence[str]) -> tuple[bool, str | None]:
    """A guard on capture ranges that keeps the pattern off the canonical names in ``names`` outside the group.

    ``names`` holds the names no other rule renames first, and those of groups with this very pattern; the
    names of other groups are kept apart by ordering their (more specific) rules first.
    """
    own = {m["source"] for m in members}
    conflicts = []
    for name in names:
        if name in own:
            continue
        m = regex.search(name)
        if m:
            conflicts.append([int(g) if g and g.isdigit() else None for g in m.groups()])
    if not conflicts:
        return True, None
    terms = []
    captures = len(members[0]["caps"])
    remaining = conflicts
    for k in range(captures):
        own_values = {m["caps"][k] for m in members}
        lo, hi = min(own_values), max(own_values)
        outside = [c for c in remaining if c[k] is not None and c[k] not in own_values]
        if not outside:
            continue
        values = {c[k] for c in outside}
        if lo == hi:
            terms.append(f"g{k + 1} == {lo}")
        elif any(v < lo for v in values):
            terms.append(f"g{k + 1} >= {lo}")
        if lo != hi and any(v > hi for v in values):
            terms.append(f"g{k + 1} < {hi + 1}")
        if lo != hi:
            terms += [f"g{k + 1} != {v}" for v in sorted(values) if lo < v < hi]
        remaining = [c for c in remaining if c not in outside]
        if not remaining:
            break
    if remaining:
        return False, None
    return True, " and ".join(terms)


def _rules_for(kind: str, spec: str, members: list[dict[str, Any]], names: Sequence[str]) -> list[Rule] | None:
    """One rule (or two for transpose+reshape) for a group, or None when it cannot be generalised."""
    head = members[0]["head"]
    tail = members[0]["tail"]
    regex_text = "^" + _pattern(head, True) + (r"\." if tail else "$")
    regex = re.compile(regex_text)
    names = names(regex_text)
    skeletons = members[0]["skeletons"]
    templates = []
    for index, skeleton in enumerate(skeletons):
        slots = skeleton.count("#")
        solved = _solve_slots([{"caps": m["caps"], "nums": m["nums"][index], "source": m["source"]}
                               for m in members], slots)
        if solved is None:
            return None
        templates.append(_template(skeleton, solved) + ("." if tail else ""))
    ok, guard = _guard(regex, members, names)
    if not ok:
        return None
    if kind == "rename":
        return [Rule("rename", regex_text, (templates[0],), guard)]
    if kind == "split":
        return [Rule("split", regex_text, tuple(templates), guard, 0)]
    if kind == "transpose":
        return [Rule("transpose", regex_text, (templates[0],), guard)]
    if kind == "reshape":
        return [Rule("reshape", regex_text, (templates[0],), guard, 0, spec)]
    if kind == "unsqueeze":
        return [Rule("unsqueeze", regex_text, (templates[0],), guard, int(spec))]
    # transpose then reshape: the second rule finds the first one's output by its own (target) name
    out_regex = "^" + re.escape(skeletons[0]).replace("\\#", "#").replace("#", r"\d+") + "$"
    tail_rule = Rule("reshape", out_regex, (), None, 0, spec) if kind.endswith("reshape") else \
        Rule("unsqueeze", out_regex, (), None, int(spec))
    return [Rule("transpose", regex_text, (templates[0],), guard), tail_rule]


def _split_rules(key: tuple, members: list[dict[str, Any]], names: Any, owned: dict[Rule, list[str]]
                 ) -> list[Rule] | None:
    """A group whose numbers do not follow one formula, split by the value of one capture (one rule per stage
    when a framework numbers all blocks in one list), each part guarded by that value."""
    for k in range(len(members[0]["caps"])):
        parts: dict[int, list[dict[str, Any]]] = {}
        for m in members:
            parts.setdefault(m["caps"][k], []).append(m)
        if len(parts) < 2 or len(parts) > 8:
            continue
        rules: list[Rule] = []
        for part in parts.values():
            made = _rules_for(key[0], key[1], part, names)
            if made is None:
                break
            owned[made[0]] = [m["source"] for m in part]
            rules.extend(made)
        else:
            return rules
    return None


def _member(source: str, targets: list[str], transform: str, block: str | None) -> tuple[tuple, dict[str, Any]]:
    kind, _, spec = transform.partition(":")
    if kind == "identity":
        head_c, head_t, tail = _split_head(source, targets[0], block)
        kind = "rename"
        heads_t = [head_t]
    else:
        head_c, heads_t, tail = source, targets, False
    caps = [int(d) for d in _DIGITS.findall(head_c)]
    skeletons, nums = zip(*(_skeleton(h) for h in heads_t))
    key = (kind, spec, _pattern(head_c, True), tail, skeletons)
    return key, {"source": source, "head": head_c, "tail": tail, "caps": caps, "nums": list(nums),
                 "skeletons": list(skeletons), "heads_t": heads_t}


def _insertions(groups: dict[tuple, list[dict[str, Any]]]) -> tuple[list[Rule], set[tuple]]:
    """Heads that only gain a prefix (``ln_pre`` -> ``clip_visual_extractor.ln_pre``): one alternation per prefix."""
    by_prefix: dict[str, list[tuple[tuple, str]]] = {}
    for key, members in groups.items():
        if key[0] != "rename":
            continue
        for m in members:
            head_t, head_c = m["heads_t"][0], m["head"]
            if not (head_t.endswith("." + head_c) and len(head_t) > len(head_c) + 1):
                break
        else:
            prefix = members[0]["heads_t"][0][: -len(members[0]["head"])]
            if all(m["heads_t"][0][: -len(m["head"])] == prefix for m in members):
                by_prefix.setdefault(prefix, []).append((key, key[2]))
    rules, used = [], set()
    for prefix, entries in by_prefix.items():
        alternatives = sorted({pattern.replace(r"(\d+)", r"\d+") for _, pattern in entries})
        rule = Rule("rename", "^(" + "|".join(alternatives) + r")\b", (prefix + "{g1}",))
        rules.append((rule, [m["source"] for key, _ in entries for m in groups[key]]))
        used.update(key for key, _ in entries)
    return rules, used


def _order(rules: list[Rule], outputs: dict[int, list[str]], sources: dict[int, list[str]]) -> list[Rule]:
    """Order rules so that nothing is renamed twice and specific rules run before general ones.

    A rule whose pattern would catch another rule's output runs before it; a rule whose pattern would catch
    another rule's own (canonical) names runs after it.
    """
    before: dict[int, set[int]] = {i: set() for i in range(len(rules))}
    for i, produced in outputs.items():
        for j, rule in enumerate(rules):
            if j == i:
                continue
            if any(rule.apply(name, None) != [(name, None)] for name in produced):
                before[i].add(j)
            elif any(rule.apply(name, None) != [(name, None)] for name in sources.get(i, [])):
                before[j].add(i)
    ordered, placed = [], set()
    while len(placed) < len(rules):
        ready = [i for i in range(len(rules)) if i not in placed and before[i] <= placed]
        if not ready:  # a cycle: keep the rest as they are; verification decides
            ready = [i for i in range(len(rules)) if i not in placed]
        for i in ready:
            ordered.append(rules[i])
            placed.add(i)
    return ordered


def _check(name_map: NameMap, canonical: Mapping[str, torch.Tensor], target_shapes: Mapping[str, tuple[int, ...]],
           expected: dict[str, list[str]]) -> tuple[bool, set[str]]:
    """(reproduces exactly, canonical names carried onto something the inference did not pair)."""
    try:
        _, report = name_map.resolve(canonical, target_shapes)
    except OpenTransError:
        return False, set()
    got: dict[str, list[str]] = {}
    for source, dest in report.mapped:
        got.setdefault(source, []).append(dest)
    extra = {s for s in got if s not in expected} | {s for s, *_ in report.mismatched if s not in expected}
    wrong = {s for s in expected if got.get(s) != expected[s]} | {s for s in got if s in expected and
                                                                   got[s] != expected[s]}
    wrong |= {s for s, *_ in report.mismatched if s in expected}
    return not wrong and not extra, extra - wrong


def _unmaps(names: set[str], canonical: Mapping[str, Any], expected: dict[str, list[str]]) -> list[Rule]:
    rules, done = [], set()
    for name in sorted(names):
        module = name.rsplit(".", 1)[0] if "." in name else None
        siblings = [n for n in canonical if module and n.startswith(module + ".")]
        if module and siblings and not any(n in expected for n in siblings):
            if module not in done:
                rules.append(Rule("unmap", "^" + re.escape(module) + r"\."))
                done.add(module)
        else:
            rules.append(Rule("unmap", "^" + re.escape(name) + "$"))
    return rules


def compact_rules(report: Any, canonical: Mapping[str, torch.Tensor],
                  target_shapes: Mapping[str, tuple[int, ...]]) -> NameMap:
    """The fewest rules (by pattern) that carry every inferred pair and nothing else; verified."""
    prefix = common_module_prefix([t for info in report.tensors.values() for t in info.targets])
    owner, _ = find_blocks(list(canonical))
    expected = {s: list(t.targets) for s, t in report.tensors.items()}
    names = list(canonical)
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for source, info in report.tensors.items():
        relative = [t[len(prefix):] for t in info.targets]
        if info.transform == "identity" and relative == [source]:
            continue
        key, member = _member(source, relative, info.transform, owner.get(source))
        groups.setdefault(key, []).append(member)
    insert_rules, inserted = _insertions(groups)
    transforms: list[Rule] = []
    renames: list[Rule] = [rule for rule, _ in insert_rules]
    owned: dict[Rule, list[str]] = {}
    for rule, sources in insert_rules:
        owned.setdefault(rule, []).extend(sources)
    grouped = {m["source"]: key[2] for key, members in groups.items() for m in members}

    def free_names(regex_text: str) -> list[str]:
        # names a pattern must not catch: the mapped ones that no other rule renames first (unmapped names may be
        # caught: they find no destination, or verification below adds an unmap rule)
        pattern = regex_text[1:].removesuffix(r"\.").removesuffix("$")
        return [n for n in names if n in expected and (n not in grouped or grouped[n] == pattern)]

    for key, members in groups.items():
        if key in inserted:
            continue
        made = _rules_for(key[0], key[1], members, free_names) or _split_rules(key, members, free_names, owned)
        if made is None:  # numbers that do not generalise: one rule per member, literal
            for m in members:
                literal = dict(m)
                made_one = _literal_rules(key[0], key[1], literal)
                (renames if key[0] == "rename" else transforms).extend(made_one)
                owned.setdefault(made_one[0], []).append(m["source"])
            continue
        (renames if key[0] == "rename" else transforms).extend(made)
        if made[0] not in owned:
            owned[made[0]] = [m["source"] for m in members]
    body = _ordered(list(dict.fromkeys(transforms + renames)), owned)
    tail = [Rule("prefix", prefix)] if prefix else []
    name_map = NameMap(body + tail)
    ok, extra = _check(name_map, canonical, target_shapes, expected)
    if not ok and extra:
        name_map = NameMap(_unmaps(extra, canonical, expected) + body + tail)
        ok, extra = _check(name_map, canonical, target_shapes, expected)
    if not ok:  # last resort: one anchored rule per tensor
        body, owned = [], {}
        for source, info in report.tensors.items():
            relative = [t[len(prefix):] for t in info.targets]
            if info.transform == "identity" and relative == [source]:
                continue
            _, member = _member(source, relative, info.transform, None)
            member["head"], member["tail"] = source, False
            member["heads_t"] = relative
            made = _literal_rules(info.transform.partition(":")[0] if info.transform != "identity" else "rename",
                                  info.transform.partition(":")[2], member)
            body.extend(made)
            owned.setdefault(made[0], []).append(source)
        body = _ordered(list(dict.fromkeys(body)), owned)
        name_map = NameMap(body + tail)
        ok, extra = _check(name_map, canonical, target_shapes, expected)
        if not ok and extra:
            name_map = NameMap(_unmaps(extra, canonical, expected) + body + tail)
            ok, extra = _check(name_map, canonical, target_shapes, expected)
    if not ok:
        raise OpenTransError("the inferred pairs could not be written as rules that reproduce them exactly "
                             "(please report this layout); nothing is mapped")
    return name_map


def _ordered(body: list[Rule], owned: dict[Rule, list[str]]) -> list[Rule]:
    sources = {i: owned.get(r, []) for i, r in enumerate(body)}
    outputs = {i: [n for s in sources[i] for n, _ in _apply_one(r, s)] for i, r in enumerate(body)}
    return _order(body, outputs, sources)


def _apply_one(rule: Rule, name: str) -> list[tuple[str, Any]]:
    result = rule.apply(name, None)
    return [] if isinstance(result, str) or result == [(name, None)] else result


def _literal_rules(kind: str, spec: str, member: dict[str, Any]) -> list[Rule]:
    tail = member["tail"]
    regex_text = "^" + re.escape(member["head"]) + (r"\." if tail else "$")
    targets = tuple(t + ("." if tail else "") for t in member["heads_t"])
    if kind == "rename":
        return [Rule("rename", regex_text, targets[:1])]
    if kind == "split":
        return [Rule("split", regex_text, targets, None, 0)]
    if kind == "transpose":
        return [Rule("transpose", regex_text, targets[:1])]
    if kind == "reshape":
        return [Rule("reshape", regex_text, targets[:1], None, 0, spec)]
    if kind == "unsqueeze":
        return [Rule("unsqueeze", regex_text, targets[:1], None, int(spec))]
    out = "^" + re.escape(targets[0]) + "$"
    tail_rule = Rule("reshape", out, (), None, 0, spec) if kind.endswith("reshape") else \
        Rule("unsqueeze", out, (), None, int(spec))
    return [Rule("transpose", regex_text, targets[:1]), tail_rule]
