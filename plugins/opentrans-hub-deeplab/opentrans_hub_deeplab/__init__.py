"""opentrans-hub plugins for DeepLabv3 in its three forms.

* ``deeplabv3-opentrans``: OpenTrans's DeepLabv3 (zs3 ResNet-50 with CLIP's three-conv stem) at
  ``backbone.``; every tensor keeps open_clip's name, only the attention pool is absent.
* ``deeplabv3-d2``: detectron2's DeepLab project (``projects/DeepLab``, deeplab stem with
  STEM_OUT_CHANNELS 64): ``stem.convK``, ``res{N+1}.i``, ``convK.norm``, ``shortcut(.norm)``.
* ``deeplabv3-torchvision``: ``torchvision.models.segmentation.deeplabv3_resnet50``: the blocks match by
  name, but its stem is one 7x7 conv (``conv1`` has CLIP's name and another shape), so the whole CLIP stem
  is reported unmapped rather than forced onto it.
"""

from opentrans_hub import Plugin

_NO_ATTNPOOL = "drop ^attnpool\\.  # DeepLab has no attention-pooling head\n"

opentrans_deeplab = Plugin(
    name="deeplabv3-opentrans",
    frameworks=("OpenTrans DeepLabv3",),
    archs={"open_clip/RN50": _NO_ATTNPOOL + "prefix backbone.\n"},
    tower_path="backbone",
    config="configs/deeplabv3-opentrans.yaml",
    description="OpenTrans DeepLabv3: zs3 ResNet-50 with CLIP stem at backbone (names as open_clip)",
)

_D2 = _NO_ATTNPOOL + """
rename ^conv([123])\\.weight$ -> stem.conv{g1}.weight
rename ^bn([123])\\.(.+)$ -> stem.conv{g1}.norm.{g2}
rename ^layer([1-4])\\.(\\d+)\\.conv([123])\\.(.+)$ -> res{g1+1}.{g2}.conv{g3}.{g4}
rename ^layer([1-4])\\.(\\d+)\\.bn([123])\\.(.+)$ -> res{g1+1}.{g2}.conv{g3}.norm.{g4}
rename ^layer([1-4])\\.(\\d+)\\.downsample\\.0\\.(.+)$ -> res{g1+1}.{g2}.shortcut.{g3}
rename ^layer([1-4])\\.(\\d+)\\.downsample\\.1\\.(.+)$ -> res{g1+1}.{g2}.shortcut.norm.{g3}
prefix backbone.
"""

d2_deeplab = Plugin(
    name="deeplabv3-d2",
    frameworks=("detectron2 DeepLab (projects/DeepLab)",),
    archs={"open_clip/RN50": _D2, "open_clip/RN101": _D2},
    tower_path="backbone",
    config="configs/deeplabv3-d2.yaml",
    description="detectron2 DeepLab project ResNet (deeplab stem, STEM_OUT_CHANNELS 64) at backbone",
)

_TORCHVISION = _NO_ATTNPOOL + """
unmap ^(conv[123]|bn[123])\\.  # torchvision's stem is one 7x7 conv: same name conv1, another shape
prefix backbone.
"""

torchvision_deeplab = Plugin(
    name="deeplabv3-torchvision",
    frameworks=("torchvision deeplabv3_resnet50",),
    archs={"open_clip/RN50": _TORCHVISION, "open_clip/RN101": _TORCHVISION},
    tower_path="backbone",
    description="torchvision deeplabv3_resnet50/101: blocks by name at backbone; the CLIP stem has no counterpart",
)
