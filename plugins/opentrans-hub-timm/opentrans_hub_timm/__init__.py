"""opentrans-hub plugin for timm's CLIP ResNets (``resnet50_clip.openai``, ``..._clip_gap``, 101, 50x4/16/64).

timm rebuilds OpenAI's ModifiedResNet as a ByobNet at the top level: the stem convs become
``stem.convK.conv``, bottleneck convs ``stages.{N-1}.i.conv1_1x1 / conv2_kxk / conv3_1x1``, the average-pool
shortcut ``shortcut.conv``, and attention pooling ``head`` (absent in the ``_gap`` models, where its names
are reported unmapped).
"""

from opentrans_hub.plugins import Plugin

_MAP = """
rename ^conv([123])\\.weight$ -> stem.conv{g1}.conv.weight
rename ^bn([123])\\.(.+)$ -> stem.conv{g1}.bn.{g2}
rename ^layer([1-4])\\.(\\d+)\\.conv1\\.(.+)$ -> stages.{g1-1}.{g2}.conv1_1x1.conv.{g3}
rename ^layer([1-4])\\.(\\d+)\\.bn1\\.(.+)$ -> stages.{g1-1}.{g2}.conv1_1x1.bn.{g3}
rename ^layer([1-4])\\.(\\d+)\\.conv2\\.(.+)$ -> stages.{g1-1}.{g2}.conv2_kxk.conv.{g3}
rename ^layer([1-4])\\.(\\d+)\\.bn2\\.(.+)$ -> stages.{g1-1}.{g2}.conv2_kxk.bn.{g3}
rename ^layer([1-4])\\.(\\d+)\\.conv3\\.(.+)$ -> stages.{g1-1}.{g2}.conv3_1x1.conv.{g3}
rename ^layer([1-4])\\.(\\d+)\\.bn3\\.(.+)$ -> stages.{g1-1}.{g2}.conv3_1x1.bn.{g3}
rename ^layer([1-4])\\.(\\d+)\\.downsample\\.0\\.(.+)$ -> stages.{g1-1}.{g2}.shortcut.conv.conv.{g3}
rename ^layer([1-4])\\.(\\d+)\\.downsample\\.1\\.(.+)$ -> stages.{g1-1}.{g2}.shortcut.conv.bn.{g3}
rename ^attnpool\\.positional_embedding$ -> head.pos_embed
rename ^attnpool\\.([qkv])_proj\\.(.+)$ -> head.{g1}.{g2}
rename ^attnpool\\.c_proj\\.(.+)$ -> head.proj.{g1}
"""

plugin = Plugin(
    name="timm-clip-resnet",
    frameworks=("timm resnet*_clip", "timm resnet*_clip_gap"),
    archs={"open_clip/RN50": _MAP, "open_clip/RN*": _MAP},
    tower_path="",
    description="timm CLIP ResNets (ByobNet): stem/stages/shortcut/head names at the top level",
)
