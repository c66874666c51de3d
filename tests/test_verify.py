"""verify_exact, export_subnetwork and the periodic proof in the schedule / detectron2 config (issue 11, req. 6)."""

from __future__ import annotations

import pytest
import torch
from support.sparsity import conv_masks
from support.towers import make_tiny_resnet
from support.training import PREFIX, TinyClassifier, make_optimizer, train_step
from yacs.config import CfgNode

from opentrans_hub import NameMap, OpenTransError, Subnetwork, apply_masks, bake, export_subnetwork, verify_exact
from opentrans_hub.integrations.detectron2 import add_opentrans_config, build_schedule_from_cfg
from opentrans_hub.integrations.training import OpenTransSchedule


def test_verify_exact_counts_moved_and_nan_weights_and_refuses_unmasked_models():
    model = make_tiny_resnet(width=8)
    with pytest.raises(OpenTransError, match="no masks"):
        verify_exact(model)
    masks = conv_masks(model)
    apply_masks(model, masks)
    report = verify_exact(model)
    assert report == {"tensors": len(masks), "pruned": sum(int((~m).sum()) for m in masks.values()),
                      "violations": 0, "bad": []}
    params = dict(model.named_parameters())
    first, second = sorted(masks)[:2]
    with torch.no_grad():
        params[first][~masks[first]] = 1e-30  # tiny is not zero
        params[second].view(-1)[int(torch.nonzero(~masks[second].view(-1))[0])] = float("nan")
    report = verify_exact(model, raise_on_violation=False)
    assert report["violations"] == int((~masks[first]).sum()) + 1
    assert report["bad"] == sorted([first, second], key=list(masks).index)
    with pytest.raises(OpenTransError, match=f"{report['violations']} of {report['pruned']} pruned weights"):
        verify_exact(model)
    bake(model)
    with pytest.raises(OpenTransError, match="no masks"):
        verify_exact(model)


def test_export_subnetwork_gives_back_what_was_applied_in_canonical_names():
    model = TinyClassifier()
    tower = model.backbone.visual
    masks = conv_masks(tower, sparsity=0.7)
    sub = Subnetwork(masks, arch="tiny/RN")
    apply_masks(model, {PREFIX + n: m for n, m in masks.items()})
    exported = export_subnetwork(model, arch="tiny/RN", prefix=PREFIX)
    assert exported.sha256 == sub.sha256 and exported.arch == "tiny/RN"
    with pytest.raises(OpenTransError, match="no masks under prefix"):
        export_subnetwork(model, prefix="head.")


def _run_with_sabotage(schedule: OpenTransSchedule, model, steps: int, sabotage_at: int, masks,
                       done: list[int] | None = None) -> list[int]:
    """Train ``steps`` iterations; ``done`` collects each iteration whose ``after_step`` returned."""
    optimizer = make_optimizer(model)
    params = dict(model.named_parameters())
    schedule.before_train()
    done = [] if done is None else done
    for iteration in range(steps):
        train_step(model, optimizer, iteration)
        if iteration == sabotage_at:  # an update outside torch.optim that knows nothing of masks (EMA, hand edit)
            name = sorted(masks)[0]
            with torch.no_grad():
                params[PREFIX + name][~masks[name]] += 0.01
        schedule.after_step(iteration)
        done.append(iteration)
    return done


def test_schedule_verifies_every_n_and_fails_loudly_on_a_violation():
    model = TinyClassifier()
    masks = conv_masks(model.backbone.visual, sparsity=0.6)
    sub = Subnetwork(masks, arch="tiny/RN")
    with pytest.raises(OpenTransError, match="verify_every"):
        OpenTransSchedule(model, subnetwork=sub, verify_every=0)
    schedule = OpenTransSchedule(model, subnetwork=sub, name_map=NameMap.prefix(PREFIX), verify_every=2)
    done = _run_with_sabotage(schedule, model, steps=4, sabotage_at=99, masks=masks)
    assert done == [0, 1, 2, 3]
    assert [(it, ev) for it, ev in schedule.events if ev == "verify"] == [(1, "verify"), (3, "verify")]
    # a pruned weight moved at iteration 4: the next verification (after iteration 5) raises, not a later one
    model = TinyClassifier()
    schedule = OpenTransSchedule(model, subnetwork=sub, name_map=NameMap.prefix(PREFIX), verify_every=2)
    done: list[int] = []
    with pytest.raises(OpenTransError, match="pruned weights are not exactly 0.0"):
        _run_with_sabotage(schedule, model, steps=8, sabotage_at=4, masks=masks, done=done)
    assert done == [0, 1, 2, 3, 4]


def test_detectron2_verify_period_key_reaches_the_schedule(tmp_path):
    cfg = CfgNode()
    cfg.MODEL = CfgNode()
    add_opentrans_config(cfg)
    assert cfg.MODEL.OPENTRANS.VERIFY_PERIOD == 0
    model = TinyClassifier()
    assert build_schedule_from_cfg(cfg, model).verify_every is None
    cfg.merge_from_list(["MODEL.OPENTRANS.VERIFY_PERIOD", "50"])
    assert build_schedule_from_cfg(cfg, model).verify_every == 50
