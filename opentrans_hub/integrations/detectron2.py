"""detectron2 integration: ``MODEL.OPENTRANS.*`` config keys, a ``build_model`` helper and a training hook.

detectron2 is imported only when a hook is created, so this module (and its config helpers, which work on
any yacs-style ``CfgNode``) import without it. Typical use in a detectron2 ``train_net.py``::

    from opentrans_hub.integrations.detectron2 import (add_opentrans_config, opentrans_build_model,
                                                       opentrans_build_optimizer, opentrans_hook)

    class Trainer(DefaultTrainer):
        @classmethod
        def build_model(cls, cfg):  # the layer selection must exist before the optimizer and DDP
            return opentrans_build_model(cfg, super().build_model(cfg))

        @classmethod
        def build_optimizer(cls, cfg, model):  # MODEL.OPENTRANS.LR_SCALES: a learning-rate budget
            return opentrans_build_optimizer(cfg, model, build=super().build_optimizer)

    cfg = get_cfg(); add_opentrans_config(cfg); cfg.merge_from_file("configs/fcclip.yaml")
    trainer = Trainer(cfg); trainer.register_hooks([opentrans_hook(cfg)]); trainer.train()

All behaviour lives in :mod:`opentrans_hub.integrations.training`; the hook forwards ``trainer.iter``, saves through the
trainer's checkpointer, logs under the ``detectron2`` logger and puts ``opentrans/*`` scalars into the
trainer's ``EventStorage`` (so they reach ``metrics.json`` and TensorBoard).
"""

from __future__ import annotations

import inspect
import logging
import os
import warnings
from collections.abc import Callable
from typing import Any

from torch import nn

from ..errors import OpenTransError, OpenTransWarning
from ..methods.imp import IMPRunner, PruneScope
from ..naming.namemap import NameMap
from ..sparsity.masks import unwrap
from ..transfer.apply import apply_subnetwork
from ..zoo.registry import load_selection, load_subnetwork
from .lr_scales import apply_lr_scales
from .training import OpenTransSchedule, apply_layer_selection, mark_built

#: our lines go to a child of detectron2's logger, so ``default_setup``'s handlers (stdout, log.txt) show them
LOGGER_NAME = "detectron2.opentrans_hub"

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
    "BAKE_CHECKPOINT": "model_{:07d}_baked",  # checkpoint at the bake: model_0368749_baked(.pth) for 368749
    "SELECTION": "",                   # LayerSelection JSON: layers to train (others frozen)
    "LR_SCALES": "",                   # LayerSelection JSON whose lr_scale's scale the optimizer's rates ("" = none)
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
    "CHECKPOINT": "model_imp_round_{:02d}",  # checkpoint after each round (format gets the round; "" = none)
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
    from ..transfer.discovery import get_plugin

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
                            log: Callable[[str], Any] | None = None, warn: Callable[[str], Any] | None = None,
                            optimizer: Any = None) -> OpenTransSchedule:
    """The OpenTransSchedule that ``cfg.MODEL.OPENTRANS`` describes for ``model``.

    ``save(name)`` (a detectron2 checkpointer's ``save``) is called with ``BAKE_CHECKPOINT.format(iteration)``
    after the bake (``model_0368749_needed`` for iteration 368749) and with ``IMP.CHECKPOINT.format(round)``
    after each IMP round (``model_imp_round_03``), before the round is committed. A bake without ``save``
    is refused (the baked model would be lost). ``optimizer``: refuse a selection it does not cover.
    """
    if "OPENTRANS" not in cfg.MODEL:
        raise OpenTransError("cfg has no MODEL.OPENTRANS: call add_opentrans_config(cfg) first")
    oc = cfg.MODEL.OPENTRANS
    name_map = name_map_from_cfg(cfg, model)
    on_bake = None
    if oc.BAKE_AT >= 0:
        if save is None:
            raise OpenTransError(f"MODEL.OPENTRANS.BAKE_AT is {oc.BAKE_AT} but nothing saves the baked model "
                                 "(pass save=, e.g. a DetectionCheckpointer's save)")

        def on_bake(iteration: int) -> None:
            save(oc.BAKE_CHECKPOINT.format(iteration))
    on_round = None
    if save is not None and oc.IMP.CHECKPOINT:
        def on_round(round_index: int, iteration: int, subnetwork: Any) -> None:
            save(oc.IMP.CHECKPOINT.format(round_index))
    return OpenTransSchedule(
        model,
        subnetwork=oc.SUBNETWORK or None,
        name_map=name_map,
        strict=bool(oc.STRICT),
        apply_at=None if oc.APPLY_AT < 0 else int(oc.APPLY_AT),
        bake_at=None if oc.BAKE_AT < 0 else int(oc.BAKE_AT),
        on_bake=on_bake,
        imp=imp_runner_from_cfg(cfg, model, on_round=on_round),
        selection=oc.SELECTION or None,
        optimizer=optimizer,
        log=log,
        warn=warn,
        verify_every=int(oc.get("VERIFY_PERIOD", 0)) or None,
    )


def opentrans_build_model(cfg: Any, model: nn.Module) -> nn.Module:
    """Apply at model-build time what must precede the optimizer and the DDP wrapper; returns ``model``.

    For a ``DefaultTrainer`` subclass: ``return opentrans_build_model(cfg, super().build_model(cfg))`` in its
    ``build_model`` classmethod. The layer selection (``SELECTION``) sets ``requires_grad`` here, so the
    optimizer holds the parameters it unfreezes. A subnetwork applied before training and never baked
    (``APPLY_AT`` and ``BAKE_AT`` -1) is applied here too, so ``--eval-only`` and weights loaded later see
    its zeros; a subnetwork on a schedule stays with the hook, which knows the iteration a resumed run
    starts at. The hook then uses what was done here instead of repeating it.
    """
    if "OPENTRANS" not in cfg.MODEL:
        raise OpenTransError("cfg has no MODEL.OPENTRANS: call add_opentrans_config(cfg) first")
    oc = cfg.MODEL.OPENTRANS
    logger = logging.getLogger(LOGGER_NAME)
    if not oc.SELECTION and not oc.SUBNETWORK:
        return model
    name_map = name_map_from_cfg(cfg, model)
    if oc.SELECTION:
        selection = load_selection(oc.SELECTION)
        report = apply_layer_selection(model, selection, name_map)
        mark_built(model, "selection", selection.sha256, report)
        logger.info(f"opentrans: layer selection {selection.sha256[:12]} applied at model build: {report.summary()}")
    if oc.SUBNETWORK and oc.APPLY_AT < 0 and oc.BAKE_AT < 0:
        subnetwork = load_subnetwork(oc.SUBNETWORK)
        report = apply_subnetwork(unwrap(model), subnetwork, name_map, strict=bool(oc.STRICT))
        mark_built(model, "subnetwork", subnetwork.sha256, report)
        logger.info(f"opentrans: subnetwork {subnetwork.sha256[:12]} applied at model build "
                    f"({len(report.mapped)} tensors, sparsity {subnetwork.sparsity:.2%})")
    elif oc.SUBNETWORK:
        logger.info("opentrans: the subnetwork is on a schedule (APPLY_AT/BAKE_AT): opentrans_hook(cfg) applies it")
    return model


def opentrans_build_optimizer(cfg: Any, model: nn.Module,
                              build: Callable[[Any, nn.Module], Any] | None = None) -> Any:
    """The optimizer ``build(cfg, model)`` makes (default ``detectron2.solver.build_optimizer``), with each
    parameter's learning rate times its layer's scale from the selection ``MODEL.OPENTRANS.LR_SCALES``.

    Everything detectron2 decides stays: ``SOLVER.BASE_LR``, ``BIAS_LR_FACTOR``, the weight decay of norms and
    biases, overrides, gradient clipping; a bias follows its weight's scale. The selection's layers are mapped
    like ``SELECTION`` (``NAME_MAP``, ``PLUGIN``, ``PREFIX``); none reaching the model is an error. Call it before
    the scheduler is built (``DefaultTrainer`` does: ``build_optimizer`` comes first). ``LR_SCALES`` empty:
    the optimizer as built.
    """
    from ..transfer.lr_groups import parameter_scales

    if "OPENTRANS" not in cfg.MODEL:
        raise OpenTransError("cfg has no MODEL.OPENTRANS: call add_opentrans_config(cfg) first")
    if build is None:
        try:
            from detectron2.solver import build_optimizer as build
        except ImportError as exc:
            raise OpenTransError("opentrans_build_optimizer without build= uses detectron2's build_optimizer "
                                 f"(https://github.com/facebookresearch/detectron2): {exc}") from None
    optimizer = build(cfg, model)
    source = cfg.MODEL.OPENTRANS.get("LR_SCALES", "")
    if not source:
        return optimizer
    logger = logging.getLogger(LOGGER_NAME)
    selection = load_selection(source)
    if not selection.has_lr_scales:
        message = (f"MODEL.OPENTRANS.LR_SCALES {source}: the selection carries no learning-rate scale other than "
                   "1.0 (make one with `opentrans-hub select ... --policy alpha-lr`); the optimizer is unchanged")
        warnings.warn(message, OpenTransWarning, stacklevel=2)
        logger.warning(f"opentrans: {message}")
    model = unwrap(model)
    scales, _ = parameter_scales(model, selection, name_map=name_map_from_cfg(cfg, model))
    params = dict(model.named_parameters())
    changed = apply_lr_scales(optimizer, {params[name]: scale for name, scale in scales.items()})
    values = list(scales.values())
    logger.info(f"opentrans: learning-rate budget {selection.sha256[:12]} applied: {changed} parameters at "
                f"{min(values):.3f}..{max(values):.3f} x their rate")
    return optimizer


class OpenTransHookLogic:
    """What the detectron2 hook does, on anything trainer-like (``model``, ``optimizer``, ``iter``, ``start_iter``,
    ``max_iter``, ``storage``, optionally ``checkpointer``); :func:`opentrans_hook` mixes it into ``HookBase``.

    It forwards the loop to :class:`~opentrans_hub.integrations.training.OpenTransSchedule` with the trainer's optimizer
    (a selection it does not cover is refused), saves through the trainer's checkpointer (a plain trainer
    gets a ``DetectionCheckpointer`` on ``cfg.OUTPUT_DIR``), logs under detectron2's logger and puts the
    schedule's ``opentrans/*`` scalars into the trainer's ``EventStorage``.
    """

    trainer: Any = None

    def __init__(self, cfg: Any):
        super().__init__()
        self.cfg = cfg.clone()
        self.schedule: OpenTransSchedule | None = None
        self.checkpointer: Any = None
        self._cur_iter = False

    def _make_checkpointer(self) -> Any:
        from detectron2.checkpoint import DetectionCheckpointer

        optimizer = getattr(self.trainer, "optimizer", None)
        extra = {"optimizer": optimizer} if optimizer is not None else {}
        return DetectionCheckpointer(self.trainer.model, self.cfg.OUTPUT_DIR, **extra)

    def _checkpointer(self) -> Any:
        checkpointer = getattr(self.trainer, "checkpointer", None)
        if checkpointer is not None:
            return checkpointer
        if not self.cfg.OUTPUT_DIR:
            raise OpenTransError("the trainer has no checkpointer and cfg.OUTPUT_DIR is empty: "
                                 "nowhere to save the bake / IMP checkpoints")
        logging.getLogger(LOGGER_NAME).info(
            f"opentrans: the trainer has no checkpointer; checkpoints go to {self.cfg.OUTPUT_DIR} "
            "through a DetectionCheckpointer")
        return self._make_checkpointer()

    def _save(self, name: str) -> None:
        self.checkpointer.save(name, iteration=int(self.trainer.iter))

    def _put(self, cur_iter: int | None = None) -> None:
        storage = self.trainer.storage
        extra = {"cur_iter": cur_iter} if cur_iter is not None else {}
        for name, value in self.schedule.scalars().items():
            storage.put_scalar(name, value, smoothing_hint=False, **extra)

    def before_train(self) -> None:
        trainer = self.trainer
        logger = logging.getLogger(LOGGER_NAME)
        self.checkpointer = self._checkpointer()
        self.schedule = build_schedule_from_cfg(self.cfg, trainer.model, save=self._save, log=logger.info,
                                                warn=logger.warning, optimizer=getattr(trainer, "optimizer", None))
        self.schedule.before_train(start_iter=int(getattr(trainer, "start_iter", 0)))
        self._cur_iter = "cur_iter" in inspect.signature(trainer.storage.put_scalar).parameters  # detectron2 >= 2023
        self._put()

    def before_step(self) -> None:
        if not self._cur_iter:  # older detectron2: the state before this step, in this step's metrics
            self._put()

    def after_step(self) -> None:
        iteration = int(self.trainer.iter)
        produced = self.schedule.after_step(iteration)
        if self._cur_iter:  # the state after this step is the next iteration's; the writers' final write
            self._put(cur_iter=iteration + 1)  # (after_train) then still holds a round run at the last step
        last = getattr(self.trainer, "max_iter", None)
        if produced is not None and last is not None and iteration >= last - 1 and self._has_final():
            # the periodic checkpointer wrote model_final before this round ran: write it again with the round
            self._save("model_final")
            logging.getLogger(LOGGER_NAME).info(
                f"opentrans: model_final saved again to hold IMP round {self.schedule.imp.rounds_done}")

    def _has_final(self) -> bool:
        folder = getattr(self.checkpointer, "save_dir", None)
        if not folder:
            return False
        path = os.path.join(folder, "model_final.pth")
        manager = getattr(self.checkpointer, "path_manager", None)
        return bool(manager.exists(path)) if manager is not None else os.path.isfile(path)

    def after_train(self) -> None:
        if self.schedule is not None:
            self.schedule.after_train()


def _hook_class() -> type:
    try:
        from detectron2.engine import HookBase
    except ImportError as exc:
        raise OpenTransError("the OpenTrans detectron2 hook needs detectron2 "
                             f"(https://github.com/facebookresearch/detectron2): {exc}") from None

    class OpenTransHook(OpenTransHookLogic, HookBase):
        """Forwards detectron2's training loop to :class:`~opentrans_hub.integrations.training.OpenTransSchedule`."""

    return OpenTransHook


def opentrans_hook(cfg: Any) -> Any:
    """A detectron2 ``HookBase`` running what ``cfg.MODEL.OPENTRANS`` asks for (needs detectron2)."""
    if "OPENTRANS" not in cfg.MODEL:
        raise OpenTransError("cfg has no MODEL.OPENTRANS: call add_opentrans_config(cfg) first")
    return _hook_class()(cfg)
