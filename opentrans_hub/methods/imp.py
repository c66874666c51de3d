"""Iterative magnitude pruning (IMP) of a CLIP image encoder inside any training loop.

:class:`IMPRunner` runs the rounds on a schedule (``before_train`` / ``after_step``), rewinds weights if
asked, writes every finished round atomically and resumes from the last one; under DDP rank 0 computes
the masks and broadcasts them, so every rank holds identical masks; on a model sharded by FSDP2
(``fully_shard``) every rank ranks its own rows and the reduced histograms give the same masks.

Each round is a magnitude prune of the scope (:mod:`opentrans_hub.methods.prune`: :class:`PruneScope`,
:func:`magnitude_prune`, re-exported here) at ``1 - (1 - rate) ** round`` of its weights.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import OpenTransError
from ..formats.subnetwork import Subnetwork, default_provenance
from ..io.atomic import atomic_write_bytes, atomic_write_text
from ..io.checkpoints import read_safetensors
from ..sparsity.masks import apply_masks, enforce, unwrap
from ..sparsity.sharding import full_mask, is_dtensor, local, shard_like
from ..towers.backbones import check_canonical_scope  # noqa: F401  (IMPRunner checks its scope; re-exported)
from .magnitude import RANKINGS, magnitude_masks
from .prune import LAYER_TYPES, PruneScope, current_masks, magnitude_prune, prune_round  # noqa: F401

__all__ = ["IMPRunner", "PruneScope", "RANKINGS", "imp_sparsity", "magnitude_masks", "magnitude_prune", "prune_round"]
STATE_FORMAT = "opentrans-hub/imp-state"
STATE_FILE = "imp_state.json"
REWIND_FILE = "rewind.safetensors"


def imp_sparsity(rate: float, rounds: int) -> float:
    """Scope sparsity after ``rounds`` rounds that each prune ``rate`` of the live weights."""
    return 1.0 - (1.0 - rate) ** rounds


# ------------------------------------------------------------------------------------------ distributed
def _dist_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _broadcast_masks(masks: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Rank 0's masks on every rank (one flat uint8 broadcast)."""
    import torch.distributed as dist

    names = list(masks)
    flat = torch.cat([masks[n].reshape(-1).to(device=device, dtype=torch.uint8) for n in names])
    dist.broadcast(flat, src=0)
    out, offset = {}, 0
    for name in names:
        numel = masks[name].numel()
        out[name] = flat[offset:offset + numel].to(torch.bool).reshape(masks[name].shape)
        offset += numel
    return out


class _Gathered(Mapping):
    """A state dict whose DTensors read as whole tensors, gathered one at a time when looked up (collective)."""

    def __init__(self, state: Mapping[str, Any]):
        self.state = state

    def __getitem__(self, name: str) -> Any:
        return _whole(self.state[name])

    def __iter__(self):
        return iter(self.state)

    def __len__(self) -> int:
        return len(self.state)


def _whole(tensor: Any, keep: bool = True) -> Any:
    if not is_dtensor(tensor):
        return tensor
    whole = tensor.full_tensor()
    return whole if keep else None


def _weights_sha256(state: Mapping[str, Any]) -> str:
    """:func:`~..towers.backbones.weights_sha256` of a (possibly sharded) state dict; the same on every rank."""
    from ..towers.backbones import weights_sha256

    return weights_sha256(_Gathered(state))


def _barrier() -> None:
    import torch.distributed as dist

    if _dist_world()[1] > 1:
        dist.barrier()


# ------------------------------------------------------------------------------------------ IMP runner
def _parse_rewind(rewind: int | str | None) -> int | None:
    if rewind is None or rewind == "none" or rewind == -1:
        return None
    if rewind == "init":
        return 0
    if isinstance(rewind, bool) or not isinstance(rewind, int) or rewind < 0:
        raise OpenTransError(f"rewind must be None/'none', 'init' or an iteration >= 0, got {rewind!r}")
    return rewind


class IMPRunner:
    """Iterative magnitude pruning on a training schedule, with rewinding and resume.

    Call :meth:`before_train` once before the loop and :meth:`after_step` after every optimizer step
    (iterations counted from 0). Round ``r`` (1-based) runs after iteration ``start + r * period - 1``
    and brings the scope to sparsity ``1 - (1 - rate) ** r``. ``rewind``: ``None`` keeps training (the
    paper), ``0``/``"init"`` resets the tower to its weights at ``before_train``, ``k`` to its weights after
    ``k`` iterations (lottery-ticket rewinding); the pruned masks stay.

    With ``out_dir`` every finished round is written atomically: ``round_NNN.safetensors``, then
    ``on_round(round, iteration, subnetwork)`` (save your training checkpoint there), then
    ``imp_state.json`` as the commit point. ``before_train`` resumes from that state. Under
    ``torch.distributed`` rank 0 computes the masks and broadcasts them; only rank 0 writes files.
    """

    def __init__(self, model: nn.Module, *, rate: float = 0.1, rounds: int = 21, period: int = 5000, start: int = 0,
                 scope: PruneScope | None = None, prefix: str = "", arch: str = "unknown",
                 rewind: int | str | None = None, out_dir: str | os.PathLike | None = None,
                 encoding: str = "packbits",
                 on_round: Callable[[int, int, Subnetwork], None] | None = None):
        if not 0.0 < rate < 1.0:
            raise OpenTransError(f"rate must lie in (0, 1), got {rate!r}")
        if rounds < 1 or period < 1 or start < 0:
            raise OpenTransError(f"need rounds >= 1, period >= 1, start >= 0 (got {rounds}, {period}, {start})")
        self.model = model
        self.rate, self.rounds, self.period, self.start = float(rate), int(rounds), int(period), int(start)
        self.scope = scope or PruneScope()
        self.prefix, self.arch = prefix, arch
        self.rewind = _parse_rewind(rewind)
        if self.rewind is not None and self.rewind > self.start + self.period - 1:
            raise OpenTransError(f"rewind iteration {self.rewind} comes after the first round "
                                 f"(iteration {self.start + self.period - 1})")
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.encoding = encoding
        self.on_round = on_round
        self.rounds_done = 0
        self.history: list[dict[str, Any]] = []
        self.last: Subnetwork | None = None
        self.base_weights_sha256: str | None = None
        self._rewind_state: dict[str, torch.Tensor] | None = None
        self._rewind_sha256: str | None = None
        self._started = False

    # -------------------------------------------------------------- configuration identity
    def settings(self) -> dict[str, Any]:
        """What must match for a resume to continue the same run."""
        return {"rate": self.rate, "rounds": self.rounds, "period": self.period, "start": self.start,
                "scope": self.scope.to_dict(), "prefix": self.prefix, "arch": self.arch, "rewind": self.rewind}

    def round_iteration(self, round_index: int) -> int:
        """The iteration after which round ``round_index`` (1-based) runs."""
        return self.start + round_index * self.period - 1

    @property
    def resume_iteration(self) -> int:
        """The first iteration to run after the last finished round (0 when none finished)."""
        return int(self.history[-1]["iteration"]) + 1 if self.history else 0

    @property
    def finished(self) -> bool:
        return self.rounds_done >= self.rounds

    # -------------------------------------------------------------- tower state
    def _tower(self) -> nn.Module:
        model = unwrap(self.model)
        return model.get_submodule(self.prefix.rstrip(".")) if self.prefix else model

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", copy=True) for k, v in self._tower().state_dict().items()}

    def _restore(self, state: Mapping[str, torch.Tensor]) -> None:
        tower = self._tower()
        current = tower.state_dict()
        with torch.no_grad():
            for name, tensor in current.items():
                if name not in state or tuple(state[name].shape) != tuple(tensor.shape):
                    raise OpenTransError("rewind snapshot does not fit the tower", tensor=name)
                source = state[name]
                if is_dtensor(tensor):  # a sharded tower: copy this rank's rows (of a shard or a whole file tensor)
                    tensor, source = local(tensor), local(shard_like(source, tensor, name))
                tensor.copy_(source.to(tensor.device, tensor.dtype))
        enforce(unwrap(self.model))

    # -------------------------------------------------------------- schedule
    @staticmethod
    def read_state(out_dir: str | os.PathLike) -> dict[str, Any] | None:
        """The committed state of a run in ``out_dir`` (None when there is none)."""
        path = Path(out_dir) / STATE_FILE
        if not path.is_file():
            return None
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise OpenTransError(f"cannot read IMP state ({exc})", path=path) from None
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or not isinstance(
                state.get("rounds"), list):
            raise OpenTransError("not an opentrans-hub IMP state file", path=path)
        return state

    def before_train(self, start_iter: int | None = None) -> None:
        """Check the scope against ``arch``'s canonical tower, record the base weights, capture rewind weights
        at iteration 0, resume from ``out_dir``.

        ``start_iter`` is the first iteration this process will run after a framework's own resume: only
        rounds finished before it are restored. ``None`` restores every committed round (plain loops then
        reload the checkpoint they saved in ``on_round`` and continue at :attr:`resume_iteration`).
        """
        self._started = True
        check_canonical_scope(self.scope.select(self.model, self.prefix), self.arch, self.prefix)
        state = self.read_state(self.out_dir) if self.out_dir is not None else None
        if state is not None:
            self._resume(state, start_iter)
            return
        self.base_weights_sha256 = _weights_sha256(self._tower().state_dict())
        if self.rewind == 0:
            self._capture_rewind()

    def _resume(self, state: dict[str, Any], start_iter: int | None) -> None:
        path = self.out_dir / STATE_FILE
        if state.get("settings") != json.loads(json.dumps(self.settings())):
            raise OpenTransError("IMP settings differ from the run being resumed (use another out_dir); "
                                 f"saved {state.get('settings')}", path=path)
        rounds = [r for r in state["rounds"] if start_iter is None or int(r["iteration"]) < start_iter]
        self.base_weights_sha256 = state.get("base_weights_sha256")
        rewind = state.get("rewind")
        if rewind:
            self._rewind_state = read_safetensors(self.out_dir / rewind["file"])
            self._rewind_sha256 = rewind["weights_sha256"]
        if not rounds:
            return
        last = rounds[-1]
        sub = Subnetwork.load(self.out_dir / last["file"], expected_sha256=last["sha256"])
        selected = self.scope.select(self.model, self.prefix)
        if set(sub.masks) != set(selected):
            raise OpenTransError("saved round does not cover the prune scope of this model",
                                 path=self.out_dir / last["file"])
        apply_masks(unwrap(self.model), {selected[c][0]: m for c, m in sub.masks.items()})
        self.rounds_done = int(last["round"])
        self.history = list(rounds)
        self.last = sub

    def _capture_rewind(self) -> None:
        self._rewind_state = self._snapshot()  # sharded: this rank's shards only
        self._rewind_sha256 = _weights_sha256(self._rewind_state)
        rank, _ = _dist_world()
        if self.out_dir is not None:
            from safetensors.torch import save

            # sharded towers are gathered one tensor at a time (collective), kept whole on rank 0 only
            whole = {k: _whole(v, keep=rank == 0) for k, v in self._rewind_state.items()}
            if rank == 0:
                atomic_write_bytes(self.out_dir / REWIND_FILE, save({k: v.contiguous() for k, v in whole.items()}))

    def after_step(self, iteration: int) -> Subnetwork | None:
        """Capture rewind weights or run a round when ``iteration`` calls for it; the new Subnetwork or None."""
        if not self._started:
            self.before_train()
        if self.rewind and iteration == self.rewind - 1 and self._rewind_state is None:
            self._capture_rewind()
        if self.finished or iteration != self.round_iteration(self.rounds_done + 1):
            return None
        return self.prune_now(iteration)

    def prune_now(self, iteration: int) -> Subnetwork:
        """Run the next round now (after ``iteration``), rewind if asked, write and commit it."""
        round_index = self.rounds_done + 1
        target = imp_sparsity(self.rate, round_index)
        selected = self.scope.select(self.model, self.prefix)
        rank, world = _dist_world()
        sharded = any(is_dtensor(p) for _, p in selected.values())
        if sharded:  # every rank ranks its own rows; reduced histograms give everyone the same masks
            weights = {c: p for c, (_, p) in selected.items()}
            masks = magnitude_masks(weights, current_masks(selected, self.model), sparsity=target,
                                    ranking=self.scope.ranking, min_density=self.scope.min_density)
        elif rank == 0:
            weights = {c: p for c, (_, p) in selected.items()}
            masks = magnitude_masks(weights, current_masks(selected, self.model), sparsity=target,
                                    ranking=self.scope.ranking, min_density=self.scope.min_density)
        else:
            masks = {c: torch.empty(p.shape, dtype=torch.bool) for c, (_, p) in selected.items()}
        if world > 1 and not sharded:
            device = next(iter(selected.values()))[1].device
            masks = _broadcast_masks(masks, device)
        apply_masks(unwrap(self.model), {selected[c][0]: m for c, m in masks.items()})
        masks = {c: full_mask(m) for c, m in masks.items()}  # sharded: bool masks gathered, never weights
        # the weights the masks ranked (sharded: hashed one gathered tensor at a time, on every rank)
        trained_sha = _weights_sha256(self._tower().state_dict()) if rank == 0 or sharded else None
        rewind_info: dict[str, Any] = {"to": "none"}
        if self.rewind is not None:
            if self._rewind_state is None:
                raise OpenTransError(f"no rewind weights captured for iteration {self.rewind}")
            self._restore(self._rewind_state)
            rewind_info = {"to": "init" if self.rewind == 0 else "iteration", "iteration": self.rewind,
                           "what": "tower (parameters and buffers)", "weights_sha256": self._rewind_sha256}
        provenance = default_provenance("imp", **self.settings())
        provenance.update({"round": round_index, "iteration": iteration, "target_sparsity": target,
                           "base_weights_sha256": self.base_weights_sha256,
                           "parent_sha256": self.last.sha256 if self.last is not None else None,
                           "rewind": rewind_info, "trained_weights_sha256": trained_sha})
        sub = Subnetwork(masks, arch=self.arch, provenance=provenance)
        record = {"round": round_index, "iteration": iteration, "file": f"round_{round_index:03d}.safetensors",
                  "sha256": sub.sha256, "sparsity": sub.sparsity}
        if self.out_dir is not None and rank == 0:
            sub.save(self.out_dir / record["file"], encoding=self.encoding)
        if self.on_round is not None:
            self.on_round(round_index, iteration, sub)
        self.rounds_done = round_index
        self.history.append(record)
        self.last = sub
        if self.out_dir is not None and rank == 0:
            self._commit()
        _barrier()
        return sub

    def _commit(self) -> None:
        state = {"format": STATE_FORMAT, "version": 1, "settings": self.settings(),
                 "base_weights_sha256": self.base_weights_sha256, "rounds_done": self.rounds_done,
                 "rounds": self.history,
                 "rewind": ({"file": REWIND_FILE, "iteration": self.rewind, "weights_sha256": self._rewind_sha256}
                            if self._rewind_state is not None else None)}
        atomic_write_text(self.out_dir / STATE_FILE, json.dumps(state, indent=1) + "\n")
