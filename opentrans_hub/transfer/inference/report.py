"""What name-map inference reports (per tensor: targets, transform, evidence, confidence) and reads as input.

Part of the inference: a target is a checkpoint path, a state dict or a live module; the canonical
tower's names and shapes come from open_clip (built on the meta device); ``weights`` give the canonical values.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...errors import OpenTransError

log = logging.getLogger("opentrans_hub")

_SAMPLES = 64
_MARGIN = 0.1


# ---------------------------------------------------------------------------------------------------- report
@dataclass
class TensorInference:
    """What the inference decided for one canonical tensor."""

    source: str
    targets: list[str]
    transform: str  # identity | transpose | reshape:SPEC | unsqueeze:D | transpose+reshape:SPEC | split
    evidence: list[str]
    confidence: str  # high | medium | low

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "targets": self.targets, "transform": self.transform,
                "evidence": self.evidence, "confidence": self.confidence}


@dataclass
class InferenceReport:
    """Per canonical tensor: targets, transform, evidence and confidence; the unmapped ones with reasons."""

    arch: str
    tower: str
    tensors: dict[str, TensorInference] = field(default_factory=dict)
    unmapped: dict[str, str] = field(default_factory=dict)
    candidates: list[dict[str, Any]] = field(default_factory=list)
    rules: str = ""
    with_values: bool = False
    structure: str = ""
    ddp_prefix: str = ""  # every name of the target began with it (DDP's ``module.``); targets here omit it
    notes: list[str] = field(default_factory=list)  # warnings a user must see (also logged)

    @property
    def mapping(self) -> dict[str, list[str]]:
        return {s: list(t.targets) for s, t in self.tensors.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, "tower": self.tower, "ddp_prefix": self.ddp_prefix, "structure": self.structure,
                "rules": self.rules, "notes": self.notes,
                "with_values": self.with_values, "mapping": self.mapping,
                "unmapped": [{"source": s, "reason": r} for s, r in self.unmapped.items()],
                "tensors": [t.to_dict() for t in self.tensors.values()], "candidates": self.candidates}

    def summary(self) -> str:
        lines = [f"{self.arch}: tower {self.tower!r} ({self.structure}); mapped {len(self.tensors)}, "
                 f"unmapped {len(self.unmapped)}; {len(self.rules.splitlines())} rule(s)"]
        lines += [f"  {t.source} -> {', '.join(t.targets)} [{t.transform}; {t.confidence}: {'; '.join(t.evidence)}]"
                  for t in self.tensors.values()]
        lines += [f"  unmapped {s}: {r}" for s, r in self.unmapped.items()]
        lines += [f"  NOTE {note}" for note in self.notes]
        return "\n".join(lines)


class AmbiguousTowerError(OpenTransError):
    """Several towers fit and no evidence decides; ``candidates`` lists them with their evidence."""

    def __init__(self, message: str, candidates: list[dict[str, Any]]):
        super().__init__(message)
        self.candidates = candidates


# ---------------------------------------------------------------------------------------------------- inputs
def target_tensors(target: Any) -> tuple[dict[str, torch.Tensor], str | None, str]:
    """(tensors, the file they came from, the DDP prefix every name had and that was taken off)."""
    from ...io.checkpoints import target_state
    from ...sparsity.masks import unwrap

    if not isinstance(target, (nn.Module, Mapping, str, os.PathLike)):
        raise OpenTransError(f"cannot infer a name map for a {type(target).__name__}: give a checkpoint path, "
                             "a state dict or an nn.Module")
    state, source = target_state(unwrap(target) if isinstance(target, nn.Module) else target)
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise OpenTransError("the target holds no tensors", path=source)
    if all(k.startswith("module.") for k in tensors):
        return {k[len("module."):]: v for k, v in tensors.items()}, source, "module."
    return tensors, source, ""


def canonical_state(arch: str) -> dict[str, torch.Tensor]:
    """The canonical tower's state dict (parameters and buffers) as meta tensors, in definition order."""
    from ...towers.backbones import canonical_tower, parse_arch

    if parse_arch(arch)[0] != "open_clip":
        raise OpenTransError(f"name maps are inferred for open_clip architectures only, not {arch!r}")
    return dict(canonical_tower(arch).state_dict(keep_vars=True))


def source_values(arch: str, weights: Any) -> dict[str, torch.Tensor] | None:
    """The canonical tower's values from ``weights`` (a module, a state dict or a weights file), or None."""
    if weights is None:
        return None
    from ...towers.backbones import build_visual, visual_state_dict

    if isinstance(weights, nn.Module):
        state = weights.state_dict()
    elif isinstance(weights, Mapping):
        state = visual_state_dict(weights)
    else:
        state = build_visual(arch, weights).state_dict()
    canonical = canonical_state(arch)
    missing = [k for k in canonical if k not in state]
    if len(missing) == len(canonical):
        raise OpenTransError(f"the weights hold none of the {arch} tower's tensors (first expected "
                             f"{next(iter(canonical))!r})")
    return {k: v.detach() for k, v in state.items() if k in canonical}
