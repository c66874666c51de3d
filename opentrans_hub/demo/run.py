"""``opentrans-hub demo``: the whole product, end to end, on a fresh machine with no data and no network.

1. build the open_clip RN50 visual tower (random init unless real CLIP weights are given);
2. compute its spectral layer selection (power-law alpha, the paper's median policy), and find a subnetwork
   with a short IMP run on the embedded synthetic segmentation task (:mod:`opentrans_hub.demo.synthetic`);
3. publish both into a registry under the output folder and reload them by name (and through
   ``torch.hub.load(..., source="local")`` when running from a source checkout);
4. transfer both, through the installed plugins, onto three framework layouts (:mod:`.demo_layouts`) and
   fine-tune each a few steps with the sparsity kept exact and the selection applied;
5. measure everything in the table (parameters, sparsity after training, trainable parameters, FLOPs),
   write the plots and a JSON summary.

Every figure is measured in the run; nothing is hard-coded.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import OpenTransError
from ..io.atomic import atomic_write_text

ARCH = "open_clip/RN50"
SUBNETWORK_NAME = "demo-rn50-imp"
SELECTION_NAME = "demo-rn50-median"


@dataclass(frozen=True)
class DemoSize:
    """How much work each stage does; ``quick`` is for tests and smoke runs."""

    image_size: int = 64
    batch: int = 4
    imp_rounds: int = 4
    imp_rate: float = 0.42  # 1 - 0.58**4 = 88.7 %, about the paper's 21 rounds at 10 %
    steps_per_round: int = 5
    finetune_steps: int = 5
    min_density: float = 0.02  # global ranking on random weights would otherwise empty whole layers


FULL = DemoSize()
QUICK = DemoSize(image_size=32, batch=2, imp_rounds=2, imp_rate=0.5, steps_per_round=1, finetune_steps=2)


def _stage(progress: bool, total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not progress, file=sys.stderr, leave=False, dynamic_ncols=True)


def _train_steps(model: nn.Module, steps: int, size: DemoSize, seed: int, on_step: Callable[[int], Any] | None = None,
                 bar=None) -> list[float]:
    """SGD with momentum and weight decay on the synthetic task; returns the loss of every step."""
    from .synthetic import batches

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.02, momentum=0.9, weight_decay=1e-4)
    model.train()
    losses = []
    for step, (images, labels) in enumerate(batches(steps, size.batch, size.image_size, seed=seed)):
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step)
        if bar is not None:
            bar.update(1)
    model.eval()
    return losses


def _hub_roundtrip(registry_root: Path) -> dict[str, Any]:
    """Reload the subnetwork through torch.hub's local source when hubconf.py sits beside the package."""
    repo = Path(__file__).resolve().parents[2]
    if not (repo / "hubconf.py").is_file():
        return {"torch_hub": "skipped: not running from a source checkout (no hubconf.py)"}
    previous = os.environ.get("OPENTRANS_HUB_HOME")
    os.environ["OPENTRANS_HUB_HOME"] = str(registry_root)
    try:
        sub = torch.hub.load(str(repo), "subnetwork", SUBNETWORK_NAME, source="local", trust_repo=True)
    finally:
        if previous is None:
            os.environ.pop("OPENTRANS_HUB_HOME", None)
        else:
            os.environ["OPENTRANS_HUB_HOME"] = previous
    return {"torch_hub": "ok", "torch_hub_sha256": sub.sha256}


def run_demo(out_dir: str | os.PathLike = "opentrans-demo", weights: str | os.PathLike | None = None,
             quick: bool = False, progress: bool = True, log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Run every stage and return the summary (also written to ``out_dir/summary.json``)."""
    from ..methods.costs import parameter_counts, selection_training_flops, sparse_inference_flops
    from ..methods.imp import IMPRunner, PruneScope
    from ..methods.plots import plot_alpha, plot_sparsity
    from ..methods.select import select_layers
    from ..methods.spectral import compute_metrics
    from ..sparsity.masks import masked_parameters
    from ..sparsity.stats import model_sparsity
    from ..towers.backbones import build_visual, weights_sha256
    from ..transfer.discovery import get_plugin
    from ..zoo.registry import Registry
    from .layouts import LAYOUTS, FCCLIPLayout
    from .synthetic import SHAPES, make_batch

    size = QUICK if quick else FULL
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OpenTransError("exists and is not a folder; the demo writes a folder (registry, plots, summary.json)",
                             path=out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OpenTransError(f"cannot create the output folder ({exc.strerror or exc})", path=out) from None
    started = time.perf_counter()
    timings: dict[str, float] = {}

    # 1. the tower ---------------------------------------------------------------------------------
    t0 = time.perf_counter()
    torch.manual_seed(0)
    tower = build_visual(ARCH, pretrained=weights)
    base_tower = copy.deepcopy(tower)  # the pre-trained weights every framework starts from
    base_sha = weights_sha256(tower)
    weights_note = f"weights from {weights}" if weights else "random initialisation (pass --weights for real CLIP)"
    log(f"[1/5] built {ARCH} visual tower: {sum(p.numel() for p in tower.parameters()):,} parameters, {weights_note}")
    timings["build_s"] = time.perf_counter() - t0

    # 2a. spectral layer selection on the pre-trained weights --------------------------------------
    t0 = time.perf_counter()
    metrics = compute_metrics(tower, xmin="peak", progress=progress)
    selection = select_layers(metrics, "median", arch=ARCH, weights_sha256=base_sha,
                              provenance={"source": "opentrans-hub demo", "weights": weights_note})
    log(f"[2/5] spectral selection: {len(selection.trainable)} of {len(selection.layers)} layers train "
        f"(alpha >= median), the heavy-tailed rest is frozen")
    from ..methods.lr_budget import budget_summary

    # shown, not published: the demo's selection stays the paper's median split
    log(f"[2/5] {budget_summary(selection.reselect('alpha-lr'))} (policy alpha-lr, shown only)")
    timings["spectrum_s"] = time.perf_counter() - t0

    # 2b. IMP on the synthetic segmentation task ---------------------------------------------------
    t0 = time.perf_counter()
    search = FCCLIPLayout(tower, num_classes=len(SHAPES))
    runner = IMPRunner(search, rate=size.imp_rate, rounds=size.imp_rounds, period=size.steps_per_round,
                       prefix="backbone.clip_model.visual.", arch=ARCH, out_dir=out / "imp",
                       scope=PruneScope(min_density=size.min_density))
    if IMPRunner.read_state(out / "imp") is not None:  # a previous demo in the same folder: start afresh
        for stale in (out / "imp").iterdir():
            stale.unlink()
    runner.before_train()
    with _stage(progress, size.imp_rounds * size.steps_per_round, "IMP rounds") as bar:
        imp_losses = _train_steps(search, size.imp_rounds * size.steps_per_round, size, seed=1,
                                  on_step=runner.after_step, bar=bar)
    subnetwork = runner.last
    assert subnetwork is not None and runner.finished
    densest_cut = max(layer.sparsity for layer in subnetwork.layers())
    log(f"[2/5] IMP: {size.imp_rounds} rounds of {size.imp_rate:.0%} -> {subnetwork.sparsity:.1%} of "
        f"{subnetwork.numel:,} conv weights pruned ({len(subnetwork)} layers, each keeps >= "
        f"{1 - densest_cut:.1%}; loss {imp_losses[0]:.3f} -> {imp_losses[-1]:.3f})")
    timings["imp_s"] = time.perf_counter() - t0
    del search

    # 3. publish into a registry and reload by name -----------------------------------------------
    t0 = time.perf_counter()
    registry = Registry(root=out / "registry")
    registry.add(subnetwork, SUBNETWORK_NAME, overwrite=True)
    registry.add(selection, SELECTION_NAME, overwrite=True)
    subnetwork = registry.get_subnetwork(SUBNETWORK_NAME)
    selection = registry.get_selection(SELECTION_NAME)
    hub = _hub_roundtrip(out / "registry")
    if hub.get("torch_hub") == "ok" and hub["torch_hub_sha256"] != subnetwork.sha256:
        raise RuntimeError("torch.hub returned another subnetwork than the registry")
    log(f"[3/5] registry {registry.root}: {SUBNETWORK_NAME} ({subnetwork.sha256[:12]}), {SELECTION_NAME} "
        f"({selection.sha256[:12]}) reloaded and verified; torch.hub: {hub['torch_hub']}")
    timings["registry_s"] = time.perf_counter() - t0

    # 4. transfer onto framework layouts and fine-tune ---------------------------------------------
    t0 = time.perf_counter()
    probe, _ = make_batch(size.batch, size.image_size, torch.Generator().manual_seed(7))  # one step's batch
    frameworks = []
    with _stage(progress, len(LAYOUTS) * size.finetune_steps, "fine-tuning") as bar:
        for framework, (plugin_name, layout) in LAYOUTS.items():
            plugin = get_plugin(plugin_name)
            torch.manual_seed(0)
            model = layout(copy.deepcopy(base_tower), num_classes=len(SHAPES))  # DeepLab builds its own
            mapping = plugin.apply(model, subnetwork)
            name_map = plugin.name_map(ARCH)
            selection_report = selection.apply(model, name_map=name_map)
            masks = masked_parameters(model)
            model.eval()  # count FLOPs without touching batch-norm statistics
            before = model_sparsity(model)
            counts = parameter_counts(model)
            inference = sparse_inference_flops(model, probe)
            training = selection_training_flops(model, probe, selection, name_map=name_map)
            losses = _train_steps(model, size.finetune_steps, size, seed=2, bar=bar)
            after = model_sparsity(model)
            frameworks.append({
                "framework": framework, "plugin": plugin_name,
                "mapped": len(mapping.mapped), "unmapped": len(mapping.unmapped), "dropped": len(mapping.dropped),
                "selection_mapped": len(selection_report.mapped),
                "selection_trainable_params": selection_report.trainable_after,
                "params_total": counts["total"], "params_kept": counts["kept"], "params_masked": counts["masked"],
                "trainable_params": counts["trainable"],
                "sparsity_before": before["sparsity"], "sparsity_after": after["sparsity"],
                "zeros_before": before["zeros"], "zeros_after": after["zeros"],
                "masked_tensors": len(masks),
                "inference_flops_dense": inference["dense"], "inference_flops_sparse": inference["sparse"],
                "train_flops_full": training["full_train_flops"],
                "train_flops_selected": training["selected_train_flops"],
                "train_flops_ratio": training["flops_ratio"],
                "loss_first": losses[0], "loss_last": losses[-1],
                "inference_layers": inference["layers"],
            })
    timings["finetune_s"] = time.perf_counter() - t0

    # 5. report -------------------------------------------------------------------------------------
    plots = {"alpha": str(plot_alpha(selection, out / "alpha.png",
                                     title=f"{ARCH}: alpha per layer, median selection")),
             "sparsity": str(plot_sparsity(subnetwork, out / "sparsity.png"))}
    timings["total_s"] = time.perf_counter() - started
    summary = {
        "arch": ARCH, "weights": str(weights) if weights else None, "weights_sha256": base_sha,
        "image_size": size.image_size, "quick": quick,
        "subnetwork": {"name": SUBNETWORK_NAME, "sha256": subnetwork.sha256, "sparsity": subnetwork.sparsity,
                       "layers": len(subnetwork), "masked_params": subnetwork.masked,
                       "kept_params": subnetwork.kept, "imp_rounds": size.imp_rounds, "imp_rate": size.imp_rate,
                       "min_density": size.min_density,
                       "imp_loss_first": imp_losses[0], "imp_loss_last": imp_losses[-1]},
        "selection": {"name": SELECTION_NAME, "sha256": selection.sha256, "layers": len(selection.layers),
                      "trainable_layers": len(selection.trainable), "policy": selection.policy},
        "hub": hub, "frameworks": frameworks, "plots": plots, "timings": timings,
        "registry": str(registry.root),
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    return summary
