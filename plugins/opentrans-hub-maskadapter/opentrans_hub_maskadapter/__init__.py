"""opentrans-hub plugin for Mask-Adapter (hustvl/MaskAdapter).

Mask-Adapter adds a ``mask_adapter`` head (a 1x1 fuse conv, three ConvNeXt-style blocks, a mask down-scaler) to the
FC-CLIP family: its own model, FC-CLIP and MAFT+ all hold one open_clip model at ``backbone.clip_model`` (the
ConvNeXt image tower under ``.visual.``, the text tower beside it), with the MAFT+ teacher copy left out
(``backbone_t`` is None there). The map is one prefix anchored at ``.visual.``: the adapter's blocks, the
``sem_seg_head`` and MAFT+'s ``cdt`` are never destinations. Mask-Adapter keeps the tower frozen, so it has no preset.
"""

from opentrans_hub import Plugin

_PREFIX = "prefix backbone.clip_model.visual."

plugin = Plugin(
    name="maskadapter",
    frameworks=("Mask-Adapter (FC-CLIP, MAFT+)",),
    archs={
        "open_clip/convnext_large_d_320": _PREFIX,  # FC-CLIP and MAFT+ large
        "open_clip/convnext_base_w_320": _PREFIX,  # MAFT+ base
    },
    tower_path="backbone.clip_model.visual",
    description="Mask-Adapter: open_clip ConvNeXt at backbone.clip_model.visual beside the mask_adapter head",
)
