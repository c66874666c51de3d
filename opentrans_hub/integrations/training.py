"""A trainer-agnostic schedule: apply a subnetwork at iteration A, bake it at B, prune every K iterations.

Plain PyTorch loops use it directly::

    sched = OpenTransSchedule(model, subnetwork="rn50-imp21.safetensors",
                              name_map=NameMap.prefix("backbone.clip_model.visual."), bake_at=89_999,
                              on_bake=lambda it: torch.save(model.state_dict(), f"model_{it}.pt"))
    sched.before_train()
    for it in range(max_iter):
        ...; optimizer.step()
        sched.after_step(it)

Framework integrations (``opentrans_hub.integrations.detectron2``) are thin adapters over this class, so
every behaviour is defined and tested here. Iterations are counted from 0; ``after_step(it)`` runs after
the optimizer step of iteration ``it``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

from torch import nn

from ..errors import OpenTransError
from ..formats.selection import LayerSelection
from ..formats.subnetwork import Subnetwork
from ..methods.imp import IMPRunner
from ..naming.namemap import MappingReport, NameMap
from ..sparsity.masks import bake, is_masked, unwrap
from ..transfer.apply import apply_subnetwork
from ..zoo.registry import load_selection, load_subnetwork


def apply_layer_selection(model: nn.Module, selection: LayerSelection, name_map: NameMap | None = None,
                          strict: bool = True) -> Any:
    """Set ``requires_grad`` from ``selection`` on ``model`` through ``name_map``; all-or-nothing.

    Delegates to :func:`~opentrans_hub.transfer.selection.select_trainable` (biases follow their weight, norms
    and other tower parameters freeze, parameters outside the tower are untouched) and returns its report.
    """
    from ..transfer.selection import select_trainable

    return select_trainable(unwrap(model), selection, name_map=name_map, strict=strict)


# ------------------------------------------------------------------ build-time application and optimizer checks
BUILT_ATTR = "_opentrans_built"


def mark_built(model: nn.Module, what: str, sha256: str, report: Any) -> None:
    """Record on ``model`` that ``what`` (``"selection"``/``"subnetwork"``) was applied when it was built.

    A schedule started later on the same model (a detectron2 hook after ``build_model``) then uses that
    application instead of repeating it after the optimizer exists.
    """
    unwrap(model).__dict__.setdefault(BUILT_ATTR, {})[what] = (sha256, report)


def built_with(model: nn.Module, what: str, sha256: str) -> Any:
    """The report of a build-time application of ``what`` with content ``sha256`` (None when there was none)."""
    entry = unwrap(model).__dict__.get(BUILT_ATTR, {}).get(what)
    return entry[1] if entry is not None and entry[0] == sha256 else None


def check_optimizer_holds(model: nn.Module, names: list[str], optimizer: Any,
                          what: str = "the layer selection") -> None:
    """Refuse when a parameter ``names`` marks trainable is in none of ``optimizer``'s param groups.

    Such a parameter has ``requires_grad`` and never changes: the optimizer was built before it was unfrozen.
    """
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    params = dict(unwrap(model).named_parameters())
    missing = [name for name in names if name in params and id(params[name]) not in held]
    if missing:
        count = sum(params[name].numel() for name in missing)
        raise OpenTransError(
            f"{what} makes {len(missing)} tensors ({count:,} parameters, first {missing[0]}) trainable that the "
            "optimizer does not hold, so they would never train; apply it before the optimizer is built "
            "(detectron2: opentrans_build_model in your Trainer's build_model)")


class OpenTransSchedule:
    """What OpenTrans does to a model during training, keyed by iteration.

    * ``selection`` (+ ``selection_map``): set ``requires_grad`` per layer in :meth:`before_train` (call it
      before building the optimizer and any DDP wrapper, or apply it at build time and :func:`mark_built`);
      given the ``optimizer``, a selection that makes a parameter trainable which the optimizer does not hold
      is refused (nothing changed). After the first step, trainable parameters that got no gradient (a
      framework running the tower under ``no_grad``) are warned about through ``warn``;
    * ``subnetwork`` (object, path or registry name) through ``name_map`` (``"auto"``: inferred from the model
      at run time by the ``auto`` plugin, rules logged): applied in :meth:`before_train`
      when ``apply_at`` is None, else after iteration ``apply_at``; its zeros stay exact while training;
    * ``bake_at``: after that iteration the masks are made permanent (:func:`~opentrans_hub.sparsity.masks.bake`)
      and ``on_bake(iteration)`` is called (save the model there);
    * ``imp``: an :class:`~opentrans_hub.methods.imp.IMPRunner` on the same model, driven from the same calls;
    * ``verify_every``: every that many iterations while masks are on the model, prove that every pruned
      weight is exactly 0.0 (:func:`~opentrans_hub.sparsity.verify.verify_exact`, one reduced count across ranks;
      call ``after_step`` on every rank) and raise :class:`OpenTransError` on a violation.

    ``before_train(start_iter)`` makes a resumed run consistent: past the bake nothing is re-applied
    (the loaded weights hold the zeros), past ``apply_at`` the masks are re-registered at once.
    :meth:`scalars` gives the current sparsity / IMP round / trainable parameter counts for a metrics writer.
    """

    def __init__(self, model: nn.Module, *, subnetwork: Subnetwork | str | os.PathLike | None = None,
                 name_map: NameMap | str | None = None, strict: bool = False, apply_at: int | None = None,
                 bake_at: int | None = None, on_bake: Callable[[int], Any] | None = None,
                 imp: IMPRunner | None = None, selection: LayerSelection | str | os.PathLike | None = None,
                 selection_map: NameMap | None = None, optimizer: Any = None,
                 log: Callable[[str], Any] | None = None, warn: Callable[[str], Any] | None = None,
                 verify_every: int | None = None):
        if apply_at is not None and subnetwork is None:
            raise OpenTransError("apply_at is set but no subnetwork is given")
        if bake_at is not None and apply_at is not None and bake_at < apply_at:
            raise OpenTransError(f"bake_at ({bake_at}) comes before apply_at ({apply_at})")
        if imp is not None and imp.model is not model and unwrap(imp.model) is not unwrap(model):
            raise OpenTransError("the IMP runner works on another model than the schedule")
        if verify_every is not None and (isinstance(verify_every, bool) or int(verify_every) < 1):
            raise OpenTransError(f"verify_every must be a positive number of iterations, got {verify_every!r}")
        self.verify_every = int(verify_every) if verify_every is not None else None
        self.model = model
        self.subnetwork = load_subnetwork(subnetwork) if subnetwork is not None else None
        self.selection = load_selection(selection) if selection is not None else None
        self.log = log or (lambda message: None)
        if isinstance(name_map, str):
            if name_map != "auto":
                raise OpenTransError(f"name_map must be a NameMap or 'auto', not {name_map!r}")
            known = self.subnetwork or self.selection
            if known is None:
                raise OpenTransError("name_map='auto' needs a subnetwork or a selection (their arch is inferred for)")
            from ..transfer.discovery import get_plugin

            name_map = get_plugin("auto").map_for(known.arch, unwrap(model))
            self.log(f"opentrans: inferred name map for {known.arch} (plugin 'auto'):\n{name_map}")
        self.name_map = name_map or NameMap()
        self.strict = strict
        self.apply_at, self.bake_at, self.on_bake = apply_at, bake_at, on_bake
        self.imp = imp
        self.selection_map = selection_map if selection_map is not None else self.name_map
        self.optimizer = optimizer
        self.warn = warn or (lambda message: warnings.warn(message, stacklevel=3))
        self.applied = False
        self.baked = False
        self.report: MappingReport | None = None
        self.selection_result: Any = None
        self.trainable_params: int | None = None   # tower parameters the selection marks trainable
        self.trained_params: int | None = None     # of those, the ones that got a gradient in the first step
        self.events: list[tuple[int | None, str]] = []

    # ------------------------------------------------------------------ steps
    def _apply(self, when: str, iteration: int | None) -> None:
        built = built_with(self.model, "subnetwork", self.subnetwork.sha256) if self.apply_at is None else None
        if built is not None:
            self.report, when = built, "when the model was built"
        else:
            self.report = apply_subnetwork(unwrap(self.model), self.subnetwork, self.name_map, strict=self.strict)
        self.applied = True
        self.events.append((iteration, "apply"))
        self.log(f"opentrans: applied subnetwork {self.subnetwork.sha256[:12]} "
                 f"({len(self.report.mapped)} tensors, sparsity {self.subnetwork.sparsity:.2%}) {when}")

    def _bake(self, iteration: int) -> None:
        bake(unwrap(self.model))
        self.baked = True
        self.events.append((iteration, "bake"))
        self.log(f"opentrans: baked masks after iteration {iteration}")
        if self.on_bake is not None:
            self.on_bake(iteration)

    def _select(self, start_iter: int | None) -> None:
        report = built_with(self.model, "selection", self.selection.sha256)
        when = "when the model was built"
        if report is None:
            if isinstance(self.model, nn.parallel.DistributedDataParallel):
                raise OpenTransError("the layer selection must be applied before the DistributedDataParallel wrapper "
                                     "exists (DDP reduces the gradients of the parameters trainable when it was "
                                     "built): apply it at build time (detectron2: opentrans_build_model)")
            when = "before training"
            params = dict(unwrap(self.model).named_parameters())
            before = {name: p.requires_grad for name, p in params.items()}
            report = apply_layer_selection(self.model, self.selection, self.selection_map)
            if self.optimizer is not None:
                try:
                    check_optimizer_holds(self.model, report.trainable, self.optimizer)
                except OpenTransError:
                    for name, flag in before.items():  # all-or-nothing: undo before refusing
                        params[name].requires_grad_(flag)
                    raise
        elif self.optimizer is not None:
            check_optimizer_holds(self.model, report.trainable, self.optimizer)
        self.selection_result = report
        params = dict(unwrap(self.model).named_parameters())
        self.trainable_params = sum(params[name].numel() for name in report.trainable if name in params)
        self.events.append((start_iter, "select"))
        self.log(f"opentrans: layer selection {self.selection.sha256[:12]} applied {when}: {report.summary()}")

    def _check_gradients(self, iteration: int) -> None:
        """After the first step: did the parameters the selection marks trainable get gradients?"""
        params = dict(unwrap(self.model).named_parameters())
        names = [name for name in self.selection_result.trainable if name in params]
        silent = [name for name in names if params[name].grad is None]
        self.trained_params = sum(params[name].numel() for name in names if params[name].grad is not None)
        if silent:
            count = sum(params[name].numel() for name in silent)
            self.warn(f"opentrans: {len(silent)} of {len(names)} tensors the layer selection marks trainable "
                      f"({count:,} of {self.trainable_params:,} parameters, first {silent[0]}) got no gradient in "
                      f"iteration {iteration}, so they do not train: the framework runs them under torch.no_grad "
                      "(FC-CLIP does so with its CLIP tower) or does not use them")

    def before_train(self, start_iter: int | None = None) -> None:
        """Layer selection, then the subnetwork (if due), then IMP's base weights / resume.

        ``start_iter``: the first iteration this run executes (a resumed run's start; ``None`` = fresh).
        """
        first = start_iter or 0
        if self.selection is not None:
            self._select(start_iter)
        if self.subnetwork is not None:
            past_bake = self.bake_at is not None and first > self.bake_at
            due = self.apply_at is None or first > self.apply_at
            if past_bake:
                self.baked = True
                self.log(f"opentrans: resumed at iteration {first}, past the bake after iteration {self.bake_at}: "
                         "the loaded weights hold the zeros, nothing applied")
            elif due:
                when = "before training" if not first else f"before iteration {first} (resumed)"
                self._apply(when, start_iter)
        if self.imp is not None:
            self.imp.before_train(start_iter)
            if self.imp.rounds_done:
                self.log(f"opentrans: IMP resumed from {self.imp.out_dir}: round {self.imp.rounds_done} of "
                         f"{self.imp.rounds} restored (sparsity {self.imp.last.sparsity:.2%})")

    def after_step(self, iteration: int) -> Subnetwork | None:
        """Run what is due after ``iteration``; returns the Subnetwork of an IMP round that just ran."""
        if self.selection_result is not None and self.trained_params is None:
            self._check_gradients(iteration)
        if self.subnetwork is not None and not self.applied and not self.baked and iteration == self.apply_at:
            self._apply(f"after iteration {iteration}", iteration)
        produced = None
        if self.imp is not None and not self.baked:
            produced = self.imp.after_step(iteration)
            if produced is not None:
                self.events.append((iteration, f"imp round {self.imp.rounds_done}"))
                self.log(f"opentrans: IMP round {self.imp.rounds_done} of {self.imp.rounds} after iteration "
                         f"{iteration}, sparsity {produced.sparsity:.2%}")
        if self.bake_at is not None and iteration == self.bake_at and not self.baked:
            if not is_masked(unwrap(self.model)):
                self.log(f"opentrans: nothing to bake after iteration {iteration}")
            self._bake(iteration)
        if self.verify_every is not None and (iteration + 1) % self.verify_every == 0 and not self.baked \
                and is_masked(unwrap(self.model)):
            from ..sparsity.verify import verify_exact

            report = verify_exact(self.model)  # raises on a violation
            self.events.append((iteration, "verify"))
            self.log(f"opentrans: verified {report['pruned']} pruned weights exactly 0.0 after iteration {iteration}")
        return produced

    def scalars(self) -> dict[str, float]:
        """``opentrans/sparsity`` (of the masked scope), ``opentrans/imp_round``, ``opentrans/trainable_params``
        and ``opentrans/trained_params`` (known after the first step), for what this schedule does."""
        out: dict[str, float] = {}
        if self.imp is not None:
            out["opentrans/imp_round"] = float(self.imp.rounds_done)
        if self.imp is not None and self.imp.last is not None:
            out["opentrans/sparsity"] = float(self.imp.last.sparsity)
        elif self.subnetwork is not None and (self.applied or self.baked):
            out["opentrans/sparsity"] = float(self.subnetwork.sparsity)
        elif self.imp is not None:
            out["opentrans/sparsity"] = 0.0
        if self.trainable_params is not None:
            out["opentrans/trainable_params"] = float(self.trainable_params)
        if self.trained_params is not None:
            out["opentrans/trained_params"] = float(self.trained_params)
        return out

    def after_train(self) -> None:
        """Nothing to finish: every round and the bake commit themselves when they run."""
