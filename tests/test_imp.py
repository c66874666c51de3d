"""Scope selection, rounds, tie-breaking and rewinding of magnitude pruning on real open_clip towers."""

from __future__ import annotations

import math
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from support.processes import worker, worker_env
from support.training import PREFIX, TinyClassifier, make_optimizer, run_resume, train_step
from torch import nn

from opentrans_hub import OpenTransError, Subnetwork
from opentrans_hub.methods.imp import IMPRunner, PruneScope, imp_sparsity, magnitude_masks, magnitude_prune
from opentrans_hub.sparsity.masks import masked_parameters
from opentrans_hub.sparsity.stats import model_sparsity


def _reference_masks(weights: dict[str, torch.Tensor], count: int) -> dict[str, torch.Tensor]:
    """Brute force: prune the `count` smallest (|w|, tensor order, flat index) with a full stable sort."""
    values = np.concatenate([w.abs().reshape(-1).numpy().astype(np.float64) for w in weights.values()])
    layer = np.concatenate([np.full(w.numel(), i) for i, w in enumerate(weights.values())])
    index = np.concatenate([np.arange(w.numel()) for w in weights.values()])
    order = np.lexsort((index, layer, values))
    keep = np.ones(values.size, dtype=bool)
    keep[order[:count]] = False
    out, offset = {}, 0
    for name, w in weights.items():
        out[name] = torch.from_numpy(keep[offset:offset + w.numel()].reshape(w.shape).copy())
        offset += w.numel()
    return out


# ------------------------------------------------------------------------------------------ scope
def test_default_scope_is_every_conv_but_the_first(tiny_resnet):
    selected = PruneScope().select(tiny_resnet)
    convs = [f"{n}.weight" for n, m in tiny_resnet.named_modules() if isinstance(m, nn.Conv2d)]
    assert convs[0] == "conv1.weight"
    assert list(selected) == convs[1:]
    assert all(full == canonical for canonical, (full, _) in selected.items())
    keep_first = PruneScope(exclude_first=False).select(tiny_resnet)
    assert list(keep_first) == convs


def test_scope_options_linear_regex_and_prefix(tiny_resnet):
    linear = PruneScope(layer_types=("linear",)).select(tiny_resnet)
    assert set(linear) == {f"attnpool.{p}_proj.weight" for p in ("q", "k", "v", "c")}
    both = PruneScope(layer_types=("conv", "linear")).select(tiny_resnet)
    assert len(both) == len(PruneScope().select(tiny_resnet)) + 4
    only_layer4 = PruneScope(include=r"^layer4\.", exclude=r"downsample").select(tiny_resnet)
    assert only_layer4 and all(n.startswith("layer4.") and "downsample" not in n for n in only_layer4)

    model = TinyClassifier()
    nested = PruneScope().select(model, prefix=PREFIX)
    flat = PruneScope().select(model.backbone.visual)
    assert list(nested) == list(flat)
    assert all(full == PREFIX + canonical for canonical, (full, _) in nested.items())
    with pytest.raises(OpenTransError, match="no module under prefix"):
        PruneScope().select(model, prefix="backbone.clip_model.visual.")
    with pytest.raises(OpenTransError, match="selects no tensor"):
        PruneScope(include="no-such-layer").select(tiny_resnet)
    with pytest.raises(OpenTransError):
        PruneScope(layer_types=("attention",))


def test_vit_scope_covers_fused_attention_and_mlp():
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_ratio=2.0, output_dim=16)
    scope = PruneScope(layer_types=("conv", "linear"))
    names = set(scope.select(vit))
    assert "conv1.weight" not in names  # the patch embedding is the first conv
    assert {"transformer.resblocks.0.attn.in_proj_weight", "transformer.resblocks.1.mlp.c_fc.weight",
            "transformer.resblocks.1.attn.out_proj.weight"} <= names
    sub = magnitude_prune(vit, sparsity=0.5, scope=scope)
    assert sub.sparsity == pytest.approx(0.5, abs=1 / sub.numel)


# ------------------------------------------------------------------------------------------ ranking
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_global_ranking_matches_a_full_stable_sort_with_many_ties(seed):
    g = torch.Generator().manual_seed(seed)
    # integer-valued weights in a tiny range: thousands of exact ties, signs included
    weights = {f"l{i}.weight": torch.randint(-4, 5, shape, generator=g).float()
               for i, shape in enumerate([(7, 3, 3, 3), (5, 5, 1, 1), (64,), (3, 11)])}
    total = sum(w.numel() for w in weights.values())
    for sparsity in (0.1, 0.37, 0.5, 0.89):
        ours = magnitude_masks(weights, sparsity=sparsity)
        count = total - round(total * (1 - sparsity))
        expected = _reference_masks(weights, count)
        for name in weights:
            assert torch.equal(ours[name], expected[name]), (seed, sparsity, name)
        again = magnitude_masks({k: v.clone() for k, v in weights.items()}, sparsity=sparsity)
        assert all(torch.equal(again[n], ours[n]) for n in weights)


def test_threshold_is_exact_on_continuous_weights(tiny_resnet):
    weights = {c: p for c, (_, p) in PruneScope().select(tiny_resnet).items()}
    total = sum(w.numel() for w in weights.values())
    masks = magnitude_masks(weights, sparsity=0.73)
    expected = _reference_masks({k: v.detach() for k, v in weights.items()}, total - round(total * 0.27))
    assert all(torch.equal(masks[n], expected[n]) for n in weights)


def test_rate_prunes_a_fraction_of_the_live_weights_and_never_regrows():
    g = torch.Generator().manual_seed(3)
    weights = {"a": torch.randn(40, 10, generator=g), "b": torch.randn(300, generator=g)}
    current = {"a": torch.rand(40, 10, generator=g) > 0.5, "b": torch.rand(300, generator=g) > 0.2}
    alive = sum(int(m.sum()) for m in current.values())
    out = magnitude_masks(weights, current, rate=0.3)
    kept = sum(int(m.sum()) for m in out.values())
    assert kept == round(alive * 0.7)
    assert all(not (out[n] & ~current[n]).any() for n in weights)
    # a sparsity below what is already pruned prunes nothing
    same = magnitude_masks(weights, current, sparsity=0.01)
    assert all(torch.equal(same[n], current[n]) for n in weights)
    with pytest.raises(OpenTransError, match="exactly one"):
        magnitude_masks(weights, sparsity=0.5, rate=0.1)
    with pytest.raises(OpenTransError):
        magnitude_masks(weights, sparsity=1.5)


def test_rounds_are_nested_and_follow_the_compounding_schedule(tiny_resnet):
    rate, subs = 0.1, []
    for k in range(1, 8):
        subs.append(magnitude_prune(tiny_resnet, sparsity=imp_sparsity(rate, k), arch="tiny"))
        total = subs[-1].numel
        assert abs(subs[-1].masked - total * imp_sparsity(rate, k)) <= 1  # global: within one weight
        assert model_sparsity(tiny_resnet)["zeros"] >= subs[-1].masked  # the model holds the zeros
    for earlier, later in zip(subs, subs[1:]):
        assert later.nested_in(earlier) and not earlier.nested_in(later)
    assert set(masked_parameters(tiny_resnet)) == set(subs[0].masks)


def test_layerwise_ranking_hits_the_target_in_every_layer(tiny_resnet):
    sub = magnitude_prune(tiny_resnet, sparsity=0.6, scope=PruneScope(ranking="layerwise"), apply=False)
    for layer in sub.layers():
        assert abs(layer.masked - 0.6 * layer.numel) <= 0.5 + 1e-9


def test_min_density_stops_global_pruning_from_emptying_layers(tiny_resnet):
    plain = magnitude_prune(tiny_resnet, sparsity=0.95, apply=False)
    emptied = [layer.name for layer in plain.layers() if layer.kept == 0]
    assert emptied, "random init should lose whole layers at 95 % global"
    floor = 0.02
    guarded = magnitude_prune(tiny_resnet, sparsity=0.95, scope=PruneScope(min_density=floor), apply=False)
    assert guarded.masked == plain.masked  # the same total sparsity, redistributed
    for layer in guarded.layers():
        assert layer.kept >= math.ceil(floor * layer.numel)
    # layers far above the floor are ranked by the same global threshold as before
    untouched = [layer.name for layer in plain.layers() if layer.kept >= 3 * math.ceil(floor * layer.numel)]
    assert untouched
    for name in untouched:
        assert (guarded[name] & ~plain[name]).sum() == 0  # they only lose weights to pay for the floors


def test_provenance_of_a_one_shot_prune(tiny_resnet):
    sub = magnitude_prune(tiny_resnet, sparsity=0.5, arch="open_clip/tiny", provenance={"base_weights_sha256": "x"})
    assert sub.arch == "open_clip/tiny"
    assert sub.provenance["method"] == "magnitude"
    assert sub.provenance["settings"]["sparsity"] == 0.5
    assert sub.provenance["settings"]["scope"]["exclude_first"] is True
    assert sub.provenance["base_weights_sha256"] == "x"
    restored = Subnetwork.from_bytes(sub.to_bytes())
    assert restored.provenance["settings"] == sub.provenance["settings"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_ranking_equals_cpu_ranking(tiny_resnet):
    weights = {c: p.detach() for c, (_, p) in PruneScope().select(tiny_resnet).items()}
    cpu = magnitude_masks(weights, sparsity=0.8)
    gpu = magnitude_masks({k: v.cuda() for k, v in weights.items()}, sparsity=0.8)
    assert all(torch.equal(cpu[n], gpu[n].cpu()) for n in weights)


# ------------------------------------------------------------------------------------------ IMP runner
def _train_with_runner(runner: IMPRunner, model: nn.Module, steps: int, snapshots: dict | None = None) -> list:
    optimizer = make_optimizer(model)
    runner.before_train()
    produced = []
    for iteration in range(steps):
        train_step(model, optimizer, iteration)
        if snapshots is not None:
            snapshots[iteration] = {k: v.clone() for k, v in model.backbone.visual.state_dict().items()}
        sub = runner.after_step(iteration)
        if sub is not None:
            produced.append((iteration, sub))
    return produced


def test_imp_rounds_on_real_training(tmp_path):
    model = TinyClassifier()
    runner = IMPRunner(model, rate=0.2, rounds=3, period=4, prefix=PREFIX, arch="tiny/RN", out_dir=tmp_path)
    produced = _train_with_runner(runner, model, steps=14)
    assert [it for it, _ in produced] == [3, 7, 11]
    for k, (iteration, sub) in enumerate(produced, 1):
        assert sub.provenance["method"] == "imp" and sub.provenance["round"] == k
        assert sub.provenance["iteration"] == iteration
        assert sub.provenance["rewind"] == {"to": "none"}
        assert sub.provenance["base_weights_sha256"] == runner.base_weights_sha256
        assert abs(sub.masked - sub.numel * imp_sparsity(0.2, k)) <= 1
        on_disk = Subnetwork.load(tmp_path / f"round_{k:03d}.safetensors")
        assert on_disk.sha256 == sub.sha256
    assert produced[1][1].provenance["parent_sha256"] == produced[0][1].sha256
    assert produced[2][1].nested_in(produced[1][1]) and produced[1][1].nested_in(produced[0][1])
    # pruned weights stayed exactly zero through the training steps after each round
    final = produced[-1][1]
    visual = model.backbone.visual
    params = dict(visual.named_parameters())
    for name, keep in final.masks.items():
        assert (params[name][~keep] == 0).all()
    state = IMPRunner.read_state(tmp_path)
    assert state["rounds_done"] == 3 and [r["sha256"] for r in state["rounds"]] == [s.sha256 for _, s in produced]
    assert runner.finished and runner.after_step(15) is None


@pytest.mark.parametrize("rewind", [0, 2])
def test_rewinding_restores_the_surviving_weights(tmp_path, rewind):
    model = TinyClassifier()
    initial = {k: v.clone() for k, v in model.backbone.visual.state_dict().items()}
    runner = IMPRunner(model, rate=0.3, rounds=2, period=3, prefix=PREFIX, rewind=rewind, out_dir=tmp_path)
    snapshots: dict = {}
    optimizer = make_optimizer(model)
    runner.before_train()
    for iteration in range(3):
        train_step(model, optimizer, iteration)
        snapshots[iteration] = {k: v.clone() for k, v in model.backbone.visual.state_dict().items()}
        runner.after_step(iteration)
    target = initial if rewind == 0 else snapshots[rewind - 1]
    sub = runner.last
    assert sub.provenance["rewind"]["to"] == ("init" if rewind == 0 else "iteration")
    assert sub.provenance["rewind"]["iteration"] == rewind
    state = model.backbone.visual.state_dict()
    for name, value in state.items():
        expected = target[name]
        if name in sub.masks:
            expected = expected * sub.masks[name]
        assert torch.equal(value, expected), name
    assert (tmp_path / "rewind.safetensors").is_file()
    assert IMPRunner.read_state(tmp_path)["rewind"]["iteration"] == rewind


def test_runner_refuses_bad_settings_and_foreign_state(tmp_path):
    model = TinyClassifier()
    with pytest.raises(OpenTransError, match="rewind iteration"):
        IMPRunner(model, period=3, rewind=5, prefix=PREFIX)
    with pytest.raises(OpenTransError):
        IMPRunner(model, rate=1.5)
    runner = IMPRunner(model, rate=0.2, rounds=2, period=1, prefix=PREFIX, out_dir=tmp_path)
    runner.before_train()
    runner.after_step(0)
    other = IMPRunner(TinyClassifier(), rate=0.3, rounds=2, period=1, prefix=PREFIX, out_dir=tmp_path)
    with pytest.raises(OpenTransError, match="settings differ"):
        other.before_train()
    (tmp_path / "imp_state.json").write_text("{not json")
    with pytest.raises(OpenTransError, match="imp_state.json"):
        IMPRunner.read_state(tmp_path)


def test_resume_restores_only_rounds_before_start_iter(tmp_path):
    model = TinyClassifier()
    runner = IMPRunner(model, rate=0.2, rounds=3, period=2, prefix=PREFIX, out_dir=tmp_path)
    produced = _train_with_runner(runner, model, steps=6)
    assert len(produced) == 3
    fresh = TinyClassifier()
    resumed = IMPRunner(fresh, rate=0.2, rounds=3, period=2, prefix=PREFIX, out_dir=tmp_path)
    resumed.before_train(start_iter=4)  # a framework checkpoint from iteration 4: rounds at 1 and 3 done
    assert resumed.rounds_done == 2 and resumed.last.sha256 == produced[1][1].sha256
    masks = masked_parameters(fresh)
    assert all(torch.equal(masks[PREFIX + c], m) for c, m in produced[1][1].masks.items())
    assert resumed.after_step(5).sha256 != produced[1][1].sha256


# ------------------------------------------------------------------------------------------ resume (killed)
def _run_worker(out_dir: Path, steps: int, *extra: str, wait: bool = True) -> subprocess.Popen:
    proc = subprocess.Popen(worker("imp_worker") + ["resume", str(out_dir), str(steps), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=worker_env())
    if wait:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    return proc


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_masks(tmp_path):
    steps = 13  # rounds after iterations 2, 5, 8, 11
    reference = tmp_path / "reference"
    run_resume(str(reference), steps, 0.0)  # uninterrupted, in this process
    interrupted = tmp_path / "interrupted"
    proc = _run_worker(interrupted, steps, "--sleep-after-round", "60", wait=False)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            state = IMPRunner.read_state(interrupted) if (interrupted / "imp_state.json").exists() else None
            if state and state["rounds_done"] >= 1:
                break
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            time.sleep(0.2)
        else:
            pytest.fail("the first round never finished")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not (interrupted / "final.safetensors").exists()
    assert IMPRunner.read_state(interrupted)["rounds_done"] == 1
    _run_worker(interrupted, steps)
    final_ref = Subnetwork.load(reference / "final.safetensors")
    final_res = Subnetwork.load(interrupted / "final.safetensors")
    assert final_res.sha256 == final_ref.sha256
    state_ref, state_res = IMPRunner.read_state(reference), IMPRunner.read_state(interrupted)
    assert [r["sha256"] for r in state_res["rounds"]] == [r["sha256"] for r in state_ref["rounds"]]
    assert state_res["rounds_done"] == 4
    assert not list(interrupted.glob(".*.tmp"))  # atomic writes leave no temporary files
