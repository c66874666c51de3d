"""NameMap (requirement 4): rules against real modules whose parameter names differ from open_clip's."""

from __future__ import annotations

import pytest
import torch
from support.sparsity import conv_masks
from support.towers import make_tiny_resnet
from torch import nn

from opentrans_hub import MappingReport, NameMap, OpenTransError, Rule, Subnetwork, apply_subnetwork, masked_parameters
from opentrans_hub.naming.namemap import Unmapped

# detectron2 DeepLab ResNet names (ovs-backbones.md): 3-conv stem, layerN.i -> res{N+1}.i, downsample.0 -> shortcut
D2_DEEPLAB = """
# open_clip RN -> detectron2 DeepLab ResNet
drop ^attnpool\\.
rename ^conv(\\d)\\. -> stem.conv{g1}.
rename ^bn(\\d)\\. -> stem.conv{g1}.norm.
rename ^layer(\\d)\\. -> res{g1+1}.     # index arithmetic
rename \\.downsample\\.0\\. -> .shortcut.
rename \\.downsample\\.1\\. -> .shortcut.norm.
rename \\.bn(\\d)\\. -> .conv{g1}.norm.
prefix backbone.
"""


class D2Conv(nn.Conv2d):
    """detectron2-style conv: the norm lives inside the conv (``conv1.norm``)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                         bias=conv.bias is not None)
        with torch.no_grad():
            self.weight.copy_(conv.weight)
        self.norm = nn.BatchNorm2d(conv.out_channels)


class D2Block(nn.Module):
    def __init__(self, block: nn.Module):
        super().__init__()
        if block.downsample is not None:  # registered first on purpose: order must not matter
            # by name: open_clip's downsample is Sequential("-1": AvgPool2d, "0": Conv2d, "1": BN), so
            # downsample[0] (by position) is the pool -- the integer-index trap names avoid
            self.shortcut = D2Conv(block.downsample.get_submodule("0"))
        self.conv3 = D2Conv(block.conv3)
        self.conv2 = D2Conv(block.conv2)
        self.conv1 = D2Conv(block.conv1)


class D2ResNet(nn.Module):
    """A real module carrying detectron2 DeepLab ResNet parameter names, weights copied from an open_clip tower."""

    def __init__(self, tower: nn.Module):
        super().__init__()
        for n in (5, 4, 3, 2):  # reverse registration order: anything index-based would pair the wrong layers
            setattr(self, f"res{n}", nn.Sequential(*[D2Block(b) for b in getattr(tower, f"layer{n - 1}")]))
        self.stem = nn.Module()
        for i in (1, 2, 3):
            setattr(self.stem, f"conv{i}", D2Conv(getattr(tower, f"conv{i}")))


class Holder(nn.Module):
    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone


@pytest.fixture(scope="module")
def tower() -> nn.Module:
    return make_tiny_resnet()


def test_detectron2_deeplab_renames_on_a_real_module(tower):
    name_map = NameMap.parse(D2_DEEPLAB)
    assert name_map.map_name("layer1.0.conv1.weight") == ["backbone.res2.0.conv1.weight"]
    assert name_map.map_name("layer4.0.downsample.0.weight") == ["backbone.res5.0.shortcut.weight"]
    assert name_map.map_name("layer3.0.bn2.weight") == ["backbone.res4.0.conv2.norm.weight"]
    assert name_map.map_name("conv3.weight") == ["backbone.stem.conv3.weight"]
    assert name_map.map_name("attnpool.q_proj.weight").startswith("dropped by rule")

    target = Holder(D2ResNet(tower))
    masks = conv_masks(tower, 0.7, first=True)
    masks["attnpool.q_proj.weight"] = torch.ones_like(tower.attnpool.q_proj.weight, dtype=torch.bool)
    report = apply_subnetwork(target, Subnetwork(masks, arch="open_clip/tiny"), name_map, strict=True)
    assert [s for s, _ in report.dropped] == ["attnpool.q_proj.weight"] and not report.unmapped
    assert len(report.mapped) == len(masks) - 1
    tower_params = dict(tower.named_parameters())
    target_params = dict(target.named_parameters())
    for source, dest in report.mapped:
        keep = masks[source]
        got = target_params[dest].detach()
        assert torch.equal(got[keep], tower_params[source].detach()[keep]), (source, dest)
        assert bool((got[~keep] == 0).all()), dest
    assert set(masked_parameters(target)) == {d for _, d in report.mapped}
    # norms and everything else untouched
    assert all(not n.endswith(".norm.weight") for n in masked_parameters(target))


def test_guards_and_index_arithmetic():
    name_map = NameMap.parse(r"""
        rename ^layer(\d)\.(\d+)\. -> stage{g1-1}.block{g2+10}. if g1 >= 2 and g2 < 5
        rename ^layer(\d)\. -> first{g1}.
    """)
    assert name_map.map_name("layer2.3.conv1.weight") == ["stage1.block13.conv1.weight"]
    assert name_map.map_name("layer2.7.conv1.weight") == ["first2.7.conv1.weight"]  # g2 guard false
    assert name_map.map_name("layer1.0.conv1.weight") == ["first1.0.conv1.weight"]  # g1 guard false
    assert name_map.map_name("conv1.weight") == ["conv1.weight"]  # no match: unchanged
    for guard in ("g1 = 2", "g1 < x", "len(g1) > 2"):
        with pytest.raises(OpenTransError, match="guard"):
            NameMap.parse(rf"rename ^layer(\d) -> x{{g1}} if {guard}")
    with pytest.raises(OpenTransError, match="group"):
        NameMap.parse(r"rename ^layer(\d) -> x{g2}").map_name("layer1.x")
    # arithmetic on a non-numeric or missing capture is a clear error, not a ValueError/TypeError
    with pytest.raises(OpenTransError, match="not an integer"):
        NameMap.parse(r"rename ^(\w+)\.w -> n{g1+1}.w").map_name("abc.w")
    with pytest.raises(OpenTransError, match="did not take part"):
        NameMap.parse(r"rename ^(x)?a -> n{g1}").map_name("a")
    # a guard on a non-numeric capture is simply false, never a crash
    assert NameMap.parse(r"rename ^(\w+)\.w -> n{g1+1}.w if g1 > 0").map_name("abc.w") == ["abc.w"]


def tiny_vit() -> nn.Module:
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=8, width=16, layers=2, heads=2, mlp_ratio=2.0,
                             output_dim=8)


class HFStyleViT(nn.Module):
    """A real target with separate q/k/v projections and a Linear projection (Hugging Face CLIP names)."""

    def __init__(self, width: int, layers: int, out: int):
        super().__init__()
        self.vision_model = nn.Module()
        self.vision_model.encoder = nn.Module()
        self.vision_model.encoder.layers = nn.ModuleList()
        for _ in range(layers):
            layer = nn.Module()
            layer.self_attn = nn.Module()
            for proj in ("v_proj", "k_proj", "q_proj"):
                setattr(layer.self_attn, proj, nn.Linear(width, width))
            self.vision_model.encoder.layers.append(layer)
        self.visual_projection = nn.Linear(width, out, bias=False)
        self.cls_token = nn.Parameter(torch.randn(1, 1, width))


VIT_MAP = r"""
split ^transformer\.resblocks\.(\d+)\.attn\.in_proj_weight$ 0 -> vision_model.encoder.layers.{g1}.self_attn.q_proj.weight, vision_model.encoder.layers.{g1}.self_attn.k_proj.weight, vision_model.encoder.layers.{g1}.self_attn.v_proj.weight
transpose ^proj$ -> visual_projection.weight
unsqueeze ^class_embedding$ 0 -> cls_token
unsqueeze ^cls_token$ 0
"""  # noqa: E501


def test_split_transpose_unsqueeze_on_a_real_target():
    vit = tiny_vit()
    target = HFStyleViT(16, 2, 8)
    gen = torch.Generator().manual_seed(2)
    params = dict(vit.named_parameters())
    sources = ["transformer.resblocks.0.attn.in_proj_weight", "transformer.resblocks.1.attn.in_proj_weight", "proj",
               "class_embedding"]
    masks = {n: torch.rand(params[n].shape, generator=gen) > 0.5 for n in sources}
    assert masks["proj"].shape == (16, 8) and masks["class_embedding"].shape == (16,)
    before = {n: p.detach().clone() for n, p in target.named_parameters()}
    with pytest.raises(OpenTransError, match="at least 2-D"):  # an embedding is not a Conv/Linear weight
        Subnetwork(masks)
    shapes = {n: tuple(p.shape) for n, p in target.named_parameters()}
    resolved, _ = NameMap.parse(VIT_MAP).resolve({"class_embedding": masks["class_embedding"]}, shapes)
    assert torch.equal(resolved["cls_token"], masks["class_embedding"].view(1, 1, 16))  # unsqueeze as a rule
    weights = {n: m for n, m in masks.items() if m.dim() >= 2}
    report = apply_subnetwork(target, Subnetwork(weights), NameMap.parse(VIT_MAP), strict=True)
    assert len(report.mapped) == 3 * 2 + 1
    got = dict(target.named_parameters())
    for i in range(2):
        q, k, v = masks[f"transformer.resblocks.{i}.attn.in_proj_weight"].chunk(3, dim=0)
        for part, proj in ((q, "q_proj"), (k, "k_proj"), (v, "v_proj")):
            name = f"vision_model.encoder.layers.{i}.self_attn.{proj}.weight"
            assert torch.equal(got[name].detach(), before[name] * part), name
    assert torch.equal(got["visual_projection.weight"].detach(), before["visual_projection.weight"] * masks["proj"].t())
    assert torch.equal(got["cls_token"].detach(), before["cls_token"])
    # biases were never named: untouched
    assert torch.equal(got["vision_model.encoder.layers.0.self_attn.q_proj.bias"],
                       before["vision_model.encoder.layers.0.self_attn.q_proj.bias"])


def test_shape_check_is_all_or_nothing(tower):
    target = Holder(D2ResNet(tower))
    with torch.no_grad():  # one destination with the wrong shape: nothing at all may be applied
        target.backbone.res3[0].conv2.weight = nn.Parameter(torch.randn(3, 3, 3, 3))
    before = {n: p.detach().clone() for n, p in target.named_parameters()}
    masks = conv_masks(tower, 0.7, first=True)
    with pytest.raises(OpenTransError, match="shape mismatch.*nothing was applied") as info:
        apply_subnetwork(target, Subnetwork(masks), NameMap.parse(D2_DEEPLAB))
    assert info.value.tensor == "layer2.0.conv2.weight"
    assert all(torch.equal(p, before[n]) for n, p in target.named_parameters())
    assert masked_parameters(target) == {}
    _, report = NameMap.parse(D2_DEEPLAB).resolve(masks, {n: p.shape for n, p in target.named_parameters()})
    assert [(s, d) for s, d, _, _ in report.mismatched] == [("layer2.0.conv2.weight", "backbone.res3.0.conv2.weight")]
    assert "MISMATCH" in report.summary() and report.to_dict()["counts"]["mismatched"] == 1
    with pytest.raises(OpenTransError, match="cannot split"):
        NameMap.parse("split ^w$ 0 -> a, b").map("w", torch.ones(3, 2))
    with pytest.raises(OpenTransError, match="2-D"):
        NameMap.parse("transpose ^w$").map("w", torch.ones(3, 2, 1))


def test_strict_unmapped_and_report(tower):
    masks = conv_masks(tower, 0.7, first=True)
    masks["visual.extra.weight"] = torch.ones(2, 2, dtype=torch.bool)
    target = Holder(D2ResNet(tower))
    before = {n: p.detach().clone() for n, p in target.named_parameters()}
    with pytest.raises(OpenTransError, match="strict.*visual.extra.weight"):
        apply_subnetwork(target, Subnetwork(masks), NameMap.parse(D2_DEEPLAB), strict=True)
    assert all(torch.equal(p, before[n]) for n, p in target.named_parameters())
    report = apply_subnetwork(target, Subnetwork(masks), NameMap.parse(D2_DEEPLAB))
    assert isinstance(report, MappingReport) and report.ok
    assert report.unmapped == [("visual.extra.weight", "no tensor 'backbone.visual.extra.weight' in the target")]
    counts = report.to_dict()["counts"]
    assert counts == {"mapped": len(masks) - 1, "dropped": 0, "unmapped": 1, "mismatched": 0, "uncovered": 0}
    assert "unmapped  visual.extra.weight" in report.summary()


def test_unmap_rule_counts_as_unmapped():
    name_map = NameMap.parse(r"unmap ^conv1\.weight$")
    result = name_map.map("conv1.weight")
    assert isinstance(result, Unmapped)
    _, report = name_map.resolve({"conv1.weight": torch.ones(2, dtype=torch.bool)}, {"conv1.weight": (2,)})
    assert not report.mapped and [s for s, _ in report.unmapped] == ["conv1.weight"]
    with pytest.raises(OpenTransError, match="strict"):
        report.check(strict=True)


def test_two_sources_onto_one_destination_is_an_error():
    name_map = NameMap.parse(r"rename ^(a|b)$ -> c")
    with pytest.raises(OpenTransError, match="map onto 'c'"):
        name_map.resolve({"a": torch.ones(2, dtype=torch.bool), "b": torch.ones(2, dtype=torch.bool)}, {"c": (2,)})


def test_parse_str_round_trip_and_composition():
    text = D2_DEEPLAB + VIT_MAP + "rename ^layer(\\d)\\.(\\d+)\\. -> s{g1-1}.b{g2}. if g1 >= 2 and g2 != 3\n"
    name_map = NameMap.parse(text)
    kinds = {rule.kind for rule in name_map.rules}
    assert kinds == {"drop", "rename", "prefix", "split", "transpose", "unsqueeze"}
    again = NameMap.parse(str(name_map))
    assert again == name_map and str(again) == str(name_map)
    assert NameMap.parse(str(name_map).splitlines()) == name_map  # list form
    names = ["layer1.0.conv1.weight", "layer3.3.conv2.weight", "conv2.weight", "attnpool.c_proj.weight",
             "transformer.resblocks.1.attn.in_proj_weight", "proj"]
    assert [again.map_name(n) for n in names] == [name_map.map_name(n) for n in names]
    combined = NameMap.parse("rename ^a -> b").then(NameMap.prefix("x."))
    assert combined.map_name("a.w") == ["x.b.w"] and len(combined.rules) == 2
    assert NameMap.identity().map_name("a.w") == ["a.w"]
    assert NameMap([Rule("prefix", "p.")]) == NameMap.prefix("p.")
    assert "prefix p." in repr(NameMap.prefix("p."))


@pytest.mark.parametrize("line", [
    "rename",  # no pattern
    "frobnicate ^a -> b",  # unknown kind
    "rename ^a -> b, c",  # two targets
    "split ^a -> b, c",  # no dimension
    "split ^a 0 -> b",  # one target
    "rename ^a 0 -> b",  # dimension on a rename
    "rename ^a( -> b",  # bad regex
])
def test_bad_rules_are_refused_with_the_line(line):
    with pytest.raises(OpenTransError) as info:
        NameMap.parse(["# header", line])
    message = str(info.value)
    assert "line 2" in message or "regex" in message or "target" in message


@pytest.mark.parametrize("captured", ["\u00b9", "\u0663", "1\u00b2", "-\u00b9"])
def test_a_name_part_that_only_looks_like_a_number_is_not_one(captured):
    """str.isdigit() takes '¹' and '٣', int() refuses the first: a crafted tensor name is one clear refusal or no
    match, never a traceback."""
    arithmetic = NameMap.parse(r"rename layer(.+)\.w -> res{g1+1}.w")
    with pytest.raises(OpenTransError, match="not an integer"):
        arithmetic.map(f"layer{captured}.w")
    guarded = NameMap.parse(r"rename layer(.+)\.w -> res.w if g1 < 9")
    assert guarded.map(f"layer{captured}.w") == [(f"layer{captured}.w", None)]  # the guard does not hold
    assert guarded.map("layer3.w") == [("res.w", None)]
