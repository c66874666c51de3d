"""Find the canonical tower inside a target by its block structure, pair its tensors, and choose or refuse.

The canonical tower's blocks (``layer1.0`` ... ``layer4.2``; ``transformer.resblocks.0-11``) form a sequence of
sizes; every way of laying the target's runs of blocks end to end that reproduces that sequence is a candidate
tower (two runs for SAN's split ViT). Mixtures of two copies are ruled out by locality: a candidate sharing a run
with a candidate that sits deeper in the module tree is dominated. Each candidate is then paired block by block,
and its other tensors (stem, embeddings, heads) are paired at the level of its runs, climbing towards the root
only while that crosses no other run of blocks (a decoder, a text tower, a KD copy).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any

from ...errors import OpenTransError, OpenTransWarning
from ...naming.namemap import NameMap, common_module_prefix
from .match import Item, Pair, find_blocks, match_scope
from .report import (
    AmbiguousTowerError,
    InferenceReport,
    TensorInference,
    canonical_state,
    log,
    source_values,
    target_tensors,
)

_MAX_SOLUTIONS = 5000


@dataclass
class _Candidate:
    runs: tuple[str, ...]
    level: str
    pairs: list[Pair] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)
    pre_mapped: float = 0.0
    order_evidence: str = ""

    @property
    def prefix(self) -> str:
        """Where the tower sits: the common prefix of its pairs (tensors found elsewhere by values aside)."""
        names = [name for p in self.pairs for name in (p.t.parts or (p.t.name,))
                 if "found by values outside the tower's level" not in p.evidence]
        return common_module_prefix(names) if names else self.level

    def value_hits(self) -> tuple[int, int]:
        hits = sum(1 for p in self.pairs if p.evidence and p.evidence[0].startswith("values: ")
                   and "uncorrelated" not in p.evidence[0])
        misses = sum(1 for p in self.pairs if p.evidence and "uncorrelated" in p.evidence[0])
        return hits, misses

    def describe(self, sizes: dict[str, int]) -> dict[str, Any]:
        hits, misses = self.value_hits()
        return {"tower": self.prefix, "runs": list(self.runs), "structure": "-".join(str(sizes[r]) for r in self.runs),
                "mapped": len(self.pairs), "stem_mapped": round(self.pre_mapped, 2), "value_matches": hits,
                "value_mismatches": misses, "order": self.order_evidence}


def _level(runs: tuple[str, ...]) -> str:
    if len(runs) == 1:
        parent = runs[0].rpartition(".")[0]
        return parent + "." if parent else ""
    return common_module_prefix([r + ".x" for r in runs])


def _solutions(sequence: list[int], runs: dict[str, list[int]], extra: float = 0.0) -> list[tuple[str, ...]]:
    """Orders of whole target runs whose block sizes, end to end, equal the canonical ``sequence``.

    ``extra``: a target block may hold up to this fraction more (adapters, prompts inside blocks).
    """
    def fit(want: list[int], got: list[int]) -> bool:
        return len(want) == len(got) and all(w <= g <= w * (1 + extra) for w, g in zip(want, got))

    usable = {r: sizes for r, sizes in runs.items() if all(any(fit([w], [g]) for w in set(sequence)) for g in sizes)}
    out: list[tuple[str, ...]] = []

    def walk(position: int, chosen: tuple[str, ...]) -> None:
        if len(out) >= _MAX_SOLUTIONS:
            return
        if position == len(sequence):
            out.append(chosen)
            return
        for run, sizes in usable.items():
            if run not in chosen and fit(sequence[position:position + len(sizes)], sizes):
                walk(position + len(sizes), chosen + (run,))

    walk(0, ())
    return out


def _evaluate(order: tuple[str, ...], c_blocks: list[str], c_items: dict[str, list[Item]], c_rest: list[Item],
              t_runs: dict[str, list[str]], t_items: dict[str, list[Item]], t_rest: list[Item], top: str,
              pre: set[str]) -> _Candidate:
    candidate = _Candidate(order, _level(order))
    t_blocks = [b for run in order for b in t_runs[run]]
    for c_block, t_block in zip(c_blocks, t_blocks):
        pairs, reasons = match_scope(c_items[c_block], t_items[t_block], c_block + ".", t_block + ".")
        for pair in pairs:
            pair.evidence.append(f"block {c_block} = {t_block} (structure)")
        candidate.pairs += pairs
        candidate.reasons.update(reasons)
    # the tower's other tensors: from the runs' level towards the root, level by level, never into a level that
    # holds another run of blocks (a decoder, a text tower, a KD copy); above the first level that gave pairs,
    # only pairs with name or value evidence count
    level = candidate.level if candidate.level.startswith(top) else top
    foreign = [r for r in t_runs if r not in order]
    pairs: list[Pair] = []
    reasons: dict[str, str] = {}
    used: set[str] = set()
    first_hit: str | None = None
    while True:
        remaining = [c for c in c_rest if c.name not in {p.c.name for p in pairs}]
        pool = [t for t in t_rest if t.name.startswith(level) and t.name not in used]
        found, why = match_scope(remaining, pool, "", level)
        if first_hit is not None:
            found = [p for p in found if any(e.startswith(("names", "values: equal", "values: r="))
                                             for e in p.evidence)]
        for pair in found:
            if first_hit is not None and not any(e.startswith("names") for e in pair.evidence):
                pair.evidence.append("found by values outside the tower's level")
            pairs.append(pair)
            used.update(pair.t.parts or (pair.t.name,))
        if first_hit is None:
            reasons = dict(why)
            if found:
                first_hit = level
        for name in [n for n in reasons if n in {p.c.name for p in found}]:
            del reasons[name]
        if len(pairs) == len(c_rest) or level == top:
            break
        head = level[:-1].rpartition(".")[0]
        parent = head + "." if head else ""
        if not parent.startswith(top) or any(r.startswith(parent) for r in foreign):
            break
        level = parent
    candidate.level = first_hit or level
    candidate.pairs += pairs
    candidate.reasons.update(reasons)
    # equal or strongly correlated values are decisive wherever the tensor sits (MaskCLIP keeps proj in its head)
    left = [c for c in c_rest if c.value is not None and c.name in reasons]
    if left:
        used = {n for p in candidate.pairs for n in (p.t.parts or (p.t.name,))}
        pool = [t for t in t_rest if t.name.startswith(top) and t.name not in used and t.value is not None]
        extra, _ = match_scope(left, pool, "", "")
        for pair in extra:
            if pair.evidence and (pair.evidence[0] == "values: equal" or pair.evidence[0].startswith("values: r=0.9")
                                  or pair.evidence[0] == "values: r=1.000"):
                pair.evidence.append("found by values outside the tower's level")
                candidate.pairs.append(pair)
                candidate.reasons.pop(pair.c.name, None)
                pairs.append(pair)
    mapped = {p.c.name for p in pairs}
    candidate.pre_mapped = len(pre & mapped) / len(pre) if pre else 1.0
    return candidate


def _stem_first(candidate: _Candidate) -> bool:
    """Whether the first run shares its branch of the module tree with the image-input conv (SAN's extractor)."""
    stems = [p for p in candidate.pairs if p.c.block is None and len(p.c.shape) == 4 and p.c.shape[1] == 3]
    if not stems:
        return False
    level = _level(candidate.runs)

    def branch(name: str) -> str:
        return name[len(level):].split(".")[0]

    return branch(stems[0].t.name) == branch(candidate.runs[0])


def _order_of_runs(evaluated: list[_Candidate], with_values: bool, t_runs: dict[str, list[str]],
                   t_items: dict[str, list[Item]], t_first: dict[str, int], source: str | None) -> _Candidate:
    """One order for runs that fit in several (a tower split into equal blocks): values, the stem, the file."""
    by_values = sorted(evaluated, key=lambda e: -e.value_hits()[0])
    if with_values and by_values[0].value_hits()[0] > by_values[1].value_hits()[0]:
        by_values[0].order_evidence = "run order by values"
        return by_values[0]
    stem_first = [e for e in evaluated if _stem_first(e)]
    if len(stem_first) == 1:
        stem_first[0].order_evidence = "run order: the run beside the image stem comes first"
        return stem_first[0]
    runs = {r for e in evaluated for r in e.runs}
    stored = all([min(t.order for t in t_items[b]) for b in t_runs[r]] ==
                 sorted(min(t.order for t in t_items[b]) for b in t_runs[r]) for r in runs)
    if not stored:
        raise OpenTransError(f"the runs {', '.join(sorted(runs))} fit the tower in {len(evaluated)} orders and "
                             "nothing tells which comes first (the file's order is shuffled); pass --weights so "
                             "values decide", path=source)
    best = min(evaluated, key=lambda e: [t_first[r] for r in e.runs])
    best.order_evidence = "run order as stored in the file"
    return best


def _choose(candidates: list[_Candidate], with_values: bool, sizes: dict[str, int], arch: str) -> _Candidate:
    if len(candidates) == 1:
        return candidates[0]
    full = [c for c in candidates if c.pre_mapped >= 0.5]
    pool = full or candidates
    if len(pool) == 1:
        return pool[0]
    if with_values:
        ranked = sorted(pool, key=lambda c: -c.value_hits()[0])
        hits = [c.value_hits()[0] for c in ranked]
        if hits[0] >= max(3, len(ranked[0].pairs) // 2) and hits[1] <= len(ranked[1].pairs) // 10:
            return ranked[0]
    if not full:
        ranked = sorted(pool, key=lambda c: -len(c.pairs))
        if len(ranked[0].pairs) >= 2 * len(ranked[1].pairs):
            return ranked[0]
    described = [c.describe(sizes) for c in pool]
    listing = "; ".join(f"{d['tower']!r} (blocks {d['structure']}, {d['mapped']} tensors, stem "
                        f"{d['stem_mapped']:.0%}" + (f", values {d['value_matches']} match" if with_values else "")
                        + ")" for d in described)
    raise AmbiguousTowerError(f"{len(pool)} candidate towers fit {arch} and no evidence decides between them: "
                              f"{listing}; choose one with --tower PREFIX (e.g. --tower {described[0]['tower']})",
                              described)


def infer_name_map(target: Any, arch: str, weights: Any = None, tower: str | None = None
                   ) -> tuple[NameMap, InferenceReport]:
    """Infer the NameMap carrying ``arch``'s canonical tower names onto ``target``, and how it was decided.

    ``target``: a checkpoint path, a state dict or an ``nn.Module``; ``weights``: the base tower's values under
    canonical names (file, open_clip tag, state dict or module), which add value evidence; ``tower``: a prefix
    that restricts the search (what to pass when two towers fit). A DDP ``module.`` prefix on every name is taken
    off (``report.ddp_prefix``; ``name_map.then(NameMap.prefix("module."))`` maps onto such names, as ``apply``
    does). Raises OpenTransError when no tower fits,
    when several fit and nothing decides (:class:`AmbiguousTowerError` with ``candidates``), and when the
    compact rules do not reproduce the inferred pairs.
    """
    from .rules import compact_rules

    tensors, source, ddp = target_tensors(target)
    canonical = canonical_state(arch)
    values = source_values(arch, weights)
    if tower is not None:
        if tower and not tower.endswith("."):
            tower += "."
        tensors = {k: v for k, v in tensors.items() if k.startswith(tower)}
        if not tensors:
            raise OpenTransError(f"no tensor of the target starts with --tower {tower!r}", path=source)
    top = tower or ""
    c_all = [Item(n, tuple(v.shape), values.get(n) if values else None, i)
             for i, (n, v) in enumerate(canonical.items())]
    t_all = [Item(n, tuple(v.shape), v if v.device.type != "meta" else None, i)
             for i, (n, v) in enumerate(tensors.items())]
    c_owner, c_runs = find_blocks([c.name for c in c_all])
    t_owner, t_runs = find_blocks([t.name for t in t_all])
    if not c_runs:
        raise OpenTransError(f"{arch}: the canonical tower has no repeated blocks to search for")
    c_items: dict[str, list[Item]] = {}
    for c in c_all:
        c.block = c_owner.get(c.name)
        if c.block:
            c_items.setdefault(c.block, []).append(c)
    t_items: dict[str, list[Item]] = {}
    for t in t_all:
        t.block = t_owner.get(t.name)
        if t.block:
            t_items.setdefault(t.block, []).append(t)
    first = {r: min(c.order for b in blocks for c in c_items[b]) for r, blocks in c_runs.items()}
    c_blocks = [b for r in sorted(c_runs, key=first.get) for b in c_runs[r]]

    def numel(items: list[Item]) -> int:
        return sum(t.numel for t in items if t.shape)

    sequence = [numel(c_items[b]) for b in c_blocks]
    t_sizes = {r: [numel(t_items[b]) for b in blocks] for r, blocks in t_runs.items()}
    solutions = _solutions(sequence, t_sizes)
    if not solutions:  # blocks that hold a little more than the tower's own layers (adapters, deep prompts)
        solutions = _solutions(sequence, t_sizes, extra=0.1)
    structure = "-".join(str(len(blocks)) for r, blocks in sorted(c_runs.items(), key=lambda x: first[x[0]]))
    if not solutions:
        runs = ", ".join(f"{r} ({len(b)})" for r, b in sorted(t_runs.items())[:8]) or "none"
        raise OpenTransError(f"no part of the target has the block structure of {arch} (blocks {structure}, "
                             f"{sum(sequence):,} parameters in blocks); runs of blocks found: {runs}", path=source)
    by_set: dict[frozenset[str], list[tuple[str, ...]]] = {}
    for solution in solutions:
        by_set.setdefault(frozenset(solution), []).append(solution)
    levels = {key: _level(orders[0]) for key, orders in by_set.items()}
    kept = [key for key in by_set if not any(other != key and other & key and len(levels[other]) > len(levels[key])
                                              and levels[other].startswith(levels[key]) for other in by_set)]
    c_rest = [c for c in c_all if c.block is None]
    t_rest = [t for t in t_all if t.block is None]
    first_block = min(c.order for c in c_all if c.block)
    pre = {c.name for c in c_rest if c.order < first_block and c.shape}
    if not pre:
        pre = {c.name for c in c_rest if c.shape and not c.name.startswith(("ln_post", "proj", "attnpool", "head"))}
    t_first = {r: min(t.order for b in blocks for t in t_items[b]) for r, blocks in t_runs.items()}
    candidates = []
    for key in kept:
        orders = by_set[key][:6]
        evaluated = [_evaluate(o, c_blocks, c_items, c_rest, t_runs, t_items, t_rest, top, pre) for o in orders]
        if len(evaluated) == 1:
            best = evaluated[0]
        else:
            best = _order_of_runs(evaluated, values is not None, t_runs, t_items, t_first, source)
        candidates.append(best)
    sizes = {r: len(b) for r, b in t_runs.items()}
    chosen = _choose(candidates, values is not None, sizes, arch)
    report = InferenceReport(arch=arch, tower=chosen.prefix, with_values=values is not None, ddp_prefix=ddp,
                             structure=f"blocks {'+'.join(str(sizes[r]) for r in chosen.runs)} in "
                                       f"{', '.join(chosen.runs)}")
    report.candidates = [c.describe(sizes) for c in candidates]
    by_source = {p.c.name: p for p in chosen.pairs}
    hits, misses = chosen.value_hits()
    trust_values = values is not None and hits > misses  # wrong weights contradict everything alike
    for c in c_all:
        pair = by_source.get(c.name)
        if pair is None:
            report.unmapped[c.name] = chosen.reasons.get(c.name, "no counterpart found")
            continue
        contradiction = next((e for e in pair.evidence if "uncorrelated" in e), None)
        if trust_values and contradiction:  # the weights fit this tower, and not this pair: no guess is mapped
            report.unmapped[c.name] = f"the only candidate {pair.t.name!r} contradicts the weights ({contradiction})"
            continue
        evidence = list(pair.evidence)
        if chosen.order_evidence and pair.c.block:
            evidence.append(chosen.order_evidence)
        report.tensors[c.name] = TensorInference(c.name, list(pair.t.parts or (pair.t.name,)), pair.transform,
                                                 evidence, pair.confidence)
    if values is not None and misses > hits:
        report.notes.append(f"the weights do not look like this tower's start: {misses} paired tensors have "
                            f"uncorrelated values, {hits} agree (pairs rest on names and structure; check --weights)")
    low = [s for s, t in report.tensors.items() if t.confidence == "low"]
    if low:
        hint = "; --weights adds value evidence" if values is None else ""
        report.notes.append(f"{len(low)} pair(s) rest on weak evidence (name order or contradicting values), first "
                            f"{low[0]!r}{hint}")
    for note in report.notes:  # once, loud: the CLI shows it as one warning line
        warnings.warn(f"infer_name_map({arch}): {note}", OpenTransWarning, stacklevel=2)
    if not report.tensors:
        raise OpenTransError(f"a tower was found at {chosen.prefix!r} but none of its tensors could be paired",
                             path=source)
    target_shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    name_map = compact_rules(report, canonical, target_shapes)
    report.rules = str(name_map)
    log.info("inferred name map for %s (tower %r, %d tensors mapped, %d unmapped):\n%s", arch, report.tower,
             len(report.tensors), len(report.unmapped), report.rules)
    return name_map, report


def describe_source(target: Any) -> str:
    return os.fspath(target) if isinstance(target, (str, os.PathLike)) else type(target).__name__

