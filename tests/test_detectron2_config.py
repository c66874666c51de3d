"""MODEL.OPENTRANS.* keys on a real yacs CfgNode (detectron2's base class), the shipped YAML fragments, and
the schedule they build; detectron2 itself is absent here and must stay optional."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.layouts import Box, place
from support.towers import make_tiny_resnet
from support.training import make_batch
from torch import nn
from yacs.config import CfgNode

from opentrans_hub import OpenTransError
from opentrans_hub.integrations.detectron2 import (
    add_opentrans_config,
    build_schedule_from_cfg,
    name_map_from_cfg,
    opentrans_build_model,
    opentrans_hook,
)
from opentrans_hub.methods.imp import IMPRunner, PruneScope, check_canonical_scope, magnitude_prune
from opentrans_hub.sparsity.masks import masked_parameters

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PREFIX_FCCLIP = "backbone.clip_model.visual."


def _cfg(tmp_path: Path | None = None) -> CfgNode:
    cfg = CfgNode()
    cfg.MODEL = CfgNode()
    cfg.MODEL.WEIGHTS = ""
    cfg.OUTPUT_DIR = str(tmp_path) if tmp_path else "./output"
    return add_opentrans_config(cfg)


def _model_at(path: str, tower: nn.Module) -> nn.Module:
    """A model holding ``tower`` at the dotted ``path`` (as the framework does), plus a head."""
    root = place(Box(), path, tower)
    root.head = nn.Conv2d(3, 4, 1)
    return root


def test_package_imports_without_detectron2_and_the_hook_says_why():
    code = ("import sys, opentrans_hub, opentrans_hub.integrations.detectron2 as d2\n"
            "assert 'detectron2' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    if importlib.util.find_spec("detectron2") is not None:
        pytest.skip("detectron2 is installed here")
    with pytest.raises(OpenTransError, match="needs detectron2"):
        opentrans_hook(_cfg())


def test_keys_and_defaults_on_a_real_cfgnode():
    cfg = _cfg()
    oc = cfg.MODEL.OPENTRANS
    assert isinstance(oc, CfgNode) and isinstance(oc.IMP, CfgNode)
    assert oc.APPLY_AT == -1 and oc.BAKE_AT == -1 and oc.SUBNETWORK == ""
    assert oc.IMP.ENABLED is False and oc.IMP.RATE == 0.1 and oc.IMP.ROUNDS == 21 and oc.IMP.PERIOD == 5000
    assert list(oc.IMP.LAYER_TYPES) == ["conv"] and oc.IMP.EXCLUDE_FIRST is True
    cfg.merge_from_list(["MODEL.OPENTRANS.IMP.RATE", "0.2", "MODEL.OPENTRANS.BAKE_AT", "100"])
    assert cfg.MODEL.OPENTRANS.IMP.RATE == 0.2 and cfg.MODEL.OPENTRANS.BAKE_AT == 100
    with pytest.raises(AssertionError, match="Non-existent key"):  # typos are refused by the CfgNode, as in detectron2
        cfg.merge_from_list(["MODEL.OPENTRANS.IMP.RATES", "0.2"])
    frozen = _cfg()
    frozen.freeze()
    with pytest.raises(OpenTransError, match="frozen"):
        add_opentrans_config(frozen)
    with pytest.raises(OpenTransError, match="add_opentrans_config"):
        build_schedule_from_cfg(CfgNode({"MODEL": CfgNode()}), nn.Linear(1, 1))


@pytest.mark.parametrize("fragment", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_fragment_merges(fragment):
    cfg = _cfg()
    cfg.MODEL.RESNETS = CfgNode({"DEPTH": 50, "STEM_TYPE": "basic", "STEM_OUT_CHANNELS": 128})  # d2 DeepLab keys
    cfg.merge_from_file(str(CONFIGS / fragment))
    oc = cfg.MODEL.OPENTRANS
    assert oc.PLUGIN, "every fragment names its framework's plugin"
    name_map = name_map_from_cfg(cfg)
    assert str(name_map)


def test_fcclip_fragment_applies_then_bakes_and_saves(tmp_path):
    cfg = _cfg(tmp_path)
    cfg.merge_from_file(str(CONFIGS / "fcclip.yaml"))
    assert cfg.MODEL.OPENTRANS.SUBNETWORK == "rn50-openai-imp21"
    from opentrans_hub.zoo.registry import default_registry

    assert "rn50-openai-imp21" in default_registry().recipes()  # a built-in name
    tower = make_tiny_resnet()
    sub = magnitude_prune(make_tiny_resnet(seed=3), sparsity=0.8, apply=False, arch="open_clip/RN50")
    path = sub.save(tmp_path / "sub.safetensors")
    cfg.merge_from_list(["MODEL.OPENTRANS.SUBNETWORK", str(path), "MODEL.OPENTRANS.APPLY_AT", "1",
                         "MODEL.OPENTRANS.BAKE_AT", "3"])
    model = _model_at("backbone.clip_model.visual", tower)
    saved = []
    schedule = build_schedule_from_cfg(cfg, model, save=saved.append)
    assert schedule.apply_at == 1 and schedule.bake_at == 3 and schedule.imp is None and schedule.strict
    schedule.before_train(start_iter=0)
    assert not masked_parameters(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    params = dict(model.named_parameters())
    for iteration in range(5):
        images, _ = make_batch(iteration, size=2)
        optimizer.zero_grad()
        tower(nn.functional.interpolate(images, size=64)).square().mean().backward()
        optimizer.step()
        schedule.after_step(iteration)
        if iteration in (1, 2):
            for canonical, keep in sub.masks.items():
                assert (params["backbone.clip_model.visual." + canonical][~keep] == 0).all()
    assert saved == ["model_0000003_needed"]
    assert [event for _, event in schedule.events] == ["apply", "bake"]
    assert len(schedule.report.mapped) == len(sub)


def test_hanovs_fragment_runs_imp_rounds_into_the_output_dir_and_checkpoints(tmp_path, rn50_visual):
    cfg = _cfg(tmp_path)
    cfg.merge_from_file(str(CONFIGS / "hanovs.yaml"))
    model = _model_at("backbone", rn50_visual)
    model.vision_clip = make_tiny_resnet(seed=9)  # the frozen KD copy: must never be pruned
    schedule = build_schedule_from_cfg(cfg, model)
    imp = schedule.imp
    assert (imp.rate, imp.rounds, imp.period, imp.rewind, imp.prefix) == (0.1, 21, 5000, None, "backbone.")
    assert imp.scope == PruneScope()
    assert imp.out_dir == tmp_path / "opentrans_imp"
    cfg.merge_from_list(["MODEL.OPENTRANS.IMP.PERIOD", "2", "MODEL.OPENTRANS.IMP.ROUNDS", "2"])
    saved = []

    def save(name):  # a checkpointer's save: runs before the round is committed in imp_state.json
        state = IMPRunner.read_state(tmp_path / "opentrans_imp")
        saved.append((name, state["rounds_done"] if state else 0))

    schedule = build_schedule_from_cfg(cfg, model, save=save)
    schedule.before_train(start_iter=0)
    for iteration in range(5):
        schedule.after_step(iteration)
    assert sorted(p.name for p in (tmp_path / "opentrans_imp").glob("round_*")) == [
        "round_001.safetensors", "round_002.safetensors"]
    assert saved == [("model_imp_round_01", 0), ("model_imp_round_02", 1)]
    assert all(name.startswith("backbone.") for name in masked_parameters(model))
    assert schedule.imp.last.arch == "open_clip/RN50"
    assert schedule.scalars() == {"opentrans/imp_round": 2.0, "opentrans/sparsity": schedule.imp.last.sparsity}


def test_imp_prefix_that_misses_the_tower_is_refused_before_the_first_round(tmp_path):
    """configs/hanovs.yaml's backbone. on an FC-CLIP model (tower at backbone.clip_model.visual.)."""
    from opentrans_hub.towers.backbones import open_clip_visual

    cfg = _cfg(tmp_path)
    cfg.merge_from_file(str(CONFIGS / "hanovs.yaml"))
    model = _model_at("backbone.clip_model.visual", open_clip_visual("RN50", device="meta"))
    schedule = build_schedule_from_cfg(cfg, model)
    with pytest.raises(OpenTransError, match=r"IMP prefix 'backbone\.' does not point at the open_clip/RN50 tower: "
                       r"'backbone\.clip_model\.visual\.conv2\.weight' would be saved as 'clip_model\.visual\.conv2"
                       r"\.weight'.*tower seems to sit at prefix 'backbone\.clip_model\.visual\.'"):
        schedule.before_train(start_iter=0)
    assert not (tmp_path / "opentrans_imp").exists()  # nothing written
    # a tower of another size under the right prefix (ARCH says RN50, the model holds a small ResNet)
    small = _model_at("backbone", make_tiny_resnet())
    with pytest.raises(OpenTransError, match=r"'backbone\.conv2\.weight' has shape \(8, 8, 3, 3\) but "
                       r"open_clip/RN50's 'conv2\.weight' is \(32, 32, 3, 3\)"):
        build_schedule_from_cfg(cfg, small).before_train(start_iter=0)
    cfg.merge_from_list(["MODEL.OPENTRANS.ARCH", "open_clip/RN-50", "MODEL.OPENTRANS.PLUGIN", ""])  # a typo in ARCH
    with pytest.raises(OpenTransError, match="open_clip has no model 'RN-50'"):
        build_schedule_from_cfg(cfg, small).before_train(start_iter=0)
    # the right prefix passes the check (names and shapes, meta tensors: nothing computed)
    check_canonical_scope(PruneScope().select(model, PREFIX_FCCLIP), "open_clip/RN50", PREFIX_FCCLIP)


def test_deeplab_fragment_drops_the_attention_pool(tmp_path):
    cfg = _cfg(tmp_path)
    cfg.merge_from_file(str(CONFIGS / "deeplabv3-opentrans.yaml"))
    donor = make_tiny_resnet(seed=4)
    sub = magnitude_prune(donor, sparsity=0.5, apply=False, scope=PruneScope(layer_types=("conv", "linear")))
    cfg.merge_from_list(["MODEL.OPENTRANS.SUBNETWORK", str(sub.save(tmp_path / "s.safetensors"))])
    tower = make_tiny_resnet()
    del tower.attnpool  # DeepLab's backbone has no attention pool
    model = _model_at("backbone", tower)
    schedule = build_schedule_from_cfg(cfg, model)
    schedule.before_train(start_iter=0)
    dropped = {source for source, _ in schedule.report.dropped}
    assert dropped == {n for n in sub.masks if n.startswith("attnpool.")} and dropped
    assert len(schedule.report.mapped) == len(sub) - len(dropped)


def test_build_model_helper_applies_the_selection_before_the_optimizer(tmp_path):
    """What a DefaultTrainer subclass's build_model does, then the hook's schedule with the trainer's optimizer."""
    from support.training import PREFIX, TinyClassifier, make_optimizer, step_trains_only_selected

    from opentrans_hub.formats.selection import LayerSelection

    def frozen_model():  # FC-CLIP freezes its CLIP tower when it builds the model
        model = TinyClassifier()
        for param in model.backbone.visual.parameters():
            param.requires_grad_(False)
        return model

    names = list(PruneScope(exclude_first=False).select(frozen_model().backbone.visual))
    selection = LayerSelection([{"name": n, "trainable": i % 3 == 0} for i, n in enumerate(names)], arch="tiny/RN")
    sub = magnitude_prune(TinyClassifier(seed=5).backbone.visual, sparsity=0.5, apply=False, arch="tiny/RN")
    cfg = _cfg(tmp_path)
    cfg.merge_from_list(["MODEL.OPENTRANS.PREFIX", PREFIX, "MODEL.OPENTRANS.ARCH", "tiny/RN",
                         "MODEL.OPENTRANS.SELECTION", str(selection.save(tmp_path / "sel.json")),
                         "MODEL.OPENTRANS.SUBNETWORK", str(sub.save(tmp_path / "sub.safetensors"))])

    # without the helper: the optimizer (built over trainable parameters, as detectron2 does) misses the tower
    model = frozen_model()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with pytest.raises(OpenTransError, match="optimizer does not hold.*opentrans_build_model"):
        build_schedule_from_cfg(cfg, model, optimizer=optimizer).before_train(start_iter=0)
    assert not any(p.requires_grad for p in model.backbone.visual.parameters()) and not masked_parameters(model)

    # with it: requires_grad and masks set at build time, the optimizer built afterwards holds the selection
    model = opentrans_build_model(cfg, frozen_model())
    trainable = {PREFIX + layer["name"] for layer in selection.layers if layer["trainable"]}
    assert {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("conv1.weight")} == {
        n for n in trainable if n.endswith("conv1.weight")}
    assert set(masked_parameters(model)) == {PREFIX + c for c in sub.masks}
    optimizer = make_optimizer(model)
    messages = []
    schedule = build_schedule_from_cfg(cfg, model, optimizer=optimizer, log=messages.append)
    schedule.before_train(start_iter=0)
    assert sum("when the model was built" in m for m in messages) == 2  # selection and subnetwork, not repeated
    params = step_trains_only_selected(model, optimizer, schedule, selection)
    for layer in selection.layers:
        if layer["name"] in sub.masks:  # the first conv stays dense
            assert (params[PREFIX + layer["name"]][~sub.masks[layer["name"]]] == 0).all()
    assert schedule.scalars() == {"opentrans/sparsity": sub.sparsity,
                                  "opentrans/trainable_params": schedule.trainable_params,
                                  "opentrans/trained_params": schedule.trainable_params}

    # a subnetwork on a schedule (BAKE_AT) stays with the hook, which knows where a resumed run starts
    cfg.merge_from_list(["MODEL.OPENTRANS.BAKE_AT", "5"])
    model = opentrans_build_model(cfg, frozen_model())
    assert not masked_parameters(model)
    with pytest.raises(OpenTransError, match="BAKE_AT is 5 but nothing saves the baked model"):
        build_schedule_from_cfg(cfg, model)


class _Storage:
    """detectron2's EventStorage.put_scalar signature (since 2023: cur_iter)."""

    def __init__(self):
        self.rows = []

    def put_scalar(self, name, value, smoothing_hint=True, cur_iter=None):
        self.rows.append((cur_iter, name, value, smoothing_hint))


class _Checkpointer:
    """What the hook uses of detectron2's DetectionCheckpointer: save(name, **extra) into save_dir."""

    def __init__(self, model, folder):
        self.model, self.save_dir, self.saved = model, str(folder), []

    def save(self, name, **extra):
        torch.save({"model": self.model.state_dict(), **extra}, Path(self.save_dir) / f"{name}.pth")
        self.saved.append((name, extra["iteration"]))


def test_hook_logic_saves_every_imp_round_and_the_last_into_model_final_logs_under_detectron2(tmp_path):
    """The hook's behaviour (detectron2 adds only HookBase) driven as detectron2's TrainerBase drives hooks, after
    a periodic checkpointer that writes model_final at the last iteration before our after_step runs."""
    import logging
    from types import SimpleNamespace

    from support.training import PREFIX, TinyClassifier, make_optimizer, train_step

    from opentrans_hub import Subnetwork
    from opentrans_hub.integrations.detectron2 import OpenTransHookLogic

    cfg = _cfg(tmp_path)
    cfg.merge_from_list(["MODEL.OPENTRANS.PREFIX", PREFIX, "MODEL.OPENTRANS.ARCH", "tiny/RN",
                         "MODEL.OPENTRANS.IMP.ENABLED", "True", "MODEL.OPENTRANS.IMP.PERIOD", "2",
                         "MODEL.OPENTRANS.IMP.ROUNDS", "3", "MODEL.OPENTRANS.IMP.RATE", "0.3"])
    model = TinyClassifier()
    optimizer = make_optimizer(model)
    checkpointer = _Checkpointer(model, tmp_path)
    trainer = SimpleNamespace(model=model, optimizer=optimizer, start_iter=0, max_iter=6, iter=0, storage=_Storage(),
                              checkpointer=checkpointer)
    d2_logger = logging.getLogger("detectron2")  # what detectron2's setup_logger configures (no propagation up)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    d2_logger.addHandler(handler)
    old_level = d2_logger.level
    d2_logger.setLevel(logging.DEBUG)
    try:
        hook = OpenTransHookLogic(cfg)
        hook.trainer = trainer
        hook.before_train()
        for iteration in range(6):
            trainer.iter = iteration
            hook.before_step()
            train_step(model, optimizer, iteration)
            if iteration == 5:  # detectron2's PeriodicCheckpointer runs before hooks registered after it
                checkpointer.save("model_final", iteration=iteration)
            hook.after_step()
        hook.after_train()
    finally:
        d2_logger.removeHandler(handler)
        d2_logger.setLevel(old_level)
    assert checkpointer.saved == [("model_imp_round_01", 1), ("model_imp_round_02", 3), ("model_final", 5),
                                  ("model_imp_round_03", 5), ("model_final", 5)]
    last = Subnetwork.load(tmp_path / "opentrans_imp" / "round_003.safetensors")
    final = torch.load(tmp_path / "model_final.pth", weights_only=True)["model"]
    assert all((final[PREFIX + c][~m] == 0).all() for c, m in last.masks.items())
    messages = [r.getMessage() for r in records if r.name == "detectron2.opentrans_hub"]
    assert "opentrans: IMP round 3 of 3 after iteration 5, sparsity 65.70%" in messages
    assert "opentrans: model_final saved again to hold IMP round 3" in messages
    rounds = [(it, value) for it, name, value, hint in trainer.storage.rows if name == "opentrans/imp_round"]
    assert rounds == [(None, 0.0), (1, 0.0), (2, 1.0), (3, 1.0), (4, 2.0), (5, 2.0), (6, 3.0)]
    assert all(hint is False for *_, hint in trainer.storage.rows)

    # a plain trainer without checkpointer and without OUTPUT_DIR: refused before anything runs
    cfg.OUTPUT_DIR = ""
    bare = OpenTransHookLogic(cfg)
    bare.trainer = SimpleNamespace(model=TinyClassifier(), optimizer=None, start_iter=0, max_iter=6, iter=0,
                                   storage=_Storage())
    with pytest.raises(OpenTransError, match="no checkpointer and cfg.OUTPUT_DIR is empty"):
        bare.before_train()


def test_hook_logic_on_an_event_storage_without_cur_iter_puts_before_each_step(tmp_path):
    """detectron2 before 2023: put_scalar has no cur_iter, so the state before a step goes into that step."""
    from types import SimpleNamespace

    from support.training import PREFIX, TinyClassifier

    from opentrans_hub.integrations.detectron2 import OpenTransHookLogic

    class OldStorage:
        def __init__(self):
            self.iter, self.rows = 0, []

        def put_scalar(self, name, value, smoothing_hint=True):
            self.rows.append((self.iter, name, value))

    sub = magnitude_prune(TinyClassifier(seed=5).backbone.visual, sparsity=0.5, apply=False, arch="tiny/RN")
    cfg = _cfg(tmp_path)
    cfg.merge_from_list(["MODEL.OPENTRANS.PREFIX", PREFIX, "MODEL.OPENTRANS.ARCH", "tiny/RN",
                         "MODEL.OPENTRANS.SUBNETWORK", str(sub.save(tmp_path / "s.safetensors")),
                         "MODEL.OPENTRANS.APPLY_AT", "1"])
    model = TinyClassifier()
    storage = OldStorage()
    hook = OpenTransHookLogic(cfg)
    hook.trainer = SimpleNamespace(model=model, optimizer=None, start_iter=0, max_iter=3, iter=0, storage=storage,
                                   checkpointer=_Checkpointer(model, tmp_path))
    hook.before_train()
    for iteration in range(3):
        hook.trainer.iter = storage.iter = iteration
        hook.before_step()
        hook.after_step()
    assert storage.rows == [(2, "opentrans/sparsity", sub.sparsity)]  # applied after iteration 1
