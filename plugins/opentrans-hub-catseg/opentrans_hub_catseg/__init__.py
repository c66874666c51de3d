"""opentrans-hub plugin for CAT-Seg (KU-CVLAB/CAT-Seg).

CAT-Seg vendors OpenAI's CLIP at ``sem_seg_head.predictor.clip_model.visual.`` and fine-tunes the attention
projections, so its attention keeps ``q_proj_weight`` / ``k_proj_weight`` / ``v_proj_weight`` instead of the
fused ``in_proj_weight`` (3d x d, rows in q, k, v order); the bias stays fused. A mask for the fused weight
is split the same way.
"""

from opentrans_hub import Plugin

_MAP = """
split \\.attn\\.in_proj_weight$ 0 -> .attn.q_proj_weight, .attn.k_proj_weight, .attn.v_proj_weight
prefix sem_seg_head.predictor.clip_model.visual.
"""

plugin = Plugin(
    name="catseg",
    frameworks=("CAT-Seg",),
    archs={"open_clip/ViT-B-16": _MAP, "open_clip/ViT-L-14-336": _MAP, "open_clip/ViT-L-14": _MAP},
    tower_path="sem_seg_head.predictor.clip_model.visual",
    config="configs/catseg.yaml",
    description="CAT-Seg: OpenAI ViT at sem_seg_head.predictor.clip_model.visual, q/k/v split attention",
)
