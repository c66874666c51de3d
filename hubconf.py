"""torch.hub entrypoints for opentrans-hub: CLIP visual towers with OpenTrans subnetworks and layer selections.

    import torch
    backbone = torch.hub.load("<owner>/opentrans-hub", "clip_backbone", arch="RN50", pretrained="openai",
                              subnetwork="rn50-openai-imp21", trust_repo=True)
    torch.hub.load("/path/to/checkout", "clip_backbone", source="local", arch="RN50", pretrained="weights.pt")

Thin wrappers over the package (``opentrans_hub.zoo.hub.load_backbone`` and the registry); names resolve from
the user registry, the built-in recipe index, ``hf://ORG/REPO[@REV]`` and plain paths.
"""

dependencies = ["torch", "open_clip", "safetensors", "huggingface_hub", "filelock", "platformdirs"]


def clip_backbone(arch="RN50", pretrained=None, subnetwork=None, selection=None, exact=None, strict=True):
    """CLIP image encoder (open_clip parameter names), optionally pruned and with a layer selection.

    Args:
        arch: ``RN50``, ``RN101``, ``open_clip/ViT-B-16``, ``timm/resnet50_clip``, ...
        pretrained: weights tag (``openai``), local weights file (a packed sparse ``.safetensors`` too),
            ``hf://ORG/REPO[@REV]/FILE``, or a packed backbone's ``hf://ORG/REPO[@REV]``; None = random.
        subnetwork: registry name, ``hf://ORG/REPO[@REV]`` or ``.safetensors`` path of a subnetwork.
        selection: registry name, ``hf://`` reference or ``.json`` path of a layer selection (freezes layers).
        exact: keep the masks so pruned weights stay exactly zero while training (False bakes the zeros);
            default: exact for a packed backbone, baked for a subnetwork on dense weights.
        strict: every mask must find its tensor in the tower.
    """
    from opentrans_hub.transfer.backbone import load_backbone

    return load_backbone(arch, pretrained=pretrained, subnetwork=subnetwork, selection=selection, exact=exact,
                         strict=strict)


def subnetwork(name):
    """A verified ``opentrans_hub.Subnetwork`` by registry name, ``hf://ORG/REPO[@REV]`` or path."""
    from opentrans_hub.zoo.registry import load_subnetwork

    return load_subnetwork(name)


def layer_selection(name):
    """A verified ``opentrans_hub.LayerSelection`` by registry name, ``hf://ORG/REPO[@REV]`` or path."""
    from opentrans_hub.zoo.registry import load_selection

    return load_selection(name)
