"""detectron2 integration: ``MODEL.OPENTRANS.*`` config keys and a training hook over OpenTransSchedule.

detectron2 is imported only when a hook is created, so this module (and its config helpers, which work on
any yacs-style ``CfgNode``) import without it. Typical use in a detectron2 ``train_net.py``::

    from opentrans_hub.integrations.detectron2 import add_opentrans_config, opentrans_hook
    cfg = get_cfg(); add_opentrans_config(cfg); cfg.merge_from_file("configs/fcclip_rn50_subnetwork.yaml")
    trainer = Trainer(cfg); trainer.register_hooks([opentrans_hook(cfg)]); trainer.train()

All behaviour lives in :mod:`opentrans_hub.training`; the hook only forwards ``trainer.iter``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from torch import nn

from ..errors import OpenTransError
from ..imp import IMPRunner, PruneScope
from ..mapping import NameMap
from ..training import OpenTransSchedule

#: the keys under MODEL.OPENTRANS and their defaults (a value of -1 means "off" for iterations)
DEFAULTS: dict[str, Any] = {
    "ARCH": "open_clip/RN50",          # architecture id of the CLIP tower (recorded in subnetworks)
    "PREFIX": "",                      # where the tower sits in the model ("" = the PLUGIN's tower_path)
    "SUBNETWORK": "",                  # subnetwork file or registry name to apply ("" = none)
    "PLUGIN": "",                      # plugin whose NameMap carries canonical names onto this model
    "NAME_MAP": "",                    # NameMap rule text (overrides PLUGIN and PREFIX)
    "STRICT": False,                   # every subnetwork tensor must find a destination
    "APPLY_AT": -1,                    # apply after this iteration (-1: before training)
    "BAKE_AT": -1,                     # bake masks after this iteration and save a checkpoint (-1: never)
    "BAKE_CHECKPOINT": "model_{:07d}_baked",  # checkpoint name at the bake (format gets the iteration)
    "SELECTION": "",                   # LayerSelection JSON: layers to train (others frozen)
    "VERIFY_PERIOD": 0,                # prove every pruned weight is 0.0 every N iterations, fail if not (0: off)
}
IMP_DEFAULTS: dict[str, Any] = {
    "ENABLED": False,
    "PERIOD": 5000,                    # a round every PERIOD iterations
    "START": 0,                        # first round after START + PERIOD iterations
    "RATE": 0.1,                       # fraction of the live weights pruned per round
    "ROUNDS": 21,                      # 21 rounds at 0.1 -> 89.06 % sparse
    "REWIND": -1,                      # -1 none (paper), 0 to the weights at the start, k to iteration k
    "OUTPUT_DIR": "",                  # per-round subnetworks + resume state ("" = OUTPUT_DIR/opentrans_imp)
    "ENCODING": "packbits",
    "LAYER_TYPES": ["conv"],           # conv and/or linear
    "EXCLUDE_FIRST": True,             # the paper leaves the first conv dense
    "INCLUDE": "",                     # regex over canonical names
    "EXCLUDE": "",
    "RANKING": "global",               # global | layerwise
    "MIN_DENSITY": 0.0,                # keep at least this fraction of every layer
}


def _node(cfg: Any) -> Any:
    # a child node of the same class as cfg (detectron2's CfgNode or yacs' CfgNode)
    return type(cfg)()


def add_opentrans_config(cfg: Any) -> Any:
    """Add ``MODEL.OPENTRANS.*`` (and ``MODEL.OPENTRANS.IMP.*``) with defaults to a detectron2/yacs CfgNode."""
    if getattr(cfg, "is_frozen", lambda: False)():
        raise OpenTransError("the config is frozen: call add_opentrans_config(cfg) before cfg.freeze()")
    if "MODEL" not in cfg:
        cfg.MODEL = _node(cfg)
    node = _node(cfg)
    for key, value in DEFAULTS.items():
        setattr(node, key, value)
    imp = _node(cfg)
    for key, value in IMP_DEFAULTS.items():
        setattr(imp, key, list(value) if isinstance(value, list) else value)
    node.IMP = imp
    cfg.MODEL.OPENTRANS = node
    if "OUTPUT_DIR" not in cfg:
        cfg.OUTPUT_DIR = "./output"
    return cfg


def _plugin(name: str) -> Any:
    from ..plugins import get_plugin

    return get_plugin(name)


def tower_prefix_from_cfg(cfg: Any, model: nn.Module | None = None) -> str:
    """PREFIX, else the PLUGIN's ``tower_path`` + ``.``, else ``""`` (the model is the tower).

    ``PLUGIN: auto`` finds the tower in ``model`` (required then).
    """
    oc = cfg.MODEL.OPENTRANS
    if oc.PREFIX:
        return oc.PREFIX
    if oc.PLUGIN == "auto":
        if model is None:
            raise OpenTransError("MODEL.OPENTRANS.PLUGIN 'auto' infers the tower from the model: pass the model")
        plugin = _plugin("auto")
        plugin.map_for(oc.ARCH, model)
        return plugin.last_report.tower
    if oc.PLUGIN:
        path = _plugin(oc.PLUGIN).tower_path
        return f"{path}." if path else ""
    return ""


def name_map_from_cfg(cfg: Any, model: nn.Module | None = None) -> NameMap:
    """NAME_MAP rule text if given, else the PLUGIN's map for ARCH, else ``prefix PREFIX``.

    ``PLUGIN: auto`` infers the map from ``model`` at run time (required then) and logs the rules it used.
    """
    oc = cfg.MODEL.OPENTRANS
    if oc.NAME_MAP:
        return NameMap.parse(oc.NAME_MAP)
    if oc.PLUGIN == "auto":
        if model is None:
            raise OpenTransError("MODEL.OPENTRANS.PLUGIN 'auto' infers the name map from the model: pass the model")
        return _plugin("auto").map_for(oc.ARCH, model)
    if oc.PLUGIN:
        return _plugin(oc.PLUGIN).name_map(oc.ARCH)
    prefix = tower_prefix_from_cfg(cfg)
    return NameMap.prefix(prefix) if prefix else NameMap()


def imp_runner_from_cfg(cfg: Any, model: nn.Module,
                        on_round: Callable[[int, int, Any], None] | None = None) -> IMPRunner | None:
    """The IMPRunner MODEL.OPENTRANS.IMP describes (None when IMP is off)."""
    oc = cfg.MODEL.OPENTRANS
    ic = oc.IMP
    if not ic.ENABLED:
        return None
    scope = PruneScope(layer_types=tuple(ic.LAYER_TYPES), exclude_first=bool(ic.EXCLUDE_FIRST),
                       include=ic.INCLUDE or None, exclude=ic.EXCLUDE or None, ranking=ic.RANKING,
                       min_density=float(ic.MIN_DENSITY))
    out_dir = ic.OUTPUT_DIR or os.path.join(cfg.OUTPUT_DIR, "opentrans_imp")
    return IMPRunner(model, rate=float(ic.RATE), rounds=int(ic.ROUNDS), period=int(ic.PERIOD), start=int(ic.START),
                     scope=scope, prefix=tower_prefix_from_cfg(cfg, model), arch=oc.ARCH,
                     rewind=None if ic.REWIND < 0 else int(ic.REWIND),
                     out_dir=out_dir, encoding=ic.ENCODING, on_round=on_round)


def build_schedule_from_cfg(cfg: Any, model: nn.Module, save: Callable[[str], Any] | None = None,
                            log: Callable[[str], Any] | None = None) -> OpenTransSchedule:
    """The OpenTransSchedule that ``cfg.MODEL.OPENTRANS`` describes for ``model``.

    ``save(name)`` is called with ``BAKE_CHECKPOINT.format(iteration)`` after the bake (a detectron2
    checkpointer's ``save``).
    """
    if "OPENTRANS" not in cfg.MODEL:
        raise OpenTransError("cfg has no MODEL.OPENTRANS: call add_opentrans_config(cfg) first")
    oc = cfg.MODEL.OPENTRANS
    name_map = name_map_from_cfg(cfg, model)
    on_bake = None
    if oc.BAKE_AT >= 0 and save is not None:
        def on_bake(iteration: int) -> None:
            save(oc.BAKE_CHECKPOINT.format(iteration))
    return OpenTransSchedule(
        model,
        subnetwork=oc.SUBNETWORK or None,
        name_map=name_map,
        strict=bool(oc.STRICT),
        apply_at=None if oc.APPLY_AT < 0 else int(oc.APPLY_AT),
        bake_at=None if oc.BAKE_AT < 0 else int(oc.BAKE_AT),
        on_bake=on_bake,
        imp=imp_runner_from_cfg(cfg, model),
        selection=oc.SELECTION or None,
        log=log,
        verify_every=int(oc.get("VERIFY_PERIOD", 0)) or None,
    )


def _hook_class() -> type:
    try:
        from detectron2.engine import HookBase
    except ImportError as exc:
        raise OpenTransError("the OpenTrans detectron2 hook needs detectron2 "
                             f"(https://github.com/facebookresearch/detectron2): {exc}") from None

    class OpenTransHook(HookBase):
        """Forwards detectron2's training loop to :class:`~opentrans_hub.training.OpenTransSchedule`."""

        def __init__(self, cfg: Any):
            super().__init__()
            self.cfg = cfg.clone()
            self.schedule: OpenTransSchedule | None = None

        def before_train(self) -> None:
            import logging

            trainer = self.trainer
            checkpointer = getattr(trainer, "checkpointer", None)
            save = checkpointer.save if checkpointer is not None else None
            logger = logging.getLogger(__name__)
            self.schedule = build_schedule_from_cfg(self.cfg, trainer.model, save=save, log=logger.info)
            self.schedule.before_train(start_iter=int(getattr(trainer, "start_iter", 0)))

        def after_step(self) -> None:
            self.schedule.after_step(self.trainer.iter)

        def after_train(self) -> None:
            if self.schedule is not None:
                self.schedule.after_train()

    return OpenTransHook


def opentrans_hook(cfg: Any) -> Any:
    """A detectron2 ``HookBase`` running what ``cfg.MODEL.OPENTRANS`` asks for (needs detectron2)."""
    if "OPENTRANS" not in cfg.MODEL:
        raise OpenTransError("cfg has no MODEL.OPENTRANS: call add_opentrans_config(cfg) first")
    return _hook_class()(cfg)
