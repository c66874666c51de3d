"""opentrans-hub plugin for timm's CLIP ResNets (``resnet50_clip.openai``, ``..._clip_gap``, 101, 50x4/16/64).

timm rebuilds OpenAI's ModifiedResNet as a ByobNet at the top level: the stem convs become
``stem.convK.conv``, bottleneck convs ``stages.{N-1}.i.conv1_1x1 / conv2_kxk / conv3_1x1``, the average-pool
shortcut ``shortcut.conv``, and attention pooling ``head`` (absent in the ``_gap`` models, where its names
are reported unmapped).
"""

from opentrans_hub import TIMM_CLIP_RESNET_RULES, Plugin

# the same rules build timm towers with canonical names in the core (backbones): one source of truth
_MAP = TIMM_CLIP_RESNET_RULES

plugin = Plugin(
    name="timm-clip-resnet",
    frameworks=("timm resnet*_clip", "timm resnet*_clip_gap"),
    archs={"open_clip/RN50": _MAP, "open_clip/RN*": _MAP},
    tower_path="",
    description="timm CLIP ResNets (ByobNet): stem/stages/shortcut/head names at the top level",
)
