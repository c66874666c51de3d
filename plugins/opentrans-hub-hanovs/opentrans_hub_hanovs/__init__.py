"""opentrans-hub plugin for OpenTrans's Mask2Former OVS model ("Han et al.", Xujxyang/OpenTrans).

``CLIPResNetWithAttention`` loads OpenAI's RN50 with ``visual.`` stripped and sits at ``backbone.``; the
knowledge-distillation variant keeps a second, frozen copy of the tower at ``vision_clip.``. Every rule is
anchored by the ``backbone.`` prefix, so nothing ever lands on that copy.
"""

from opentrans_hub import Plugin

# attnpool exists only with VISION_FEATURE=resAtten; its positional embedding is resized (50 -> 257 rows
# for 512 px input) and is never masked or selected, so it is not carried over.
_MAP = """
drop ^attnpool\\.positional_embedding$
prefix backbone.
"""

plugin = Plugin(
    name="hanovs",
    frameworks=("OpenTrans Mask2Former OVS (Han et al.)",),
    archs={"open_clip/RN50": _MAP, "open_clip/RN101": _MAP},
    tower_path="backbone",
    config="configs/hanovs.yaml",  # IMP search; configs/hanovs-transfer.yaml for the second stage
    description="OpenTrans Mask2Former OVS: trained CLIP ResNet at backbone (never the vision_clip KD copy)",
)
