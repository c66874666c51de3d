"""opentrans-hub plugin for FC-CLIP (bytedance/fc-clip).

FC-CLIP builds a whole open_clip model at ``backbone.clip_model``; the image tower keeps open_clip's own
names under ``.visual.`` (ConvNeXt towers under ``.visual.trunk.``), next to the text tower, so the map is a
single prefix anchored at ``.visual.``.
"""

from opentrans_hub import Plugin

_PREFIX = "prefix backbone.clip_model.visual."

plugin = Plugin(
    name="fcclip",
    frameworks=("FC-CLIP",),
    archs={
        "open_clip/RN50": _PREFIX,
        "open_clip/convnext_large_d_320": _PREFIX,
        "open_clip/RN*": _PREFIX,  # RN101, RN50x4, RN50x16, RN50x64
        "open_clip/convnext_*": _PREFIX,  # convnext_base(_w, _w_320), convnext_large(_d), convnext_xxlarge
    },
    tower_path="backbone.clip_model.visual",
    config="configs/fcclip.yaml",
    description="FC-CLIP: frozen open_clip ResNet / ConvNeXt tower at backbone.clip_model.visual",
)
