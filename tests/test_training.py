"""OpenTransSchedule on real training: apply at A, exact while training, bake at B, IMP rounds, selection."""

from __future__ import annotations

import pytest
import torch
from imp_worker import PREFIX, TinyClassifier, make_optimizer, train_step

from opentrans_hub import NameMap, OpenTransError, Subnetwork
from opentrans_hub.imp import IMPRunner, PruneScope, imp_sparsity, magnitude_prune
from opentrans_hub.selection import LayerSelection
from opentrans_hub.sparsity import masked_parameters
from opentrans_hub.training import OpenTransSchedule


@pytest.fixture
def subnetwork() -> Subnetwork:
    """A 60 % subnetwork found on a separately seeded tower, in canonical names."""
    donor = TinyClassifier(seed=7).backbone.visual
    return magnitude_prune(donor, sparsity=0.6, arch="tiny/RN", apply=False)


def _run(schedule: OpenTransSchedule, model, steps: int, start: int = 0, watch=None) -> list[float]:
    optimizer = make_optimizer(model)
    losses = []
    schedule.before_train(start_iter=start or None)
    for iteration in range(start, steps):
        losses.append(train_step(model, optimizer, iteration))
        schedule.after_step(iteration)
        if watch is not None:
            watch(iteration)
    schedule.after_train()
    return losses


def test_apply_at_keeps_exact_then_bakes_and_saves(subnetwork):
    model = TinyClassifier()
    params = dict(model.named_parameters())
    saved = {}

    def on_bake(iteration):
        saved[iteration] = {k: v.clone() for k, v in model.state_dict().items()}

    def watch(iteration):
        pruned = [params[PREFIX + c][~m] for c, m in subnetwork.masks.items()]
        if 3 <= iteration <= 8:  # applied after 3, baked after 8: zeros exact in between
            assert all((p == 0).all() for p in pruned), iteration
        if iteration < 3:
            assert all((p != 0).any() for p in pruned if p.numel()), iteration

    schedule = OpenTransSchedule(model, subnetwork=subnetwork, name_map=NameMap.prefix(PREFIX), apply_at=3,
                                 bake_at=8, on_bake=on_bake)
    losses = _run(schedule, model, steps=12, watch=watch)
    assert [event for _, event in schedule.events] == ["apply", "bake"]
    assert [it for it, _ in schedule.events] == [3, 8]
    assert schedule.report is not None and len(schedule.report.mapped) == len(subnetwork)
    assert list(saved) == [8]
    for canonical, keep in subnetwork.masks.items():
        assert (saved[8][PREFIX + canonical][~keep] == 0).all()
    assert masked_parameters(model) == {}  # baked: plain modules again
    # after the bake the weights may regrow (that is what baking means); training went on and learned
    assert any((params[PREFIX + c][~m] != 0).any() for c, m in subnetwork.masks.items())
    assert sum(losses[-3:]) < sum(losses[:3])


def test_apply_before_training_and_resume_rules(subnetwork, tmp_path):
    path = subnetwork.save(tmp_path / "sub.safetensors")
    model = TinyClassifier()
    schedule = OpenTransSchedule(model, subnetwork=str(path), name_map=NameMap.prefix(PREFIX))
    schedule.before_train()
    assert schedule.applied and set(masked_parameters(model)) == {PREFIX + c for c in subnetwork.masks}

    # resumed after apply_at: masks re-registered at once; resumed after bake_at: nothing applied
    resumed = TinyClassifier()
    late = OpenTransSchedule(resumed, subnetwork=subnetwork, name_map=NameMap.prefix(PREFIX), apply_at=5, bake_at=9)
    late.before_train(start_iter=7)
    assert late.applied and masked_parameters(resumed)
    done = TinyClassifier()
    past = OpenTransSchedule(done, subnetwork=subnetwork, name_map=NameMap.prefix(PREFIX), apply_at=5, bake_at=9)
    past.before_train(start_iter=10)
    assert past.baked and not past.applied and not masked_parameters(done)

    with pytest.raises(OpenTransError, match="no subnetwork"):
        OpenTransSchedule(model, apply_at=3)
    with pytest.raises(OpenTransError, match="before apply_at"):
        OpenTransSchedule(model, subnetwork=subnetwork, apply_at=5, bake_at=2)
    wrong = OpenTransSchedule(TinyClassifier(), subnetwork=subnetwork, name_map=NameMap.prefix("nowhere."),
                              strict=True)
    with pytest.raises(OpenTransError, match="strict"):
        wrong.before_train()


def test_imp_rounds_through_the_schedule_on_top_of_a_subnetwork(subnetwork, tmp_path):
    model = TinyClassifier()
    imp = IMPRunner(model, rate=0.25, rounds=3, period=3, prefix=PREFIX, arch="tiny/RN", out_dir=tmp_path)
    schedule = OpenTransSchedule(model, subnetwork=subnetwork, name_map=NameMap.prefix(PREFIX), imp=imp)
    _run(schedule, model, steps=10)
    rounds = [event for _, event in schedule.events if event.startswith("imp")]
    assert rounds == ["imp round 1", "imp round 2", "imp round 3"]
    final = imp.last
    assert final.nested_in(subnetwork)  # IMP narrows the applied subnetwork
    # already 60 % sparse: round k reaches max(60 %, compounding target) of the scope
    assert final.sparsity == pytest.approx(max(subnetwork.sparsity, imp_sparsity(0.25, 3)), abs=1 / final.numel)
    with pytest.raises(OpenTransError, match="another model"):
        OpenTransSchedule(TinyClassifier(), imp=imp)


def test_layer_selection_freezes_what_it_says(tmp_path):
    model = TinyClassifier()
    scope = PruneScope(exclude_first=False).select(model.backbone.visual)
    names = list(scope)
    layers = [{"name": n, "trainable": i % 2 == 0} for i, n in enumerate(names)]
    selection = LayerSelection(layers, arch="tiny/RN", policy={"name": "alternate"})
    path = selection.save(tmp_path / "sel.json")
    schedule = OpenTransSchedule(model, selection=str(path), selection_map=NameMap.prefix(PREFIX))
    before = {k: v.clone() for k, v in model.named_parameters()}
    _run(schedule, model, steps=3)
    params = dict(model.named_parameters())
    for layer in layers:
        full = PREFIX + layer["name"]
        assert params[full].requires_grad == layer["trainable"]
        assert torch.equal(params[full], before[full]) != layer["trainable"], full
    assert params["head.weight"].requires_grad  # outside the tower: untouched
    assert not torch.equal(params["head.weight"], before["head.weight"])
