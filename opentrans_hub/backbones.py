"""Build CLIP image encoders (visual towers) by architecture id, with weights from a tag or a local file.

Architecture ids are ``family/name``: ``open_clip/RN50``, ``open_clip/ViT-B-16``, ... The tower is always
returned with open_clip's canonical parameter names, the names Subnetworks and LayerSelections use.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from .errors import OpenTransError

#: family -> builder(name, pretrained_tag) returning the visual tower; other modules may add families
BUILDERS: dict[str, Callable[[str, str | None], nn.Module]] = {}


def parse_arch(arch: str) -> tuple[str, str]:
    """``"open_clip/RN50"`` -> ``("open_clip", "RN50")``; a bare name means open_clip."""
    family, sep, name = arch.partition("/")
    if not sep:
        family, name = "open_clip", arch
    if not family or not name:
        raise OpenTransError(f"bad architecture id {arch!r}: expected FAMILY/NAME such as open_clip/RN50")
    return family, name


def _open_clip_visual(name: str, pretrained: str | None) -> nn.Module:
    import open_clip

    if name not in open_clip.list_models():
        raise OpenTransError(f"open_clip has no model {name!r} (see open_clip.list_models())")
    try:
        model = open_clip.create_model(name, pretrained=pretrained or None)
    except RuntimeError as exc:  # unknown tag, or weights that cannot be fetched here
        raise OpenTransError(f"cannot load open_clip {name} weights {pretrained!r}: {exc}") from None
    return model.visual


BUILDERS["open_clip"] = _open_clip_visual


def build_visual(arch: str, pretrained: str | os.PathLike | None = None) -> nn.Module:
    """The visual tower of ``arch`` in eval mode, randomly initialised unless ``pretrained`` is given.

    ``pretrained`` is a tag of the family (``openai`` for open_clip; needs the weights to be downloadable
    or cached) or a local weights file (.safetensors / .pt / .pth / .bin), either a whole CLIP state dict
    (``visual.`` prefix) or the tower alone.
    """
    family, name = parse_arch(arch)
    if family not in BUILDERS:
        raise OpenTransError(f"unknown architecture family {family!r} in {arch!r}; known: {', '.join(BUILDERS)}")
    is_file = pretrained is not None and (os.path.sep in os.fspath(pretrained) or Path(pretrained).is_file())
    visual = BUILDERS[family](name, None if is_file else (os.fspath(pretrained) if pretrained else None))
    if is_file:
        load_visual_weights(visual, pretrained)
    return visual.eval()


def visual_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tower's tensors of a whole-CLIP state dict (``visual.`` prefix stripped), else the dict itself."""
    if any(k.startswith("visual.") for k in state):
        return {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    return dict(state)


def load_visual_weights(visual: nn.Module, path: str | os.PathLike) -> str:
    """Load a weights file into ``visual`` (all tensors must match); returns the weights' sha256."""
    from .checkpoints import read_state_dict

    state = visual_state_dict(read_state_dict(path))
    expected = visual.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise OpenTransError(f"{len(missing)} tensor(s) of the tower missing, first {missing[0]!r}", path=path)
    for name, tensor in expected.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise OpenTransError(f"shape {tuple(state[name].shape)} != tower's {tuple(tensor.shape)}", path=path,
                                 tensor=name)
    visual.load_state_dict({k: state[k] for k in expected}, strict=True)
    return weights_sha256(visual)


def weights_sha256(weights: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """sha256 over sorted names, dtypes, shapes and bytes of a module's (or state dict's) tensors."""
    state = weights.state_dict() if isinstance(weights, nn.Module) else weights
    digest = hashlib.sha256(b"opentrans-hub/weights/v1\0")
    for name in sorted(state):
        tensor = state[name]
        if not isinstance(tensor, torch.Tensor):
            continue
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()
