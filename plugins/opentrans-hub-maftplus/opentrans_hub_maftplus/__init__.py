"""opentrans-hub plugin for MAFT+ (jiaosiyu1999/MAFT-Plus).

MAFT+ builds FC-CLIP's open_clip backbone twice: the student at ``backbone.clip_model`` (image tower under
``.visual.``, ConvNeXt trunk under ``.visual.trunk.``, text tower beside it), whose trunk it fine-tunes, and a
frozen teacher at ``backbone_t.clip_model`` that its representation-compensation loss compares against. The map is
one prefix anchored at ``backbone.clip_model.visual.``, and the tower path scopes selections to it, so a subnetwork
or a selection lands on the student only: the teacher stays dense and frozen.

Preset ``default`` is MAFT+'s own fine-tuning choice: the trunk's stem, stages and ``norm_pre`` train; the trunk's
head norm and the projection head stay frozen.
"""

from opentrans_hub import Plugin

_PREFIX = "prefix backbone.clip_model.visual."

plugin = Plugin(
    name="maftplus",
    frameworks=("MAFT+",),
    archs={
        "open_clip/convnext_large_d_320": _PREFIX,  # train_semantic_large
        "open_clip/convnext_base_w_320": _PREFIX,  # train_semantic_base
        "open_clip/convnext_*": _PREFIX,  # any open_clip ConvNeXt its CLIP backbone accepts
    },
    tower_path="backbone.clip_model.visual",
    presets={"default": r"^trunk\.(stem|stages|norm_pre)\."},
    description="MAFT+: trained open_clip ConvNeXt at backbone.clip_model.visual (never the backbone_t teacher)",
)
