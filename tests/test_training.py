"""OpenTransSchedule on real training: apply at A, exact while training, bake at B, IMP rounds, selection."""

from __future__ import annotations

import pytest
import torch
from support.training import (
    PREFIX,
    TinyClassifier,
    alternate_selection,
    make_optimizer,
    step_trains_only_selected,
    train_step,
)

from opentrans_hub import NameMap, OpenTransError, Subnetwork
from opentrans_hub.formats.selection import LayerSelection
from opentrans_hub.integrations.training import OpenTransSchedule
from opentrans_hub.methods.imp import IMPRunner, PruneScope, imp_sparsity, magnitude_prune
from opentrans_hub.sparsity.masks import masked_parameters


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


def _freeze_tower(model) -> None:
    for param in model.backbone.visual.parameters():
        param.requires_grad_(False)


def test_selection_refuses_parameters_the_optimizer_does_not_hold():
    """The optimizer was built over the head only (tower frozen): unfreezing tower layers would train nothing."""
    model = TinyClassifier()
    _freeze_tower(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    selection = alternate_selection(model)
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    schedule = OpenTransSchedule(model, selection=selection, selection_map=NameMap.prefix(PREFIX), optimizer=optimizer)
    with pytest.raises(OpenTransError,
                       match=r"first backbone\.visual\.conv1\.weight\) trainable that the optimizer does not hold"):
        schedule.before_train()
    assert {name: p.requires_grad for name, p in model.named_parameters()} == before  # nothing half-applied

    # built-time application (what opentrans_build_model does): the optimizer built afterwards holds them
    from opentrans_hub.integrations.training import apply_layer_selection, mark_built

    report = apply_layer_selection(model, selection, NameMap.prefix(PREFIX))
    mark_built(model, "selection", selection.sha256, report)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, weight_decay=1e-3)
    messages = []
    schedule = OpenTransSchedule(model, selection=selection, selection_map=NameMap.prefix(PREFIX),
                                 optimizer=optimizer, log=messages.append)
    schedule.before_train()
    assert schedule.selection_result is report  # used, not repeated
    assert any("applied when the model was built" in m for m in messages)
    params = step_trains_only_selected(model, optimizer, schedule, selection)
    assert schedule.trained_params == schedule.trainable_params > 0
    # an optimizer that lost a parameter after the build is caught too
    short = torch.optim.SGD([params["head.weight"]], lr=0.1)
    with pytest.raises(OpenTransError, match="optimizer does not hold"):
        OpenTransSchedule(model, selection=selection, selection_map=NameMap.prefix(PREFIX),
                          optimizer=short).before_train()


class _NoGradTower(TinyClassifier):
    """FC-CLIP's pattern: the CLIP tower runs under torch.no_grad, only the head learns."""

    def forward(self, x):
        with torch.no_grad():
            features = self.backbone.visual(x)
        return self.head(features)


def test_selection_on_a_tower_run_without_gradients_is_reported():
    model = _NoGradTower()
    selection = alternate_selection(model)
    schedule = OpenTransSchedule(model, selection=selection, selection_map=NameMap.prefix(PREFIX))
    optimizer = make_optimizer(model)
    schedule.before_train()
    train_step(model, optimizer, 0)
    with pytest.warns(UserWarning, match=r"got no gradient in iteration 0, so they do not train: .*torch.no_grad"):
        schedule.after_step(0)
    assert schedule.trainable_params > 0 and schedule.trained_params == 0
    scalars = schedule.scalars()
    assert scalars["opentrans/trainable_params"] == schedule.trainable_params
    assert scalars["opentrans/trained_params"] == 0.0
    train_step(model, optimizer, 1)
    schedule.after_step(1)  # said once, not every step

    trained = TinyClassifier()  # the same selection on a tower that does get gradients: no warning
    warned = []
    schedule = OpenTransSchedule(trained, selection=alternate_selection(trained), selection_map=NameMap.prefix(PREFIX),
                                 warn=warned.append)
    optimizer = make_optimizer(trained)
    schedule.before_train()
    train_step(trained, optimizer, 0)
    schedule.after_step(0)
    assert warned == [] and schedule.trained_params == schedule.trainable_params


def test_log_lines_say_when_things_ran_and_scalars_follow(subnetwork, tmp_path):
    messages = []
    model = TinyClassifier()
    OpenTransSchedule(model, subnetwork=subnetwork, name_map=NameMap.prefix(PREFIX), log=messages.append).before_train()
    resumed = OpenTransSchedule(TinyClassifier(), subnetwork=subnetwork, name_map=NameMap.prefix(PREFIX), apply_at=1,
                                log=messages.append)
    resumed.before_train(start_iter=3)
    late = OpenTransSchedule(TinyClassifier(), subnetwork=subnetwork, name_map=NameMap.prefix(PREFIX), apply_at=1,
                             bake_at=2, on_bake=lambda it: None, log=messages.append)
    late.before_train()
    assert late.scalars() == {}  # nothing applied yet
    late.after_step(0)
    late.after_step(1)
    late.after_step(2)
    assert messages[0].endswith("%) before training") and "at 0" not in messages[0]
    assert messages[1].endswith("%) before iteration 3 (resumed)")
    assert messages[2].endswith("after iteration 1") and messages[3] == "opentrans: baked masks after iteration 2"
    assert late.scalars() == {"opentrans/sparsity": subnetwork.sparsity}

    imp_model = TinyClassifier()
    imp = IMPRunner(imp_model, rate=0.5, rounds=2, period=2, prefix=PREFIX, arch="tiny/RN", out_dir=tmp_path)
    schedule = OpenTransSchedule(imp_model, imp=imp, log=messages.append)
    schedule.before_train()
    assert schedule.scalars() == {"opentrans/imp_round": 0.0, "opentrans/sparsity": 0.0}
    schedule.after_step(0)
    schedule.after_step(1)
    assert messages[-1] == "opentrans: IMP round 1 of 2 after iteration 1, sparsity 50.00%"
    assert schedule.scalars() == {"opentrans/imp_round": 1.0, "opentrans/sparsity": imp.last.sparsity}
    resumed = IMPRunner(imp_model, rate=0.5, rounds=2, period=2, prefix=PREFIX, arch="tiny/RN", out_dir=tmp_path)
    OpenTransSchedule(imp_model, imp=resumed, log=messages.append).before_train(start_iter=2)
    assert messages[-1] == f"opentrans: IMP resumed from {tmp_path}: round 1 of 2 restored (sparsity 50.00%)"


_DDP_SELECTION = """
import sys, torch, torch.distributed as dist
from support.training import PREFIX, TinyClassifier, alternate_selection
from opentrans_hub import NameMap, OpenTransError
from opentrans_hub.integrations.training import OpenTransSchedule
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[1], rank=0, world_size=1)
model = TinyClassifier()
selection = alternate_selection(model)
ddp = torch.nn.parallel.DistributedDataParallel(model)
try:
    OpenTransSchedule(ddp, selection=selection, selection_map=NameMap.prefix(PREFIX)).before_train()
except OpenTransError as exc:
    print("refused:", exc, "| all trainable:", all(p.requires_grad for p in model.parameters()))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_selection_after_the_ddp_wrapper_is_refused():
    """DDP reduces the gradients of what was trainable when it was built: a selection after it must not pass."""
    import subprocess
    import sys

    from support.processes import free_port, worker_env

    done = subprocess.run([sys.executable, "-c", _DDP_SELECTION, str(free_port())], env=worker_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "refused: the layer selection must be applied before the DistributedDataParallel wrapper" in done.stdout
    assert "| all trainable: True" in done.stdout  # nothing changed
