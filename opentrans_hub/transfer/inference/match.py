"""Pairing tensors within one scope (a block pair, or a tower's other tensors) by values, names and shapes.

Part of :mod:`opentrans_hub.transfer.inference`: the candidates of a canonical tensor are the target tensors it fits by
shape under a transform (identity, transpose, reshape/unsqueeze, a q/k/v split); each is scored by sampled values
(equal, correlated, or contradicting), by the overlap of normalised name tokens, and by whether its module's other
tensors went to the same place. Pairs are taken when both sides agree by a margin; the rest are reported.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .vocab import dice, leaf_role, name_tokens, qkv_part

_SAMPLES = 128
_MARGIN = 0.1


# ---------------------------------------------------------------------------------------------------- tensors
@dataclass
class Item:
    """One tensor of either side: full name, shape, values (None without), position in its file."""

    name: str
    shape: tuple[int, ...]
    value: torch.Tensor | None
    order: int
    block: str | None = None  # the block (numbered module) holding it
    parts: tuple[str, ...] = ()  # a q/k/v group: the three member names (then ``name`` is virtual)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def _kind(shapes: Mapping[str, tuple[int, ...]], name: str) -> str:
    """CONV / LINEAR / NORM from the module's own tensors (what kind of layer holds ``name``)."""
    module = name.rsplit(".", 1)[0] if "." in name else ""
    weight = shapes.get(f"{module}.weight" if module else "weight")
    if f"{module}.running_mean" in shapes or (weight is not None and len(weight) == 1):
        return "NORM"
    if weight is not None:
        return "CONV" if len(weight) == 4 else "LINEAR" if len(weight) == 2 else ""
    return "LINEAR" if name.endswith("_weight") else ""


def _is_int(token: str) -> bool:
    return token.isdigit()


def find_blocks(names: list[str]) -> tuple[dict[str, str], dict[str, list[str]]]:
    """(tensor -> its block, run -> its blocks in index order).

    A block is a numbered child (``layer1.0``, ``resblocks.7``) holding several layers, with no such numbered
    descendant of its own; a run is the parent of blocks (``layer1``, ``transformer.resblocks``).
    """
    modules: dict[str, set[str]] = {}  # numbered node -> the distinct modules (tensor parents) under it
    for name in names:
        tokens = name.split(".")
        parent = ".".join(tokens[:-1])
        for i, token in enumerate(tokens[:-1]):
            if _is_int(token) and i > 0:
                modules.setdefault(".".join(tokens[:i + 1]), set()).add(parent)
    # a block holds several layers (a wrapper around one layer, mmcv's ffn.layers.0.0, is not one)
    deep = {node: len(found) >= 2 for node, found in modules.items()}
    candidates = {node for node, is_deep in deep.items() if is_deep}
    enclosing = set()  # candidates that hold a deeper candidate: each name's ancestors, not all pairs
    for node in candidates:
        tokens = node.split(".")
        enclosing.update(".".join(tokens[:i]) for i in range(1, len(tokens)))
    blocks = candidates - enclosing
    owner: dict[str, str] = {}
    for name in names:
        tokens = name.split(".")
        for i in range(len(tokens) - 1, 0, -1):
            node = ".".join(tokens[:i])
            if node in blocks:
                owner[name] = node
                break
    runs: dict[str, list[str]] = {}
    for block in blocks:
        run, _, _ = block.rpartition(".")
        runs.setdefault(run, []).append(block)
    for run in runs:
        runs[run].sort(key=lambda b: int(b.rsplit(".", 1)[1]))
    return owner, runs


# ---------------------------------------------------------------------------------------------------- values
def _positions(numel: int) -> torch.Tensor:
    """Fixed positions (the same for every tensor of this size): all of a small tensor, else a random sample."""
    if numel <= _SAMPLES:
        return torch.arange(numel)
    gen = torch.Generator().manual_seed(numel)
    return torch.randint(0, numel, (_SAMPLES,), generator=gen)


def _sample(c: Item, t: Item, transform: str, part: int | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The same positions of the canonical (transformed into the target's layout) and the target tensor."""
    if c.value is None:
        return None
    if t.parts:
        values = [p for p in t.value] if isinstance(t.value, list) else None
        if values is None:
            return None
        size = values[0].numel()
        idx = _positions(size)
        got = torch.cat([v.reshape(-1)[idx] for v in values])
        flat = c.value.reshape(-1)
        want = torch.cat([flat[idx + k * size] for k in range(len(values))])
        return want, got
    if t.value is None:
        return None
    idx = _positions(t.numel)
    got = t.value.reshape(-1)[idx]
    flat = c.value.reshape(-1)
    if transform.startswith("transpose"):
        rows, cols = c.shape  # target index k = j * rows + i  <->  source (i, j) = i * cols + j
        j, i = idx // rows, idx % rows
        return flat[i * cols + j], got
    return flat[idx], got


def _value_evidence(c: Item, t: Item, transform: str) -> tuple[float, str] | None:
    pair = _sample(c, t, transform)
    if pair is None:
        return None
    want, got = (x.double() for x in pair)
    if want.numel() < 2 or float(got.std()) == 0.0 or float(want.std()) == 0.0:
        return None  # constant tensors (fresh norms, zero biases) say nothing
    if torch.equal(want, got):
        return 3.0, "values: equal"
    r = float(torch.corrcoef(torch.stack([want, got]))[0, 1])
    chance = 3.5 / want.numel() ** 0.5  # |r| unrelated values reach by chance, about 3.5 standard deviations
    if r >= max(0.95, chance):
        return 2.0, f"values: r={r:.3f}"
    if r >= max(0.5, chance):
        return r, f"values: r={r:.2f}"
    if r < 0.3 and want.numel() >= 32:
        # a fine-tuned tensor keeps r near 1, so this is not where it came from; but wrong weights contradict every
        # candidate alike, so a contradiction is reported (and counted against a tower), never a reason to prefer
        return 0.0, f"values: uncorrelated (r={r:.2f})"
    return None


# ---------------------------------------------------------------------------------------------------- matching
def _squeeze(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(s for s in shape if s != 1)


def _reshape_spec(src: tuple[int, ...], dst: tuple[int, ...]) -> str:
    """``unsqueeze:D`` when ``dst`` is ``src`` with one new size-1 dimension, else ``reshape:SPEC``."""
    if len(dst) == len(src) + 1:
        for d in range(len(dst)):
            if dst[d] == 1 and dst[:d] + dst[d + 1:] == src:
                return f"unsqueeze:{d}"
    items = ["*" if i < len(src) and src[i] == d else str(d) for i, d in enumerate(dst)]
    literal = [i for i, item in enumerate(items) if item not in {"*", "1"}]
    if len(literal) == 1:
        items[literal[0]] = "-1"
    return "reshape:" + ",".join(items)


def _transforms(c: Item, t: Item) -> list[tuple[str, float]]:
    """Shape-compatible ways to carry ``c`` onto ``t`` with a small preference penalty each."""
    if t.parts:
        part = t.shape
        if len(c.shape) == len(part) and c.shape[0] == 3 * part[0] and c.shape[1:] == part[1:]:
            return [("split", -0.05)]
        return []
    out = []
    if c.shape == t.shape:
        return [("identity", 0.0)]
    if c.numel != t.numel:
        return out
    if _squeeze(c.shape) == _squeeze(t.shape):
        out.append((_reshape_spec(c.shape, t.shape), -0.1))
    if len(c.shape) == 2 and c.shape[0] != c.shape[1]:
        flipped = (c.shape[1], c.shape[0])
        if t.shape == flipped:
            out.append(("transpose", -0.2))
        elif _squeeze(t.shape) == flipped and len(t.shape) > 2:
            out.append(("transpose+" + _reshape_spec(flipped, t.shape), -0.25))
    return out


def _roles_fit(c: Item, t: Item) -> bool:
    a, b = leaf_role(c.name), leaf_role(t.parts[0] if t.parts else t.name)
    return a == b or "param" in {a, b} and {a, b} <= {"param", "weight"}


def _qkv_groups(items: list[Item]) -> list[Item]:
    """Virtual fused tensors for each complete, equal-shaped q/k/v triple among ``items``."""
    groups: dict[tuple[str, ...], dict[int, Item]] = {}
    for item in items:
        segments = item.name.split(".")
        for i, segment in enumerate(segments):
            part = qkv_part(segment)
            if part is not None:
                key = tuple(segments[:i]) + ("*",) + tuple(segments[i + 1:])
                if segment.endswith("_weight"):
                    key = tuple(segments[:i]) + ("*_weight",)
                groups.setdefault(key, {})[part] = item
    out = []
    for key, members in groups.items():
        if set(members) != {0, 1, 2} or len({m.shape for m in members.values()}) != 1:
            continue
        first = members[0]
        name = ".".join(key).replace("*_weight", "qkv_weight").replace("*", "qkv")
        values = [members[p].value for p in range(3)]
        virtual = Item(name, first.shape, values if all(v is not None for v in values) else None,
                     min(m.order for m in members.values()), first.block,
                     tuple(members[p].name for p in range(3)))
        out.append(virtual)
    return out


@dataclass
class Pair:
    """A canonical tensor paired with a target tensor: how, how strongly and why."""

    c: Item
    t: Item
    transform: str
    score: float
    evidence: list[str]
    confidence: str


def _inversions(pairs: list[Pair], c: Item, t: Item) -> int:
    return sum(1 for p in pairs if (p.c.order - c.order) * (p.t.order - t.order) < 0)


def match_scope(canonical: list[Item], targets: list[Item], rel_c: str,
                rel_t: str) -> tuple[list[Pair], dict[str, str]]:
    """Pair canonical tensors with target tensors of one scope (a block pair, or the tower's other tensors).

    Names compare relative to ``rel_c`` / ``rel_t``. A pair is taken when each is the other's best candidate by
    a margin; ties go to the order of the names when the taken pairs keep that order; the rest are unmapped.
    """
    pool = list(targets) + _qkv_groups(targets)
    shapes_c = {c.name: c.shape for c in canonical}
    shapes_t = {t.name: t.shape for t in targets}
    cands: dict[str, list[Pair]] = {}
    # a name both sides use for the same kind of layer means the same tensor: it pairs with its namesake or
    # with nothing (torchvision's 7x7 conv1 is not CLIP's conv1); another kind under one name is a renumbering
    c_kinds = {c.name[len(rel_c):]: _kind(shapes_c, c.name) for c in canonical}
    t_kinds = {t.name[len(rel_t):]: _kind(shapes_t, t.name) for t in targets}
    c_names = {n for n, k in c_kinds.items() if t_kinds.get(n, k) == k}
    t_names = {t.name[len(rel_t):]: t for t in targets if c_kinds.get(t.name[len(rel_t):]) ==
               t_kinds[t.name[len(rel_t):]]}
    namesakes: dict[str, str] = {}
    for c in canonical:
        c_rel = c.name[len(rel_c):]
        c_tokens = name_tokens(c_rel) | ({_kind(shapes_c, c.name)} - {""})
        same = t_names.get(c_rel)
        if same is not None and same.shape != c.shape and not _transforms(c, same):
            namesakes[c.name] = f"its namesake {same.name!r} has shape {tuple(same.shape)}, not {tuple(c.shape)}: " \
                                "not a counterpart"
        for t in pool:
            t_rel = t.name[len(rel_t):]
            if (t_rel in c_names or c_rel in t_names) and t_rel != c_rel:
                continue
            if not _roles_fit(c, t):
                continue
            for transform, penalty in _transforms(c, t):
                kind = "LINEAR" if t.parts else _kind(shapes_t, t.name)
                similarity = dice(c_tokens, name_tokens(t_rel) | ({kind} - {""}))
                evidence = [f"names {similarity:.2f}"] if similarity >= 0.4 else []
                score = 2 * similarity + penalty
                value = _value_evidence(c, t, transform)
                if transform == "identity" and len(c.shape) == 2 and c.shape[0] == c.shape[1]:
                    # a square matrix may be stored transposed (x @ P as a Linear's x @ W.T, or a re-implemented
                    # projection): only values can tell the orientation; without them a param -> weight pair is
                    # left undecided, anything else keeps its orientation
                    flipped = _value_evidence(c, t, "transpose")
                    if value is None and flipped is None:
                        if leaf_role(c.name) == "param" and leaf_role(t.name) == "weight":
                            transform = "uncertain-transpose"
                    elif flipped is not None and (value is None or flipped[0] > value[0]):
                        transform, value = "transpose", flipped
                if value is not None:
                    score += value[0]
                    evidence.insert(0, value[1])
                cands.setdefault(c.name, []).append(Pair(c, t, transform, score, evidence, ""))
    taken: list[Pair] = []
    used_c: set[str] = set()
    used_t: set[str] = set()
    module_pairs: dict[str, str] = {}

    def module(name: str) -> str:
        return name.rsplit(".", 1)[0] if "." in name else name

    def live(pair: Pair) -> bool:
        members = pair.t.parts or (pair.t.name,)
        return pair.c.name not in used_c and not any(m in used_t for m in members)

    def adjusted(pair: Pair) -> float:
        bonus = 0.0
        partner = module_pairs.get(module(pair.c.name))
        if partner is not None:
            bonus = 1.0 if partner == module(pair.t.name) else -1.0
        return pair.score + bonus

    for _ in range(len(canonical) + 2):
        progress = False
        by_t: dict[str, list[tuple[float, Pair]]] = {}
        best_c: dict[str, tuple[float, float, Pair]] = {}
        for c_name, options in cands.items():
            if c_name in used_c:
                continue
            scored = sorted(((adjusted(p), id(p), p) for p in options if live(p)), key=lambda x: -x[0])
            if not scored:
                continue
            second = scored[1][0] if len(scored) > 1 else float("-inf")
            best_c[c_name] = (scored[0][0], second, scored[0][2])
            for s, _, p in scored:
                by_t.setdefault(p.t.name, []).append((s, p))
        for c_name, (score, second, pair) in best_c.items():
            rivals = sorted((s for s, p in by_t.get(pair.t.name, []) if p.c.name != c_name), reverse=True)
            if score - second < _MARGIN or (rivals and score - rivals[0] < _MARGIN):
                continue
            if pair.transform == "uncertain-transpose" or not live(pair):
                continue
            taken.append(pair)
            used_c.add(c_name)
            used_t.update(pair.t.parts or (pair.t.name,))
            module_pairs.setdefault(module(c_name), module(pair.t.name))
            contradicted = any("uncorrelated" in e for e in pair.evidence)
            pair.confidence = "low" if contradicted else "high" if pair.evidence else "medium"
            if not pair.evidence:
                pair.evidence.append("only shape-compatible candidate")
            progress = True
        if progress:
            continue
        # ties: equally good partners are paired in the order of their names, when every pair taken so far
        # keeps that order (a shuffled or reordered file gives no such evidence)
        if taken and all(_inversions(taken, p.c, p.t) == 0 for p in taken):
            tied_sets: dict[str, frozenset[str]] = {}
            for c_name, (score, _second, _pair) in best_c.items():
                tied = [p for p in cands[c_name] if live(p) and adjusted(p) >= score - _MARGIN
                        and p.transform != "uncertain-transpose" and not p.t.parts]
                if len(tied) > 1:
                    tied_sets[c_name] = frozenset(p.t.name for p in tied)
            for group in list(dict.fromkeys(tied_sets.values())):
                members = sorted((n for n, g in tied_sets.items() if g == group),
                                 key=lambda n: next(p.c.order for p in cands[n]))
                if len(members) != len(group):
                    continue
                chosen = []
                t_sorted = sorted(group, key=lambda n: next(p.t.order for p in cands[members[0]] if p.t.name == n))
                for c_member, t_name in zip(members, t_sorted):
                    pair = next(p for p in cands[c_member] if p.t.name == t_name and live(p))
                    chosen.append(pair)
                if any(_inversions(taken, p.c, p.t) for p in chosen):
                    continue
                for pair in chosen:
                    taken.append(pair)
                    used_c.add(pair.c.name)
                    used_t.add(pair.t.name)
                    module_pairs.setdefault(module(pair.c.name), module(pair.t.name))
                    pair.evidence.append("order of names")
                    pair.confidence = "low"
                progress = True
                break
        if not progress:
            break
    reasons: dict[str, str] = {}
    # a norm is paired only along with the layer it normalises (the conv or linear before it): CLIP's bn3 is not
    # an ImageNet stem's conv1 norm just because both have 64 channels
    paired_modules = {module(p.c.name) for p in taken}
    owner: dict[str, str | None] = {}
    last_layer = None
    for c in sorted(canonical, key=lambda x: x.order):
        kind = _kind(shapes_c, c.name)
        if kind in {"CONV", "LINEAR"}:
            last_layer = module(c.name)
        elif kind == "NORM":
            owner.setdefault(module(c.name), last_layer)
    for pair in [p for p in taken if owner.get(module(p.c.name)) not in (None, *paired_modules)]:
        taken.remove(pair)
        used_c.discard(pair.c.name)
        reasons[pair.c.name] = f"the layer it normalises ({owner[module(pair.c.name)]}) has no counterpart"
    # a scalar (num_batches_tracked) is paired only along with the rest of its module
    paired_modules = {module(p.c.name) for p in taken if p.c.shape}
    for pair in [p for p in taken if not p.c.shape and module(p.c.name) not in paired_modules]:
        taken.remove(pair)
        used_c.discard(pair.c.name)
        reasons[pair.c.name] = "the rest of its module has no counterpart"
    for c in canonical:
        if c.name in used_c or c.name in reasons:
            continue
        options = [p for p in cands.get(c.name, []) if live(p)]
        if c.name in namesakes:
            reasons[c.name] = namesakes[c.name]
        elif not options:
            reasons[c.name] = f"no tensor of shape {tuple(c.shape)} left under {rel_t or 'the top level'!r}"
        elif any(p.transform == "uncertain-transpose" for p in options):
            reasons[c.name] = (f"square {tuple(c.shape)}: cannot tell from shapes whether "
                               f"{options[0].t.name!r} holds it transposed; pass --weights to decide by values")
        else:
            names = ", ".join(sorted({p.t.name for p in options})[:4])
            reasons[c.name] = f"ambiguous: {len(options)} candidate(s) with no decisive evidence ({names})"
    return taken, reasons


