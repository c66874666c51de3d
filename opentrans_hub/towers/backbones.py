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

from ..errors import OpenTransError
from .timm_names import TIMM_CLIP_RESNET_RULES  # noqa: F401  (re-exported: it lived here)
from .timm_names import TIMM_CLIP_RESNETS as _TIMM_CLIP_RESNETS

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


def open_clip_visual(name: str, pretrained: str | None = None, device: str = "cpu") -> nn.Module:
    """open_clip's visual tower ``name``; random init unless ``pretrained`` names a tag.

    ``device="meta"`` gives the names and shapes without allocating weights. A random init asked for on
    purpose is not warned about (open_clip logs that no pretrained weights were loaded).
    """
    import logging

    import open_clip

    if name not in open_clip.list_models():
        raise OpenTransError(f"open_clip has no model {name!r} (see open_clip.list_models())")
    previous = logging.root.manager.disable
    if not pretrained:
        logging.disable(logging.WARNING)
    try:
        model = open_clip.create_model(name, pretrained=pretrained or None, device=device)
    except RuntimeError as exc:  # unknown tag, or weights that cannot be fetched here
        raise OpenTransError(f"cannot load open_clip {name} weights {pretrained!r}: {exc}") from None
    finally:
        logging.disable(previous)
    return model.visual


BUILDERS["open_clip"] = open_clip_visual

_CANONICAL_TOWERS: dict[str, nn.Module] = {}


def canonical_tower(arch: str) -> nn.Module:
    """The tower of ``arch`` on the meta device (names and shapes, no weights), built once per process."""
    if arch not in _CANONICAL_TOWERS:
        family, name = parse_arch(arch)
        if family != "open_clip":
            raise OpenTransError(f"canonical names are known for open_clip architectures only, not {arch!r}")
        _CANONICAL_TOWERS[arch] = open_clip_visual(name, device="meta")
    return _CANONICAL_TOWERS[arch]


def canonical_shapes(arch: str) -> dict[str, torch.Tensor]:
    """Canonical parameter name -> a meta tensor of its shape, for the tower of ``arch`` (no weights)."""
    return dict(canonical_tower(arch).named_parameters())


def check_canonical_scope(selected: Mapping[str, tuple[str, torch.Tensor]], arch: str, prefix: str) -> None:
    """Refuse a prune scope whose canonical names or shapes are not those of ``arch``'s tower.

    A prefix that does not point at the tower (``backbone.`` on a model holding it at
    ``backbone.clip_model.visual.``) would write rounds named ``clip_model.visual.conv2.weight`` under
    ``open_clip/RN50``. Checked for open_clip architectures (their canonical tower is built on the meta
    device); other families and ``"unknown"`` have no canonical tower to compare with.
    """
    if arch == "unknown" or parse_arch(arch)[0] != "open_clip":
        return
    canonical = canonical_shapes(arch)
    for name, (full, param) in selected.items():
        expected = canonical.get(name)
        if expected is None:
            fits = [c for c in canonical if full.endswith("." + c)]
            hint = f"; the tower seems to sit at prefix {full[:-len(max(fits, key=len))]!r}" if fits else ""
            raise OpenTransError(f"IMP prefix {prefix!r} does not point at the {arch} tower: {full!r} would be "
                                 f"saved as {name!r}, which is not a canonical {arch} name{hint}")
        if tuple(expected.shape) != tuple(param.shape):
            raise OpenTransError(f"IMP prefix {prefix!r}: {full!r} has shape {tuple(param.shape)} but {arch}'s "
                                 f"{name!r} is {tuple(expected.shape)}: the tower there is not {arch}")


def timm_to_canonical(state: Mapping[str, torch.Tensor], canonical_names) -> dict[str, torch.Tensor]:
    """Rename a timm CLIP-ResNet state dict to open_clip's names (every canonical name must be found)."""
    from ..naming.namemap import NameMap

    name_map = NameMap.parse(TIMM_CLIP_RESNET_RULES)
    out = {}
    for name in canonical_names:
        dest = name_map.map_name(name)
        if isinstance(dest, str) or len(dest) != 1 or dest[0] not in state:
            raise OpenTransError(f"timm weights have no counterpart {dest!r}", tensor=name)
        out[name] = state[dest[0]]
    return out


def _timm_clip_visual(name: str, pretrained: str | None) -> nn.Module:
    """``timm/resnet50_clip[.TAG]``: the tower rebuilt as open_clip's ModifiedResNet holding timm's tensors."""
    import timm

    base, _, tag = name.partition(".")
    tag = pretrained or tag or None
    if base.endswith("_gap") and base[:-4] in _TIMM_CLIP_RESNETS:
        raise OpenTransError(f"timm/{base} has no attention-pool head; use timm/{base[:-4]} (same trunk)")
    if base not in _TIMM_CLIP_RESNETS:
        raise OpenTransError(f"timm/{base} is not a supported CLIP ResNet; known: {', '.join(_TIMM_CLIP_RESNETS)}")
    try:
        model = timm.create_model(f"{base}.{tag}" if tag else base, pretrained=bool(tag))
    except Exception as exc:  # unknown tag, or weights that cannot be fetched here
        raise OpenTransError(f"cannot build timm {base} with weights {tag!r}: {exc}") from None
    visual = open_clip_visual(_TIMM_CLIP_RESNETS[base])
    expected = visual.state_dict()
    state = timm_to_canonical(model.state_dict(), expected)
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise OpenTransError(f"timm shape {tuple(tensor.shape)} != tower's {tuple(expected[key].shape)}",
                                 tensor=key)
    visual.load_state_dict(state, strict=True)
    return visual


BUILDERS["timm"] = _timm_clip_visual


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
    """Load a weights file into ``visual`` (all tensors must match); returns the weights' sha256.

    The file may hold the tower alone, a whole CLIP (``visual.``), a timm CLIP-ResNet, or a framework
    checkpoint holding the tower under one prefix; packed sparse files are read dense (with their zeros).
    """
    from ..io.checkpoints import read_state_dict

    state = visual_state_dict(read_state_dict(path))
    if "stem.conv1.conv.weight" in state and "conv1.weight" not in state:  # a timm CLIP-ResNet file
        state = timm_to_canonical(state, visual.state_dict())
    expected = visual.state_dict()
    if not set(expected) <= set(state):  # a framework checkpoint: the tower under one prefix
        from ..io.checkpoints import find_prefixes

        prefixes = find_prefixes(state, expected)
        if len(prefixes) > 1:
            raise OpenTransError(f"the file holds the tower {len(prefixes)} times (under {', '.join(prefixes[:3])}); "
                                 "extract the one you mean", path=path)
        if len(prefixes) == 1:
            state = {k[len(prefixes[0]):]: v for k, v in state.items() if k.startswith(prefixes[0])}
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
