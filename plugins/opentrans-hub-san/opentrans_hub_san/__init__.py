"""opentrans-hub plugin for SAN (MendelXu/SAN, side adapter network).

SAN splits the open_clip ViT into ``clip_visual_extractor`` (patch embedding, ``ln_pre`` and the first L
blocks) and ``clip_rec_head`` (the remaining blocks, ``ln_post``, ``proj``), both at the top of the model.
``transformer.`` disappears and the head's blocks count from zero again: ``clip_rec_head.resblocks.k`` is
``transformer.resblocks.{k+L}``, with L = 9 for ViT-B/16 and 18 for ViT-L/14.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from opentrans_hub import OpenTransError, Plugin

if TYPE_CHECKING:
    from torch import nn


def _san_map(split: int) -> str:
    return f"""
rename ^transformer\\.resblocks\\.(\\d+)\\.(.+)$ -> clip_visual_extractor.resblocks.{{g1}}.{{g2}} if g1 < {split}
rename ^transformer\\.resblocks\\.(\\d+)\\.(.+)$ -> clip_rec_head.resblocks.{{g1-{split}}}.{{g2}} if g1 >= {split}
rename ^(conv1|class_embedding|positional_embedding|ln_pre)\\b(.*)$ -> clip_visual_extractor.{{g1}}{{g2}}
rename ^(ln_post|proj)\\b(.*)$ -> clip_rec_head.{{g1}}{{g2}}
"""


def locate_tower(model: nn.Module) -> nn.Module:
    """SAN's two halves as one module with open_clip's names (the view imports torch, so only when used)."""
    from .view import SanTowerView

    try:
        return SanTowerView(model.get_submodule("clip_visual_extractor"), model.get_submodule("clip_rec_head"))
    except AttributeError as exc:
        raise OpenTransError(f"plugin 'san': not a SAN model ({exc})") from None


plugin = Plugin(
    name="san",
    frameworks=("SAN",),
    archs={"open_clip/ViT-B-16": _san_map(9), "open_clip/ViT-L-14-336": _san_map(18),
           "open_clip/ViT-L-14": _san_map(18)},
    locator=locate_tower,
    config="configs/san.yaml",
    description="SAN: ViT split into clip_visual_extractor (blocks < L) and clip_rec_head (blocks >= L)",
)
