"""Name-map inference on real module layouts: every built-in plugin's framework, other ecosystems, adversarial cases.

The expected pairs never come from the inference: they come from the hand-written first-party plugins (built-in
layouts), from how the layout was built (module identity, construction records, renames the test applies), from
a library's own converter (timm), or from forward equivalence (Hugging Face transformers). Towers are open_clip's
own classes at the real block structure (RN50 3-4-6-3, ViT-B/16 12 blocks) and reduced width
(``support.towers``); timm and torchvision layouts use the full RN50.
"""

from __future__ import annotations

import copy
import random
import re

import pytest
import torch
from support.layouts import (
    Box,
    FeatureExtractor,
    RecWithAttnbiasHead,
    SplitAttention,
    d2_layout,
    han_layout,
    place,
    resolved,
)
from support.towers import CONVNEXT_TINY, RN_TINY, VIT_TINY, finetuned, nonzero_init, register, tower
from torch import nn

from opentrans_hub import NameMap, OpenTransError, infer_name_map
from opentrans_hub.transfer.discovery import get_plugin
from opentrans_hub.transfer.inference import AmbiguousTowerError, canonical_state

register()
PLUGIN_ARCH = {RN_TINY: "open_clip/RN50", VIT_TINY: "open_clip/ViT-B-16",
               CONVNEXT_TINY: "open_clip/convnext_large_d_320"}


# ----------------------------------------------------------------------------- helpers
def infer(target, arch, **kwargs):
    name_map, report = infer_name_map(target, arch, **kwargs)
    assert NameMap.parse(str(name_map)) == name_map
    state = target.state_dict() if isinstance(target, nn.Module) else target
    got = resolved(name_map, arch, state)
    assert got == report.mapping  # the rules reproduce exactly the pairs the report shows
    return name_map, report, got


@pytest.fixture(scope="module")
def rn() -> nn.Module:
    return tower(RN_TINY, seed=3)


@pytest.fixture(scope="module")
def vit() -> nn.Module:
    return tower(VIT_TINY, seed=9)


@pytest.fixture(scope="module")
def convnext() -> nn.Module:
    return tower(CONVNEXT_TINY, seed=2)


@pytest.fixture(scope="module")
def rn50() -> nn.Module:
    from opentrans_hub.towers.backbones import build_visual

    torch.manual_seed(0)
    return nonzero_init(build_visual("open_clip/RN50"), seed=5)


# ----------------------------------------------------------------------------- built-in framework layouts
def catseg_layout(visual: nn.Module) -> nn.Module:
    visual = copy.deepcopy(visual)
    for block in visual.transformer.resblocks:
        block.attn = SplitAttention(block.attn)
    return place(Box(), "sem_seg_head.predictor.clip_model.visual", visual)


def san_layout(visual: nn.Module) -> nn.Module:
    shared = copy.deepcopy(visual)
    model = Box()
    model.clip_visual_extractor = FeatureExtractor(shared, 9)
    model.clip_rec_head = RecWithAttnbiasHead(shared, 9)
    model.side_adapter_network = nn.Linear(8, 8)
    return model


def fcclip_layout(visual: nn.Module) -> nn.Module:
    model = place(Box(), "backbone.clip_model.visual", copy.deepcopy(visual))
    place(model, "backbone.clip_model.transformer.resblocks.0.mlp.c_fc", nn.Linear(8, 8))
    return model


def deeplab_opentrans_layout(visual: nn.Module) -> nn.Module:
    model = Box()
    model.backbone = copy.deepcopy(visual)
    del model.backbone.attnpool
    model.aspp = nn.Conv2d(8, 8, 1)
    return model


BUILTIN = {  # plugin -> (layout builder, tower fixture, --tower)
    "fcclip": (fcclip_layout, "rn", None),
    "fcclip-convnext": (fcclip_layout, "convnext", None),
    "hanovs": (lambda v: han_layout(v, res_atten=False), "rn", "backbone."),
    "deeplabv3-opentrans": (deeplab_opentrans_layout, "rn", None),
    "deeplabv3-d2": (d2_layout, "rn", None),
    "catseg": (catseg_layout, "vit", None),
    "san": (san_layout, "vit", None),
}
HANDWRITTEN_RULES = {"fcclip": 1, "fcclip-convnext": 1, "hanovs": 2, "deeplabv3-opentrans": 2, "deeplabv3-d2": 7,
                     "catseg": 2, "san": 4}


@pytest.mark.parametrize("values", ["none", "frozen", "finetuned"])
@pytest.mark.parametrize("plugin_name", sorted(BUILTIN))
def test_builtin_layouts_infer_the_plugins_mapping(request, plugin_name, values):
    build, fixture, prefix = BUILTIN[plugin_name]
    visual = request.getfixturevalue(fixture)
    arch = {"rn": RN_TINY, "vit": VIT_TINY, "convnext": CONVNEXT_TINY}[fixture]
    model = build(visual if values != "finetuned" else finetuned(visual))
    weights = None if values == "none" else visual
    name_map, report, got = infer(model, arch, weights=weights, tower=prefix)
    plugin = get_plugin(plugin_name.split("-convnext")[0])
    expected = resolved(plugin.name_map(PLUGIN_ARCH[arch]), arch, model.state_dict())
    assert got == expected
    assert len(name_map.rules) <= HANDWRITTEN_RULES[plugin_name]
    if weights is not None:  # every weight matrix was confirmed by its values
        for source, info in report.tensors.items():
            if source.endswith("weight") and len(canonical_state(arch)[source].shape) >= 2:
                assert info.evidence[0].startswith("values: "), (source, info.evidence)
                assert "uncorrelated" not in info.evidence[0]


def test_hanovs_with_attention_pool_differs_only_by_the_plugins_deliberate_drop(rn):
    model = han_layout(rn, res_atten=True)
    _, report, got = infer(model, RN_TINY, tower="backbone.")
    expected = resolved(get_plugin("hanovs").name_map("open_clip/RN50"), RN_TINY, model.state_dict())
    # hanovs drops the positional embedding by design (resized for 512 px input); structurally it is there
    assert {k: v for k, v in got.items() if k != "attnpool.positional_embedding"} == expected
    assert got["attnpool.positional_embedding"] == ["backbone.attnpool.positional_embedding"]


@pytest.mark.parametrize("variant", ["resnet50_clip.openai", "resnet50_clip_gap.openai"])
def test_timm_clip_resnet_matches_the_plugin_and_timms_converter(rn50, variant):
    import timm
    from timm.models.byobnet import checkpoint_filter_fn

    model = timm.create_model(variant, pretrained=False)
    model.load_state_dict(checkpoint_filter_fn({f"visual.{k}": v for k, v in rn50.state_dict().items()}, model))
    for weights in (None, rn50):
        name_map, report, got = infer(model, "open_clip/RN50", weights=weights)
        assert got == resolved(get_plugin("timm-clip-resnet").name_map("open_clip/RN50"), "open_clip/RN50",
                               model.state_dict())
        assert len(name_map.rules) <= 13
    state = model.state_dict()
    for source, dests in got.items():  # timm's converter put exactly these values there
        assert torch.equal(state[dests[0]], rn50.state_dict()[source]), source
    if "gap" in variant:
        assert {s for s in report.unmapped if s.startswith("attnpool.")} == \
            {s for s in canonical_state("open_clip/RN50") if s.startswith("attnpool.")}


def test_torchvision_deeplab_leaves_the_namesake_stem_unmapped(rn50):
    from torchvision.models.segmentation import deeplabv3_resnet50

    torch.manual_seed(0)
    model = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=4)
    name_map, report, got = infer(model, "open_clip/RN50")
    assert got == resolved(get_plugin("deeplabv3-torchvision").name_map("open_clip/RN50"), "open_clip/RN50",
                           model.state_dict())
    assert "namesake" in report.unmapped["conv1.weight"] and "(64, 3, 7, 7)" in report.unmapped["conv1.weight"]
    assert any(rule.kind == "unmap" for rule in name_map.rules)


# ----------------------------------------------------------------------------- adversarial layouts
def test_kd_copy_is_refused_without_tower_and_right_with_it(rn):
    trained = finetuned(rn)
    model = han_layout(trained, res_atten=True, kd=rn)  # KD teacher: the untouched tower, frozen
    for weights in (None, rn):
        with pytest.raises(AmbiguousTowerError, match=r"--tower") as caught:
            infer_name_map(model, RN_TINY, weights=weights)
        towers = {c["tower"] for c in caught.value.candidates}
        assert towers == {"backbone.", "vision_clip."}
        assert "'backbone.'" in str(caught.value) and "'vision_clip.'" in str(caught.value)
        _, report, got = infer(model, RN_TINY, weights=weights, tower="backbone.")
        assert got == {name: [f"backbone.{name}"] for name in canonical_state(RN_TINY)}
        assert report.tower == "backbone."


def test_same_named_student_of_another_depth_is_not_the_tower(rn):
    from open_clip.modified_resnet import ModifiedResNet

    model = Box()
    model.student = ModifiedResNet(layers=(2, 2, 2, 2), output_dim=32, heads=2, image_size=64, width=16)
    model.backbone = copy.deepcopy(rn)  # same module names, the requested 3-4-6-3 structure
    _, report, got = infer(model, RN_TINY)
    assert got == {name: [f"backbone.{name}"] for name in canonical_state(RN_TINY)}
    assert not any(d.startswith("student.") for dests in got.values() for d in dests)


def test_a_decoder_with_blocks_of_the_same_shape_is_never_mapped(vit):
    from open_clip.transformer import Transformer

    model = fcclip_layout(vit)  # beside it: a 12-block transformer of the tower's very block shapes
    model.backbone.clip_model.transformer = Transformer(width=64, layers=12, heads=2, mlp_ratio=2.0)
    _, report, got = infer(model, VIT_TINY)
    assert got == {name: [f"backbone.clip_model.visual.{name}"] for name in canonical_state(VIT_TINY)}
    assert len(report.candidates) == 2  # both were considered; the text-like one has no stem


def test_shuffled_key_order_gives_the_same_mapping(rn):
    state = d2_layout(rn).state_dict()
    keys = list(state)
    random.Random(0).shuffle(keys)
    shuffled = {k: state[k] for k in keys}
    _, _, plain = infer(state, RN_TINY)
    _, _, got = infer(shuffled, RN_TINY)
    assert got == plain == resolved(get_plugin("deeplabv3-d2").name_map("open_clip/RN50"), RN_TINY, state)


_CIPHER = {"layer": "tier", "conv": "op", "bn": "st", "downsample": "jump", "attnpool": "gather",
           "q_proj": "qq", "k_proj": "kk", "v_proj": "vv", "c_proj": "out", "positional_embedding": "where"}


def _cipher(name: str) -> str:
    """Rename every word to one no vocabulary table lists (digits and structure stay)."""
    return ".".join(re.sub(r"^[a-z_]+", lambda m: _CIPHER.get(m.group(), m.group()), part)
                    for part in name.split("."))


def test_a_vocabulary_the_tables_do_not_list_maps_by_structure_alone(rn):
    state = {f"net.{_cipher(k)}": v for k, v in fcclip_layout(rn).backbone.clip_model.visual.state_dict().items()}
    assert "net.tier1.0.op1.weight" in state and "net.gather.qq.weight" in state
    _, report, got = infer(state, RN_TINY)
    assert got == {name: [f"net.{_cipher(name)}"] for name in canonical_state(RN_TINY)}


def test_square_projection_transpose_is_decided_by_values_or_reported(vit):
    import timm
    from timm.models.vision_transformer import _convert_openai_clip

    register()
    arch = "open_clip/ViT-B-16-oth-square"  # output_dim == width: proj is (64, 64)
    square = tower(arch, seed=4)
    assert tuple(square.proj.shape) == (64, 64)
    model = timm.create_model("vit_base_patch16_clip_224", pretrained=False, img_size=32, embed_dim=64, depth=12,
                              num_heads=2, mlp_ratio=2.0, num_classes=64)
    model.load_state_dict(_convert_openai_clip({f"visual.{k}": v for k, v in square.state_dict().items()}, model))
    _, report, got = infer(model, arch)
    assert "proj" not in got and "square" in report.unmapped["proj"] and "--weights" in report.unmapped["proj"]
    name_map, report, got = infer(model, arch, weights=square)
    assert got["proj"] == ["head.weight"] and report.tensors["proj"].transform == "transpose"
    dests, _ = name_map.resolve({"proj": square.proj.detach()}, {"head.weight": (64, 64)})
    assert torch.equal(dests["head.weight"], model.head.weight.detach())


# ----------------------------------------------------------------------------- ecosystems beyond the plugins
def test_timm_clip_vit_matches_timms_converter(vit):
    import timm
    from timm.models.vision_transformer import _convert_openai_clip

    model = timm.create_model("vit_base_patch16_clip_224", pretrained=False, img_size=32, embed_dim=64, depth=12,
                              num_heads=2, mlp_ratio=2.0, num_classes=48)
    model.load_state_dict(_convert_openai_clip({f"visual.{k}": v for k, v in vit.state_dict().items()}, model))
    state = model.state_dict()
    for weights in (None, vit):
        name_map, report, got = infer(model, VIT_TINY, weights=weights)
        assert len(got) == len(canonical_state(VIT_TINY))
        moved, _ = name_map.resolve(vit.state_dict(), {k: tuple(v.shape) for k, v in state.items()})
        assert moved.keys() == state.keys() - {"head.bias"}  # head.bias: timm's, zero, no CLIP counterpart
        for key, value in moved.items():  # timm's own converter put exactly these values there
            assert torch.equal(value, state[key]), key
    assert report.tensors["proj"].transform == "transpose"
    assert report.tensors["positional_embedding"].transform == "unsqueeze:0"


def test_hugging_face_clip_vision_model_computes_the_same_after_transfer(vit):
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=12,
                                           num_attention_heads=2, image_size=32, patch_size=16, hidden_act="gelu",
                                           projection_dim=48)
    model = transformers.CLIPVisionModelWithProjection(config).eval()
    name_map, report, got = infer(model, VIT_TINY)
    top = "vision_model." if any(k.startswith("vision_model.") for k in model.state_dict()) else ""
    assert report.tensors["transformer.resblocks.3.attn.in_proj_weight"].targets == [
        f"{top}encoder.layers.3.self_attn.{p}_proj.weight" for p in "qkv"]
    assert report.tensors["proj"].targets == ["visual_projection.weight"]
    assert report.tensors["proj"].transform == "transpose" and not report.unmapped
    target = model.state_dict()
    moved, mapping = name_map.resolve(vit.state_dict(), {k: tuple(v.shape) for k, v in target.items()})
    assert mapping.ok and set(moved) == {k for k in target if not k.endswith("position_ids")}
    model.load_state_dict(moved, strict=False)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # a wrong pair (or a missed transpose / q-k-v order) would change the function
        torch.testing.assert_close(model(pixel_values=images).image_embeds, vit(images), rtol=1e-4, atol=1e-5)
    # with the weights, values confirm every pair (the model now holds them)
    _, report, again = infer(model, VIT_TINY, weights=vit)
    assert again == got
    assert all(not t.evidence[0].startswith("values: uncorrelated") for t in report.tensors.values())


def _maskclip_name(name: str) -> str:
    """MaskCLIP / mmseg ResNet naming (ovs-backbones.md): stem.{0,1,3,4,6,7}, downsample.{K+1}."""
    stem = {"conv1": "stem.0", "bn1": "stem.1", "conv2": "stem.3", "bn2": "stem.4", "conv3": "stem.6",
            "bn3": "stem.7"}
    head, _, rest = name.partition(".")
    if head in stem:
        return f"backbone.{stem[head]}.{rest}"
    name = re.sub(r"\.downsample\.(\d+)\.", lambda m: f".downsample.{int(m.group(1)) + 1}.", name)
    return f"backbone.{name}"


def test_maskclip_mmseg_resnet_renames_and_its_head_holds_projections_as_1x1_convs(rn):
    state = {_maskclip_name(k): v for k, v in rn.state_dict().items() if not k.startswith("attnpool.")}
    state["decode_head.conv_seg.weight"] = torch.randn(4, 512, 1, 1)
    for part in ("v_proj", "c_proj"):  # MaskCLIP turns attention pooling's v and c projections into 1x1 convs
        state[f"decode_head.{part}.weight"] = getattr(rn.attnpool, part).weight.detach()[:, :, None, None]
        state[f"decode_head.{part}.bias"] = getattr(rn.attnpool, part).bias.detach()
    truth = {k: [_maskclip_name(k)] for k in canonical_state(RN_TINY) if not k.startswith("attnpool.")}
    heads = {f"attnpool.{p}.{leaf}": [f"decode_head.{p}.{leaf}"] for p in ("v_proj", "c_proj")
             for leaf in ("weight", "bias")}
    _, report, got = infer(state, RN_TINY)
    assert {k: v for k, v in got.items() if k not in heads} == truth
    assert all(got[k] == v for k, v in heads.items() if k in got)  # without values: right, or left unmapped
    name_map, report, with_values = infer(state, RN_TINY, weights=rn)
    assert with_values == {**truth, **heads}
    assert report.tensors["attnpool.v_proj.weight"].transform == "reshape:*,*,1,1"
    moved, _ = name_map.resolve({"attnpool.c_proj.weight": rn.attnpool.c_proj.weight.detach()},
                                {k: tuple(v.shape) for k, v in state.items()})
    assert torch.equal(moved["decode_head.c_proj.weight"], state["decode_head.c_proj.weight"])


_MMSEG_VIT = [(r"^transformer\.resblocks\.(\d+)\.ln_(\d)\.", r"backbone.layers.\1.ln\2."),
              (r"^transformer\.resblocks\.(\d+)\.attn\.", r"backbone.layers.\1.attn.attn."),
              (r"^transformer\.resblocks\.(\d+)\.mlp\.c_fc\.", r"backbone.layers.\1.ffn.layers.0.0."),
              (r"^transformer\.resblocks\.(\d+)\.mlp\.c_proj\.", r"backbone.layers.\1.ffn.layers.1."),
              (r"^conv1\.", "backbone.patch_embed.projection."), (r"^class_embedding$", "backbone.cls_token"),
              (r"^positional_embedding$", "backbone.pos_embed"), (r"^ln_pre\.", "backbone.pre_norm."),
              (r"^ln_post\.", "backbone.norm."), (r"^proj$", "decode_head.proj.weight")]


def test_maskclip_mmseg_vit_with_its_projection_as_a_1x1_conv_in_the_head(vit):
    """mmseg's ViT (mmcv FFN, wrapped attention), MaskCLIP's proj transposed into a 1x1 conv of the decode head."""
    def rename(name: str) -> str:
        for pattern, replacement in _MMSEG_VIT:
            name, hits = re.subn(pattern, replacement, name)
            if hits:
                break
        return name

    layout = {"class_embedding": lambda v: v.reshape(1, 1, -1), "positional_embedding": lambda v: v[None],
              "proj": lambda v: v.t()[:, :, None, None]}
    state = {rename(k): layout.get(k, lambda v: v)(v) for k, v in vit.state_dict().items()}
    state["decode_head.conv_seg.weight"] = torch.randn(4, 48, 1, 1)
    truth = {k: [rename(k)] for k in canonical_state(VIT_TINY)}
    _, report, got = infer(state, VIT_TINY)
    assert got == {k: v for k, v in truth.items() if k != "proj"}
    assert "proj" in report.unmapped  # outside the tower's module, and nothing but values could tell
    name_map, report, got = infer(state, VIT_TINY, weights=vit)
    assert got == truth and report.tensors["proj"].transform.startswith("transpose+")
    assert report.tower == "backbone."  # the tower's own prefix, although proj sits in the head
    moved, _ = name_map.resolve({"proj": vit.proj.detach()}, {"decode_head.proj.weight": (48, 64, 1, 1)})
    assert torch.equal(moved["decode_head.proj.weight"], state["decode_head.proj.weight"])


# ----------------------------------------------------------------------------- refusals
def test_nothing_of_the_structure_is_an_error(vit):
    with pytest.raises(OpenTransError, match="no part of the target has the block structure"):
        infer_name_map(vit, RN_TINY)
    with pytest.raises(OpenTransError, match="no tensor of the target starts with"):
        infer_name_map(vit, VIT_TINY, tower="backbone.")


# ----------------------------------------------------------------------------- the auto plugin
def _random_subnetwork(visual: nn.Module, arch: str):
    from opentrans_hub import Subnetwork

    gen = torch.Generator().manual_seed(2)
    masks = {n: torch.rand(p.shape, generator=gen) < 0.5 for n, p in visual.named_parameters()
             if n.endswith("weight") and p.dim() >= 2}
    return Subnetwork(masks, arch=arch)


def test_auto_plugin_schedule_and_detectron2_config_infer_at_run_time(rn, caplog):
    import logging

    from yacs.config import CfgNode

    from opentrans_hub import OpenTransSchedule
    from opentrans_hub.integrations.detectron2 import add_opentrans_config, name_map_from_cfg, tower_prefix_from_cfg

    sub = _random_subnetwork(rn, RN_TINY)
    model = d2_layout(rn)
    plugin = get_plugin("auto")
    with caplog.at_level(logging.INFO, logger="opentrans_hub"):
        report = plugin.apply(model, sub, strict=False)
    assert "plugin 'auto'" in caplog.text and "prefix backbone." in caplog.text  # the rules used are logged
    weights = dict(model.named_parameters())
    expected = resolved(get_plugin("deeplabv3-d2").name_map("open_clip/RN50"), RN_TINY, model.state_dict())
    assert dict(report.mapped) == {s: d[0] for s, d in expected.items() if s in sub.masks}
    for source, dest in report.mapped:
        assert torch.equal(weights[dest] == 0, ~sub.masks[source]), dest
    with pytest.raises(OpenTransError, match="no fixed rules"):
        plugin.name_map(RN_TINY)

    logged: list[str] = []
    schedule = OpenTransSchedule(d2_layout(rn), subnetwork=sub, name_map="auto", log=logged.append)
    schedule.before_train()
    assert len(schedule.report.mapped) == len(report.mapped) and "res{g1+1}" in logged[0]

    cfg = CfgNode()
    cfg.MODEL = CfgNode()
    add_opentrans_config(cfg)
    cfg.MODEL.OPENTRANS.PLUGIN = "auto"
    cfg.MODEL.OPENTRANS.ARCH = RN_TINY
    assert name_map_from_cfg(cfg, model) == plugin.map_for(RN_TINY, model)
    assert tower_prefix_from_cfg(cfg, model) == "backbone."
    with pytest.raises(OpenTransError, match="pass the model"):
        name_map_from_cfg(cfg)
    # an ambiguous model is refused at run time too, naming --tower
    with pytest.raises(AmbiguousTowerError):
        get_plugin("auto").apply(han_layout(rn, res_atten=True), sub)


def test_a_split_tower_keeps_its_order_in_a_shuffled_file(vit):
    state = san_layout(vit).state_dict()
    keys = sorted(state, reverse=True)  # clip_visual_extractor after clip_rec_head, blocks 9..0
    shuffled = {k: state[k] for k in keys}
    expected = resolved(get_plugin("san").name_map("open_clip/ViT-B-16"), VIT_TINY, state)
    _, report, got = infer(shuffled, VIT_TINY)
    assert got == expected
    assert "image stem" in report.tensors["transformer.resblocks.10.attn.in_proj_weight"].evidence[-1]


def _d2_imagenet_name(name: str) -> str:
    """detectron2's ResNet names (tools/convert-torchvision-to-d2.py) under FPN's ``backbone.bottom_up.``."""
    name = re.sub(r"^conv1\.", "stem.conv1.", name)
    name = re.sub(r"^bn1\.", "stem.conv1.norm.", name)
    name = re.sub(r"^layer(\d)\.", lambda m: f"res{int(m.group(1)) + 1}.", name)
    name = re.sub(r"\.bn(\d)\.", r".conv\1.norm.", name)
    return "backbone.bottom_up." + name.replace(".downsample.0.", ".shortcut.").replace(".downsample.1.",
                                                                                      ".shortcut.norm.")


def test_detectron2_imagenet_resnet_maps_blocks_and_no_part_of_its_7x7_stem():
    """A 64-channel norm after a 7x7 conv is not CLIP's bn3, although the shapes agree (FrozenBN, no counters)."""
    import torchvision

    torch.manual_seed(0)
    resnet = torchvision.models.resnet50(weights=None)
    state = {_d2_imagenet_name(k): v for k, v in resnet.state_dict().items()
             if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    state["proposal_generator.rpn_head.conv.weight"] = torch.zeros(256, 256, 3, 3)
    name_map, report, got = infer(state, "open_clip/RN50")
    expected = {k: [_d2_imagenet_name(k)] for k in canonical_state("open_clip/RN50")
                if k.startswith("layer") and not k.endswith("num_batches_tracked")}
    assert got == expected
    assert "has no counterpart" in report.unmapped["bn3.weight"]
    assert len(name_map.rules) <= 5


def test_blocks_renumbered_in_one_list_get_one_guarded_rule_per_stage(rn):
    state, truth, index = {}, {}, 0
    for stage in range(1, 5):  # a framework that keeps the 16 bottlenecks in one ModuleList
        for position, block in enumerate(getattr(rn, f"layer{stage}")):
            for key, value in block.state_dict().items():
                state[f"body.blocks.{index}.{key}"] = value
                truth[f"layer{stage}.{position}.{key}"] = [f"body.blocks.{index}.{key}"]
            index += 1
    for key, value in rn.state_dict().items():
        if not key.startswith("layer"):
            state[f"body.{key}"], truth[key] = value, [f"body.{key}"]
    name_map, _, got = infer(state, RN_TINY)
    assert got == truth
    assert "rename ^layer(\\d+)\\.(\\d+)\\. -> blocks.{g2+7}. if g1 == 3" in str(name_map).splitlines()
    assert len(name_map.rules) == 5


def test_blocks_with_adapters_inside_still_fit_and_adapters_stay_unmapped(vit):
    model = fcclip_layout(vit)
    for block in model.backbone.clip_model.visual.transformer.resblocks:  # a few percent more per block
        block.adapter = nn.Sequential(nn.Linear(64, 8), nn.Linear(8, 64))
    _, report, got = infer(model, VIT_TINY)
    assert got == {name: [f"backbone.clip_model.visual.{name}"] for name in canonical_state(VIT_TINY)}
    assert not any(".adapter." in d for dests in got.values() for d in dests)


def test_weights_that_are_not_the_towers_start_are_reported(rn):
    other = tower(RN_TINY, seed=11)  # same architecture, unrelated values
    _, report, got = infer(d2_layout(rn), RN_TINY, weights=other)
    assert got == resolved(get_plugin("deeplabv3-d2").name_map("open_clip/RN50"), RN_TINY, d2_layout(rn).state_dict())
    assert any("do not look like this tower's start" in note for note in report.notes)
    assert not infer(d2_layout(rn), RN_TINY, weights=rn)[1].notes


def test_reshape_rule_round_trips_and_refuses_bad_specs():
    name_map = NameMap.parse("reshape ^proj$ *,*,1,1 -> head.weight\nreshape ^cls$ 1,1,-1\nunsqueeze ^pos$ 0")
    assert NameMap.parse(str(name_map)) == name_map
    mask = torch.rand(6, 4) < 0.5
    [(dest, moved)] = name_map.map("proj", mask)
    assert dest == "head.weight" and moved.shape == (6, 4, 1, 1) and torch.equal(moved[:, :, 0, 0], mask)
    assert name_map.map("cls", torch.zeros(5))[0][1].shape == (1, 1, 5)
    for bad in ("reshape ^a$ 2,-1,-1", "reshape ^a$ x,1", "split ^a$ *,1 -> b, c", "reshape ^a$ 1 -> b, c"):
        with pytest.raises(OpenTransError):
            NameMap.parse(bad)
    with pytest.raises(OpenTransError, match="cannot reshape"):
        NameMap.parse("reshape ^a$ 7,-1").map("a", torch.zeros(4, 4))
    with pytest.raises(OpenTransError, match="past the last dimension"):
        NameMap.parse("reshape ^a$ *,*,*").map("a", torch.zeros(4, 4))
