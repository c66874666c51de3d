"""First-party plugins on real module structures.

Every framework model here is built from real parts (open_clip towers, torchvision's deeplabv3_resnet50,
timm's resnet50_clip models) under the attribute paths the frameworks use. The expected destination of
each canonical tensor never comes from the plugin under test: it comes from module identity (the
framework holds the very tower that was masked directly), from the framework's own converter (timm),
from construction records (detectron2 naming), or from forward equivalence (CAT-Seg's q/k/v split).
"""

from __future__ import annotations

import copy

import pytest
import torch
from support.artefacts import random_subnetwork
from support.layouts import Box, FeatureExtractor, RecWithAttnbiasHead, SplitAttention, place
from support.towers import make_tiny_resnet
from torch import nn

from opentrans_hub import OpenTransError, Subnetwork, apply_masks
from opentrans_hub.formats.selection import LayerSelection
from opentrans_hub.transfer.discovery import get_plugin

# ----------------------------------------------------------------------------- helpers


def nonzero_init(module: nn.Module, seed: int = 0) -> nn.Module:
    """Weights without exact zeros, so every zero after applying a mask comes from the mask."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_((torch.rand(p.shape, generator=gen) + 0.5) * torch.where(torch.rand(p.shape, generator=gen) < 0.5,
                                                                               -1.0, 1.0))
    return module


def masked_copy(tower: nn.Module, sub: Subnetwork) -> nn.Module:
    """The canonical tower with the subnetwork applied directly (identity names): the reference."""
    reference = copy.deepcopy(tower)
    apply_masks(reference, dict(sub.masks))
    return reference


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_state(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def weight_names(sub: Subnetwork, pattern: str) -> set[str]:
    import re

    return {name for name in sub.masks if re.search(pattern, name)}


# ----------------------------------------------------------------------------- towers (module scope: built once)
@pytest.fixture(scope="module")
def tiny_rn() -> nn.Module:
    return nonzero_init(make_tiny_resnet(seed=3))


@pytest.fixture(scope="module")
def rn50() -> nn.Module:
    from opentrans_hub.towers.backbones import build_visual

    torch.manual_seed(0)
    return nonzero_init(build_visual("open_clip/RN50"), seed=5)


@pytest.fixture(scope="module")
def tiny_convnext() -> nn.Module:
    from open_clip.timm_model import TimmModel

    torch.manual_seed(0)  # open_clip's ConvNeXt tower class (trunk.stages..., head.proj), smallest timm config
    return nonzero_init(TimmModel("convnext_atto", embed_dim=32, image_size=64, pool="avg", proj="linear"), seed=7)


@pytest.fixture(scope="module")
def tiny_vit() -> nn.Module:
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)  # ViT-B/16 layout (12 blocks, patch 16) at width 64
    vit = VisionTransformer(image_size=32, patch_size=16, width=64, layers=12, heads=2, mlp_ratio=2.0, output_dim=32)
    return nonzero_init(vit, seed=9).eval()


# ----------------------------------------------------------------------------- FC-CLIP
@pytest.mark.parametrize("tower_name,arch", [("tiny_rn", "open_clip/RN50"),
                                             ("tiny_convnext", "open_clip/convnext_large_d_320")])
def test_fcclip_lands_on_the_visual_tower_only(request, tower_name, arch):
    tower = request.getfixturevalue(tower_name)
    sub = random_subnetwork(tower, arch)
    model = place(Box(), "backbone.clip_model.visual", copy.deepcopy(tower))
    text = nonzero_init(nn.Linear(8, 8))  # the text tower beside it: must stay untouched
    place(model, "backbone.clip_model.transformer.resblocks.0.mlp.c_fc", text)
    text_before = snapshot(text)

    plugin = get_plugin("fcclip")
    assert plugin.locate_tower(model) is model.backbone.clip_model.visual
    report = plugin.apply(model, sub, strict=True)

    assert not report.unmapped and not report.dropped
    assert dict(report.mapped) == {n: f"backbone.clip_model.visual.{n}" for n in sub.masks}
    assert_same_state(snapshot(model.backbone.clip_model.visual), snapshot(masked_copy(tower, sub)))
    assert_same_state(snapshot(text), text_before)
    if tower_name == "tiny_convnext":  # ConvNeXt masks cover Linear (mlp.fc1/fc2) and depthwise convs
        assert any(".mlp.fc1.weight" in n for n in sub.masks) and any("conv_dw" in n for n in sub.masks)


# ----------------------------------------------------------------------------- Han et al. (hanovs)
def _han_model(tower: nn.Module, res_atten: bool) -> nn.Module:
    model = Box()
    backbone = copy.deepcopy(tower)
    if not res_atten:
        del backbone.attnpool  # CLIPResNetWithAttention deletes attnpool unless VISION_FEATURE is resAtten
    model.backbone = backbone
    model.vision_clip = copy.deepcopy(tower).requires_grad_(False)  # frozen KD copy: never a destination
    model.sem_seg_head = nonzero_init(nn.Conv2d(8, 4, 1))
    return model


@pytest.mark.parametrize("res_atten", [True, False])
def test_hanovs_never_touches_the_kd_copy(tiny_rn, res_atten):
    sub = random_subnetwork(tiny_rn, "open_clip/RN50")
    model = _han_model(tiny_rn, res_atten)
    kd_before, head_before = snapshot(model.vision_clip), snapshot(model.sem_seg_head)
    plugin = get_plugin("hanovs")
    assert plugin.locate_tower(model) is model.backbone

    if not res_atten:
        before = snapshot(model)
        with pytest.raises(OpenTransError, match="strict"):
            plugin.apply(model, sub, strict=True)
        assert_same_state(snapshot(model), before)  # nothing half-applied
    report = plugin.apply(model, sub)

    attnpool = weight_names(sub, r"^attnpool\.")
    assert attnpool  # the masks cover the attention pool's projections
    expected_unmapped = set() if res_atten else attnpool
    assert {s for s, _ in report.unmapped} == expected_unmapped
    assert dict(report.mapped) == {n: f"backbone.{n}" for n in sub.masks if n not in expected_unmapped}
    reference = snapshot(masked_copy(tiny_rn, sub))
    got = snapshot(model.backbone)
    assert_same_state(got, {k: v for k, v in reference.items() if k in got})
    assert_same_state(snapshot(model.vision_clip), kd_before)
    assert_same_state(snapshot(model.sem_seg_head), head_before)


# ----------------------------------------------------------------------------- DeepLabv3: OpenTrans, d2, torchvision
def test_opentrans_deeplab_drops_only_the_attention_pool(tiny_rn):
    sub = random_subnetwork(tiny_rn, "open_clip/RN50")
    backbone = copy.deepcopy(tiny_rn)
    del backbone.attnpool  # zs3 ResNet-50 with the CLIP stem: no attention pooling
    model = Box()
    model.backbone = backbone
    model.aspp = nonzero_init(nn.Conv2d(8, 8, 1))
    report = get_plugin("deeplabv3-opentrans").apply(model, sub, strict=True)
    assert {s for s, _ in report.dropped} == weight_names(sub, r"^attnpool\.")
    assert not report.unmapped
    reference = snapshot(masked_copy(tiny_rn, sub))
    got = snapshot(model.backbone)
    assert_same_state(got, {k: v for k, v in reference.items() if k in got})


def _conv_like(conv: nn.Conv2d) -> nn.Conv2d:
    return nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=False)


def _d2_deeplab(tower: nn.Module) -> tuple[nn.Module, dict[str, str]]:
    """A detectron2 DeepLab-project ResNet (deeplab stem, STEM_OUT_CHANNELS 64) with the tower's shapes.

    Conv layers carry their norm as ``.norm`` (detectron2's ``Conv2d(norm=...)``); stages are ``res2..res5``,
    the projection shortcut is ``shortcut``. Returns the model and, recorded while building it, which
    canonical weight each detectron2 weight corresponds to.
    """
    expected: dict[str, str] = {}
    model, backbone, stem = Box(), Box(), Box()
    model.backbone, backbone.stem = backbone, stem
    for k in (1, 2, 3):
        conv = _conv_like(getattr(tower, f"conv{k}"))
        conv.norm = nn.BatchNorm2d(conv.out_channels)
        setattr(stem, f"conv{k}", conv)
        expected[f"conv{k}.weight"] = f"backbone.stem.conv{k}.weight"
    for stage in (1, 2, 3, 4):
        blocks = nn.Sequential()
        for index, block in enumerate(getattr(tower, f"layer{stage}")):
            d2_block = Box()
            for k in (1, 2, 3):
                conv = _conv_like(getattr(block, f"conv{k}"))
                conv.norm = nn.BatchNorm2d(conv.out_channels)
                setattr(d2_block, f"conv{k}", conv)
                expected[f"layer{stage}.{index}.conv{k}.weight"] = f"backbone.res{stage + 1}.{index}.conv{k}.weight"
            if block.downsample is not None:
                shortcut = _conv_like(block.downsample[1])
                shortcut.norm = nn.BatchNorm2d(shortcut.out_channels)
                d2_block.shortcut = shortcut
                source = f"layer{stage}.{index}.downsample.0.weight"
                expected[source] = f"backbone.res{stage + 1}.{index}.shortcut.weight"
            blocks.append(d2_block)
        setattr(backbone, f"res{stage + 1}", blocks)
    model.sem_seg_head = nn.Conv2d(8, 4, 1)
    return nonzero_init(model), expected


def _assert_zero_pattern(model: nn.Module, before: dict[str, torch.Tensor], sub: Subnetwork,
                         expected: dict[str, str]) -> None:
    """Targets hold exactly (old weight where kept, 0 where pruned); every other tensor is untouched."""
    after = snapshot(model)
    targets = {dest: source for source, dest in expected.items()}
    for name, tensor in after.items():
        if name in targets:
            mask = sub.masks[targets[name]]
            assert torch.equal(tensor, before[name] * mask), name
            assert torch.equal(tensor == 0, ~mask), name
        else:
            assert torch.equal(tensor, before[name]), name


def test_d2_deeplab_renames_stages_norms_and_shortcuts(tiny_rn):
    sub = random_subnetwork(tiny_rn, "open_clip/RN50")
    model, expected = _d2_deeplab(tiny_rn)
    before = snapshot(model)
    plugin = get_plugin("deeplabv3-d2")
    report = plugin.apply(model, sub, strict=True)
    assert dict(report.mapped) == expected
    assert {s for s, _ in report.dropped} == weight_names(sub, r"^attnpool\.")
    assert not report.unmapped
    _assert_zero_pattern(model, before, sub, expected)
    # the norms map too: BN parameters of the canonical tower find their detectron2 names
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    _, full = plugin.name_map("open_clip/RN50").resolve(dict(tiny_rn.named_parameters()), shapes)
    assert not full.unmapped and not full.mismatched
    assert ("layer2.0.downsample.1.weight", "backbone.res3.0.shortcut.norm.weight") in full.mapped
    assert ("bn2.bias", "backbone.stem.conv2.norm.bias") in full.mapped


def test_torchvision_deeplab_reports_the_stem_unmapped(rn50):
    from torchvision.models.segmentation import deeplabv3_resnet50

    sub = random_subnetwork(rn50, "open_clip/RN50")
    torch.manual_seed(0)
    model = nonzero_init(deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=4), seed=11)
    before = snapshot(model)
    plugin = get_plugin("deeplabv3-torchvision")
    assert plugin.locate_tower(model) is model.backbone

    with pytest.raises(OpenTransError, match="strict"):
        plugin.apply(model, sub, strict=True)
    assert_same_state(snapshot(model), before)

    report = plugin.apply(model, sub)
    stem = {"conv1.weight", "conv2.weight", "conv3.weight"}
    assert {s for s, _ in report.unmapped} == stem  # conv1 exists in torchvision, as a 7x7 conv: not a counterpart
    assert {s for s, _ in report.dropped} == weight_names(sub, r"^attnpool\.")
    expected = {n: f"backbone.{n}" for n in sub.masks if n.startswith("layer")}
    assert dict(report.mapped) == expected
    _assert_zero_pattern(model, before, sub, expected)


# ----------------------------------------------------------------------------- timm CLIP ResNets
@pytest.mark.parametrize("variant", ["resnet50_clip.openai", "resnet50_clip_gap.openai"])
def test_timm_clip_resnet_matches_timms_own_converter(rn50, variant):
    import timm
    from timm.models.byobnet import checkpoint_filter_fn

    sub = random_subnetwork(rn50, "open_clip/RN50")
    model = timm.create_model(variant, pretrained=False)
    # load the canonical weights the way timm itself loads OpenAI CLIP checkpoints
    converted = checkpoint_filter_fn({f"visual.{k}": v for k, v in rn50.state_dict().items()}, model)
    model.load_state_dict(converted, strict=True)

    plugin = get_plugin("timm-clip-resnet")
    assert plugin.locate_tower(model) is model
    gap = "_gap" in variant
    if gap:
        with pytest.raises(OpenTransError, match="strict"):
            plugin.apply(model, sub, strict=True)
    report = plugin.apply(model, sub)

    assert {s for s, _ in report.unmapped} == (weight_names(sub, r"^attnpool\.") if gap else set())
    reference = checkpoint_filter_fn({f"visual.{k}": v for k, v in masked_copy(rn50, sub).state_dict().items()},
                                     model)
    assert_same_state(snapshot(model), reference)
    assert len(report.mapped) == len(sub.masks) - len(report.unmapped)


# ----------------------------------------------------------------------------- CAT-Seg (q/k/v split)
def test_catseg_split_masks_match_the_fused_tower(tiny_vit):
    sub = random_subnetwork(tiny_vit, "open_clip/ViT-B-16")
    assert weight_names(sub, r"attn\.in_proj_weight$")
    visual = copy.deepcopy(tiny_vit)
    for block in visual.transformer.resblocks:
        block.attn = SplitAttention(block.attn)
    model = place(Box(), "sem_seg_head.predictor.clip_model.visual", visual)
    before = snapshot(model)
    plugin = get_plugin("catseg")
    assert plugin.locate_tower(model) is visual
    report = plugin.apply(model, sub, strict=True)

    assert not report.unmapped and not report.dropped
    prefix = "sem_seg_head.predictor.clip_model.visual."
    for name in weight_names(sub, r"attn\.in_proj_weight$"):
        dests = [d for s, d in report.mapped if s == name]
        base = prefix + name[: -len("in_proj_weight")]
        assert dests == [base + "q_proj_weight", base + "k_proj_weight", base + "v_proj_weight"]
    reference = masked_copy(tiny_vit, sub)
    # every destination holds the masked canonical rows; the rest of the model is untouched
    after = snapshot(model)
    ref = snapshot(reference)
    for key, tensor in after.items():
        canonical = key[len(prefix):]
        if canonical.endswith(("q_proj_weight", "k_proj_weight", "v_proj_weight")):
            part = "qkv".index(canonical.split(".")[-1][0])
            fused = ref[canonical.rsplit(".", 1)[0] + ".in_proj_weight"]
            assert torch.equal(tensor, fused.chunk(3)[part]), key
        elif canonical in sub.masks:
            assert torch.equal(tensor, ref[canonical]), key
        else:
            assert torch.equal(tensor, before[key]), key
    # and the split tower computes what the masked fused tower computes
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(visual(images), reference(images), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- SAN (block-index offset)
def test_san_offsets_the_recognition_head_blocks(tiny_vit):
    sub = random_subnetwork(tiny_vit, "open_clip/ViT-B-16")
    shared = copy.deepcopy(tiny_vit)  # SAN holds the tower's modules themselves, split in two
    model = Box()
    model.clip_visual_extractor = FeatureExtractor(shared, 9)
    model.clip_rec_head = RecWithAttnbiasHead(shared, 9)
    model.side_adapter_network = nonzero_init(nn.Linear(8, 8))
    side_before = snapshot(model.side_adapter_network)
    plugin = get_plugin("san")
    report = plugin.apply(model, sub, strict=True)

    assert not report.unmapped and not report.dropped
    mapped = dict(report.mapped)
    assert mapped["transformer.resblocks.8.mlp.c_fc.weight"] == "clip_visual_extractor.resblocks.8.mlp.c_fc.weight"
    assert mapped["transformer.resblocks.9.mlp.c_fc.weight"] == "clip_rec_head.resblocks.0.mlp.c_fc.weight"
    assert mapped["transformer.resblocks.11.attn.in_proj_weight"] == "clip_rec_head.resblocks.2.attn.in_proj_weight"
    assert mapped["conv1.weight"] == "clip_visual_extractor.conv1.weight"
    # the shared tower now equals the canonical tower masked directly: each mask hit its own tensor
    assert_same_state(snapshot(shared), snapshot(masked_copy(tiny_vit, sub)))
    assert_same_state(snapshot(model.side_adapter_network), side_before)
    assert torch.equal(model.clip_rec_head.sos_token, torch.ones_like(model.clip_rec_head.sos_token))

    # run-time mode: the located tower reads like open_clip's, over the very same parameters
    view = plugin.locate_tower(model)
    assert dict(view.named_parameters()).keys() == dict(shared.named_parameters()).keys()
    assert all(a is b for (_, a), (_, b) in zip(sorted(view.named_parameters()), sorted(shared.named_parameters())))


# ----------------------------------------------------------------------------- layer selections
def _random_selection(sub: Subnetwork, seed: int = 4) -> LayerSelection:
    gen = torch.Generator().manual_seed(seed)
    layers = [{"name": n, "trainable": bool(torch.rand(1, generator=gen) < 0.5)} for n in sub.masks]
    return LayerSelection(layers, arch=sub.arch, policy={"name": "test"})


def test_selection_sets_requires_grad_within_the_tower(tiny_rn):
    sub = random_subnetwork(tiny_rn, "open_clip/RN50")
    selection = _random_selection(sub)
    flags = {layer["name"]: layer["trainable"] for layer in selection.layers}
    model, expected = _d2_deeplab(tiny_rn)
    report = get_plugin("deeplabv3-d2").apply_selection(model, selection)
    params = dict(model.named_parameters())
    for source, dest in expected.items():
        assert params[dest].requires_grad is flags[source], dest
    assert {s for s, _ in report.dropped} == weight_names(sub, r"^attnpool\.")
    for name, param in params.items():
        if name.startswith("backbone.") and ".norm." in name:
            assert not param.requires_grad, name  # the tower's norms freeze (the paper trains conv weights)
        elif not name.startswith("backbone."):
            assert param.requires_grad, name  # the decoder is outside the tower: untouched

    han = _han_model(tiny_rn, res_atten=False)
    han.vision_clip.requires_grad_(True)  # whatever its state, nothing may map onto the KD copy
    with pytest.raises(OpenTransError, match="strict"):
        get_plugin("hanovs").apply_selection(han, selection, strict=True)
    assert all(p.requires_grad for p in han.parameters())  # nothing half-applied
    get_plugin("hanovs").apply_selection(han, selection)
    assert all(p.requires_grad for p in han.vision_clip.parameters())
    assert all(p.requires_grad for p in han.sem_seg_head.parameters())
    han_params = dict(han.named_parameters())
    for name, trainable in flags.items():
        if not name.startswith("attnpool."):
            assert han_params[f"backbone.{name}"].requires_grad is trainable


def test_selection_on_a_split_tower_touches_only_selected_layers(tiny_vit):
    sub = random_subnetwork(tiny_vit, "open_clip/ViT-B-16")
    selection = _random_selection(sub, seed=8)
    shared = copy.deepcopy(tiny_vit)
    model = Box()
    model.clip_visual_extractor = FeatureExtractor(shared, 9)
    model.clip_rec_head = RecWithAttnbiasHead(shared, 9)
    model.side_adapter_network = nn.Linear(8, 8)
    get_plugin("san").apply_selection(model, selection, strict=True)
    canonical = dict(shared.named_parameters())
    for layer in selection.layers:
        assert canonical[layer["name"]].requires_grad is layer["trainable"], layer["name"]
    assert all(p.requires_grad for p in model.side_adapter_network.parameters())
    assert all(p.requires_grad for n, p in canonical.items() if ".ln_" in n or n.startswith("ln_"))
