"""How timm names the tensors of OpenAI's CLIP ResNets: plain rule text, importable without torch.

timm rebuilds open_clip's ModifiedResNet as a ByobNet (``stem.convK``, ``stages.N``, ``head``). The rules carry
each canonical open_clip name to timm's, in the NameMap rule language; :mod:`.backbones` uses them to load timm
towers with canonical names, and the timm plugin declares them as its map (one source of truth).
"""

#: timm model name -> the open_clip architecture whose tensors it holds
TIMM_CLIP_RESNETS = {"resnet50_clip": "RN50", "resnet101_clip": "RN101", "resnet50x4_clip": "RN50x4",
                     "resnet50x16_clip": "RN50x16", "resnet50x64_clip": "RN50x64"}

#: canonical name -> timm name, one rename rule per tensor family
TIMM_CLIP_RESNET_RULES = r"""
rename ^(conv|bn)([123])\.(.+)$ -> stem.conv{g2}.{g1}.{g3}
rename ^layer(\d)\.(\d+)\.(conv|bn)1\.(.+)$ -> stages.{g1-1}.{g2}.conv1_1x1.{g3}.{g4}
rename ^layer(\d)\.(\d+)\.(conv|bn)2\.(.+)$ -> stages.{g1-1}.{g2}.conv2_kxk.{g3}.{g4}
rename ^layer(\d)\.(\d+)\.(conv|bn)3\.(.+)$ -> stages.{g1-1}.{g2}.conv3_1x1.{g3}.{g4}
rename ^layer(\d)\.(\d+)\.downsample\.0\.(.+)$ -> stages.{g1-1}.{g2}.shortcut.conv.conv.{g3}
rename ^layer(\d)\.(\d+)\.downsample\.1\.(.+)$ -> stages.{g1-1}.{g2}.shortcut.conv.bn.{g3}
rename ^attnpool\.positional_embedding$ -> head.pos_embed
rename ^attnpool\.([qkv])_proj\.(.+)$ -> head.{g1}.{g2}
rename ^attnpool\.c_proj\.(.+)$ -> head.proj.{g1}
"""
