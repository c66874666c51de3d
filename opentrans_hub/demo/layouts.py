"""Small segmentation models laid out like three OVS frameworks, for the demo.

Each keeps the CLIP tower (or torchvision's ResNet) under the attribute path the real framework uses, so
the framework's plugin maps a Subnetwork and a LayerSelection onto it exactly as it would onto the real
model; a 1x1-conv head turns the last feature map into per-pixel class logits.

* ``fcclip``:   ``backbone.clip_model.visual`` (FC-CLIP, open_clip tower)
* ``hanovs``:   ``backbone`` (OpenTrans's Mask2Former OVS model, attnpool deleted) plus a frozen KD teacher
  copy at ``vision_clip`` that must never be pruned
* ``deeplabv3``: torchvision's ``deeplabv3_resnet50`` (ImageNet-style stem, dilated layers 3-4)
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F


def _tower_features(tower: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The last feature map of an open_clip ModifiedResNet (everything before attention pooling)."""
    x = tower.stem(x)
    for layer in (tower.layer1, tower.layer2, tower.layer3, tower.layer4):
        x = layer(x)
    return x


class _Namespace(nn.Module):
    """An empty container module, so attribute paths read like the framework's (``backbone.clip_model``)."""


class FCCLIPLayout(nn.Module):
    def __init__(self, tower: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = _Namespace()
        self.backbone.clip_model = _Namespace()
        self.backbone.clip_model.visual = tower
        self.sem_seg_head = nn.Conv2d(tower.layer4[-1].conv3.out_channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.sem_seg_head(_tower_features(self.backbone.clip_model.visual, x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


class HanOVSLayout(nn.Module):
    def __init__(self, tower: nn.Module, num_classes: int):
        super().__init__()
        tower = copy.deepcopy(tower)
        if hasattr(tower, "attnpool"):
            del tower.attnpool  # the Mask2Former OVS model drops attention pooling
        self.backbone = tower
        self.vision_clip = copy.deepcopy(tower).requires_grad_(False)  # frozen KD teacher copy
        self.sem_seg_head = nn.Conv2d(tower.layer4[-1].conv3.out_channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.sem_seg_head(_tower_features(self.backbone, x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


class DeepLabV3Layout(nn.Module):
    """torchvision's deeplabv3_resnet50, randomly initialised; returns the ``out`` logits."""

    def __init__(self, tower: nn.Module, num_classes: int):  # the CLIP tower is not used: torchvision's own
        super().__init__()
        from torchvision.models.segmentation import deeplabv3_resnet50

        model = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False)
        self.backbone, self.classifier = model.backbone, model.classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x)["out"]
        logits = self.classifier(features)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


#: demo framework name -> (plugin name, layout class)
LAYOUTS = {
    "FC-CLIP": ("fcclip", FCCLIPLayout),
    "Mask2Former OVS (Han et al.)": ("hanovs", HanOVSLayout),
    "DeepLabv3 (torchvision)": ("deeplabv3-torchvision", DeepLabV3Layout),
}
