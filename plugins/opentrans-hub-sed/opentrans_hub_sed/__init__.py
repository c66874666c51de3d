"""opentrans-hub plugin for SED (xb534/SED).

SED holds a whole open_clip model at ``sem_seg_head.predictor.clip_model`` (ConvNeXt image tower under
``.visual.``, the text tower beside it) and deletes its detectron2 backbone, so the tower's names in a checkpoint
are open_clip's behind one prefix, next to the predictor's aggregator (``sem_seg_head.predictor.transformer``).

``MODEL.SEM_SEG_HEAD.CLIP_FINETUNE`` chooses what of the image tower trains, by substrings of the parameter names;
the modes that train part of an open_clip ConvNeXt tower are presets with the same tests: ``full`` (everything),
``conv`` (names holding ``conv`` or ``position``: the depthwise convolutions), ``mlp`` (``mlp`` or ``position``: the
blocks' MLPs and an MLP projection head) and ``full_res5`` (``stages.3``). The other modes train nothing of this
tower, so they have no preset: ``prompt`` (no prompt parameters in it), ``fast_infer`` and every other value
(``attention``, the config default, included). SED freezes the text tower itself, outside this plugin's scope.
"""

from opentrans_hub import Plugin

_PREFIX = "prefix sem_seg_head.predictor.clip_model.visual."

plugin = Plugin(
    name="sed",
    frameworks=("SED",),
    archs={
        "open_clip/convnext_large_d_320": _PREFIX,  # CLIP_PRETRAINED: Convnext-L
        "open_clip/convnext_base_w_320": _PREFIX,  # CLIP_PRETRAINED: Convnext-B
    },
    tower_path="sem_seg_head.predictor.clip_model.visual",
    presets={"full": r".", "conv": r"conv|position", "mlp": r"mlp|position", "full_res5": r"stages\.3"},
    description="SED: open_clip ConvNeXt at sem_seg_head.predictor.clip_model.visual; CLIP_FINETUNE presets",
)
