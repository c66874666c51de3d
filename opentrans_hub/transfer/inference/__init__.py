"""Infer the NameMap of a framework from its tensors: no rule written by hand.

Evidence, strongest first: equal values (also transposed, reshaped, or as q/k/v chunks of a fused projection)
and correlated values (a fine-tuned tower stays close to its start), compared on fixed samples of positions, never
all pairs densely; names, through the ecosystems' vocabularies (:mod:`.vocab`); structure:
the canonical tower's repeated blocks (numbered children of a ``ModuleList``/``Sequential``) must be found in the
target in the same order with the same sizes (RN50: 3-4-6-3 bottlenecks; ViT-B/16: 12 equal blocks), which also
finds towers split in two (SAN) and refuses look-alikes of another depth.

Every pair is shape-checked; a tensor whose counterpart is not decided by the evidence is reported unmapped with
the reason. When two towers fit (a KD copy beside the trained one) and nothing decisive tells them apart, the
inference refuses and lists the candidates with the ``tower`` prefix that chooses. The pairs become a compact
NameMap (:mod:`.rules`) that is re-resolved against the target to prove it reproduces them.
"""

from .report import AmbiguousTowerError, InferenceReport, TensorInference, canonical_state
from .search import infer_name_map

__all__ = ["AmbiguousTowerError", "InferenceReport", "TensorInference", "canonical_state", "infer_name_map"]
