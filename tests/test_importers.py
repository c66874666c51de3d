"""Importing masks from the research code (requirement 3): real torch.nn.utils.prune on real open_clip towers,
saved with torch.save in the layouts OpenTrans, detectron2 and DDP leave behind."""

from __future__ import annotations

import builtins

import pytest
import torch
from safetensors.torch import save_file
from support.towers import make_tiny_resnet
from torch import nn
from torch.nn.utils import prune

from opentrans_hub import (
    NameMap,
    OpenTransError,
    Subnetwork,
    apply_subnetwork,
    from_torch_prune,
    from_zeros,
    import_pruned_checkpoint,
)
from opentrans_hub.io.checkpoints import read_state_dict
from opentrans_hub.methods.importers import from_pruned_state_dict

PREFIX = "backbone.clip_model.visual."


def convs_after_first(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)][1:]


def torch_pruned(model: nn.Module, amount: float = 0.89) -> dict[str, torch.Tensor]:
    """Prune like OpenTrans (L1, every conv but the first) with torch.nn.utils.prune; return its keep-masks."""
    for _, conv in convs_after_first(model):
        prune.l1_unstructured(conv, "weight", amount=amount)
    return {f"{n}.weight": conv.weight_mask.bool().clone() for n, conv in convs_after_first(model)}


class FrameworkModel(nn.Module):
    """An OVS-like model: the CLIP tower deep inside (``backbone.clip_model.visual``) next to a head."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.clip_model = nn.Module()
        self.backbone.clip_model.visual = visual
        self.sem_seg_head = nn.Conv2d(8, 4, 1)


def make_pruned_tiny() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A fresh torch-pruned tiny tower (torch.prune'd modules cannot be deep-copied: build another)."""
    model = make_tiny_resnet()
    return model, torch_pruned(model)


@pytest.fixture(scope="module")
def pruned_tiny():
    return make_pruned_tiny()


def assert_same_masks(sub: Subnetwork, masks: dict[str, torch.Tensor]) -> None:
    assert sorted(sub) == sorted(masks)
    for name, keep in masks.items():
        assert sub[name].dtype == torch.bool and torch.equal(sub[name], keep), name


def test_flat_state_dict_pth(tmp_path, pruned_tiny):
    model, masks = pruned_tiny
    state = model.state_dict()
    assert any(k.endswith("weight_orig") for k in state) and any(k.endswith("weight_mask") for k in state)
    torch.save(state, tmp_path / "flat.pth")
    sub = import_pruned_checkpoint(tmp_path / "flat.pth", arch="open_clip/tiny")
    assert_same_masks(sub, masks)
    assert sub.arch == "open_clip/tiny"
    assert sub.provenance["method"] == "import" and sub.provenance["settings"]["source"] == "flat.pth"


def test_opentrans_backbone_layout(tmp_path, pruned_tiny):
    model, masks = pruned_tiny
    # OpenTrans: pruned_mask/seg_backbone_impN.pth holds {'backbone': <tower state dict>, ...}
    torch.save({"backbone": model.state_dict(), "round": 21, "sparsity": 0.89}, tmp_path / "seg_backbone_imp21.pth")
    assert_same_masks(import_pruned_checkpoint(tmp_path / "seg_backbone_imp21.pth"), masks)


def test_detectron2_ddp_layout_with_prefix(tmp_path, pruned_tiny):
    model, masks = make_pruned_tiny()
    framework = FrameworkModel(model)
    prune.l1_unstructured(framework.sem_seg_head, "weight", amount=0.5)  # a pruned layer outside the tower
    ddp_state = {f"module.{k}": v for k, v in framework.state_dict().items()}
    torch.save({"model": ddp_state, "iteration": 5000, "scheduler": {"last_epoch": 3}}, tmp_path / "model_0005000.pth")
    sub = import_pruned_checkpoint(tmp_path / "model_0005000.pth", arch="open_clip/tiny", prefix=PREFIX)
    assert_same_masks(sub, masks)  # the head's mask is outside the prefix: left out
    with pytest.raises(OpenTransError, match="none under the prefix") as info:
        import_pruned_checkpoint(tmp_path / "model_0005000.pth", prefix="backbone.nothing.")
    assert "model_0005000.pth" in str(info.value)


def test_other_mask_buffers_and_masks_only_files(pruned_tiny):
    model, masks = pruned_tiny
    state = dict(model.state_dict())
    state["attnpool.attn_mask"] = torch.full((4, 4), float("-inf"))  # not a prune mask: no attn_orig partner
    assert_same_masks(from_pruned_state_dict(state, source="x.pth"), masks)
    # OpenTrans's extract_mask output: only the *_mask entries, no *_orig
    only_masks = {k: v for k, v in model.state_dict().items() if k.endswith("_mask")}
    assert_same_masks(from_pruned_state_dict(only_masks, source="m.pth"), masks)


def test_safetensors_checkpoint(tmp_path, pruned_tiny):
    model, masks = pruned_tiny
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "pruned.safetensors")
    assert_same_masks(import_pruned_checkpoint(tmp_path / "pruned.safetensors"), masks)


def test_live_module_pruned_with_torch_prune(pruned_tiny):
    model, masks = pruned_tiny
    assert_same_masks(from_torch_prune(model, arch="open_clip/tiny"), masks)
    framework = FrameworkModel(make_pruned_tiny()[0])
    prune.l1_unstructured(framework.sem_seg_head, "weight", amount=0.5)
    assert_same_masks(from_torch_prune(framework, prefix=PREFIX), masks)
    with pytest.raises(OpenTransError, match="no torch.nn.utils.prune masks"):
        from_torch_prune(make_tiny_resnet())


def test_module_whose_pruned_weights_are_zeros(tmp_path, pruned_tiny):
    baked, masks = make_pruned_tiny()
    for _, conv in convs_after_first(baked):
        prune.remove(conv, "weight")  # OpenTrans's "remove prune and save": plain weights holding zeros
    assert not any(n.endswith("_mask") for n, _ in baked.named_buffers())
    assert_same_masks(from_zeros(baked, arch="open_clip/tiny"), masks)  # the unpruned first conv has no zeros
    # the same from a saved detectron2-style checkpoint, through read_state_dict (un-nesting, module.)
    framework = FrameworkModel(baked)
    torch.save({"model": {f"module.{k}": v for k, v in framework.state_dict().items()}}, tmp_path / "baked.pth")
    state = read_state_dict(tmp_path / "baked.pth")
    assert_same_masks(from_zeros(state, prefix=PREFIX), masks)
    only_layer1 = from_zeros(state, prefix=PREFIX, include=r"^layer1\.")
    assert sorted(only_layer1) == sorted(n for n in masks if n.startswith("layer1."))
    with pytest.raises(OpenTransError, match="no weight with exact zeros"):
        from_zeros(make_tiny_resnet())


def test_rn50_torch_prune_round_trip_onto_a_fresh_tower(tmp_path, rn50_visual):
    """The paper's setting end to end: torch.prune RN50 at 89 %, save as OpenTrans does, import, re-apply."""
    pruned = rn50_visual
    dense = {k: v.clone() for k, v in pruned.state_dict().items()}
    masks = torch_pruned(pruned)
    assert len(masks) == 54
    torch.save({"backbone": pruned.state_dict()}, tmp_path / "seg_backbone_imp21.pth")
    sub = import_pruned_checkpoint(tmp_path / "seg_backbone_imp21.pth", arch="open_clip/RN50")
    assert_same_masks(sub, masks)
    assert sub.sparsity == pytest.approx(0.89, abs=1e-3) and sub.numel == 23_473_152
    # re-applied onto an unpruned tower holding the same base weights, ours equals torch.prune's weights
    theirs = {f"{name}.weight": conv.weight.detach().clone() for name, conv in convs_after_first(pruned)}
    for _, conv in convs_after_first(pruned):
        prune.remove(conv, "weight")
    pruned.load_state_dict(dense)  # the dense base weights again, plain module
    assert bool((pruned.layer1[0].conv1.weight != 0).all())
    framework = FrameworkModel(pruned)
    apply_subnetwork(framework, sub, NameMap.prefix(PREFIX), strict=True)
    ours = dict(framework.named_parameters())
    for name, weight in theirs.items():
        assert torch.equal(ours[PREFIX + name].detach(), weight), name


class NotWeightsOnly:
    """Pickles into a call of builtins.open: exactly what weights_only loading must never run."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def test_unsafe_pickle_is_refused_and_never_executed(tmp_path, pruned_tiny):
    model, _ = pruned_tiny
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"backbone": model.state_dict(), "hook": NotWeightsOnly(str(marker))}, path)
    with pytest.raises(OpenTransError, match="weights-only") as info:
        import_pruned_checkpoint(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()
    # a whole pickled module (torch.save(model)) is refused the same way
    torch.save(model, tmp_path / "module.pth")
    with pytest.raises(OpenTransError, match="weights-only"):
        import_pruned_checkpoint(tmp_path / "module.pth")


def test_bad_checkpoints(tmp_path, pruned_tiny):
    model, masks = pruned_tiny
    with pytest.raises(OpenTransError, match="no such file"):
        import_pruned_checkpoint(tmp_path / "missing.pth")
    (tmp_path / "garbage.pth").write_bytes(b"\x80\x04not a pickle at all")
    with pytest.raises(OpenTransError, match="garbage.pth"):
        import_pruned_checkpoint(tmp_path / "garbage.pth")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    with pytest.raises(OpenTransError, match="garbage.safetensors"):
        import_pruned_checkpoint(tmp_path / "garbage.safetensors")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(OpenTransError, match="expected a dict"):
        import_pruned_checkpoint(tmp_path / "list.pth")
    torch.save({"meta": {"lr": 0.1}}, tmp_path / "empty.pth")
    with pytest.raises(OpenTransError, match="no tensors found"):
        import_pruned_checkpoint(tmp_path / "empty.pth")
    torch.save(make_tiny_resnet().state_dict(), tmp_path / "dense.pth")
    with pytest.raises(OpenTransError, match="--from-zeros"):
        import_pruned_checkpoint(tmp_path / "dense.pth")
    state = dict(model.state_dict())
    key = next(k for k in state if k.endswith("weight_mask"))
    state[key] = state[key] * 0.5
    with pytest.raises(OpenTransError, match="other than 0 and 1") as info:
        from_pruned_state_dict(state, source="x.pth")
    assert info.value.tensor == key
    state = dict(model.state_dict())
    state[key] = state[key][:1]
    with pytest.raises(OpenTransError, match="shape") as info:
        from_pruned_state_dict(state, source="x.pth")
    assert info.value.tensor == key
