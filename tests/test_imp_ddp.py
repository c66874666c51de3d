"""IMP under DistributedDataParallel: two real processes (gloo on 127.0.0.1) end every round with identical masks."""

from __future__ import annotations

import pytest
import torch.distributed as dist
from support.processes import launch_ranks
from support.training import DDP_SETTINGS

from opentrans_hub import Subnetwork
from opentrans_hub.methods.imp import IMPRunner, imp_sparsity

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")]


def test_two_ranks_hold_identical_masks_after_every_round(tmp_path):
    launch_ranks("imp_worker", lambda rank, port: ["ddp", tmp_path, rank, 2, port], timeout=300)

    state = IMPRunner.read_state(tmp_path / "imp")
    assert state["rounds_done"] == DDP_SETTINGS["rounds"]
    for k in range(1, DDP_SETTINGS["rounds"] + 1):
        rank0 = Subnetwork.load(tmp_path / f"rank0_round{k}.safetensors")
        rank1 = Subnetwork.load(tmp_path / f"rank1_round{k}.safetensors")
        assert set(rank0.masks) == set(rank1.masks)
        for name in rank0.masks:
            assert rank0[name].numpy().tobytes() == rank1[name].numpy().tobytes(), (k, name)
        assert rank0.sha256 == rank1.sha256 == state["rounds"][k - 1]["sha256"]
        assert abs(rank0.masked - rank0.numel * imp_sparsity(DDP_SETTINGS["rate"], k)) <= 1
        if k > 1:
            assert rank0.nested_in(Subnetwork.load(tmp_path / f"rank0_round{k - 1}.safetensors"))
    # the ranks trained on different data and still hold the same parameters (DDP + identical masks)
    assert (tmp_path / "rank0_weights.txt").read_text() == (tmp_path / "rank1_weights.txt").read_text()
    # towers that differ on purpose get rank 0's masks on both ranks: the masks are broadcast
    lone0 = Subnetwork.load(tmp_path / "rank0_lone.safetensors")
    lone1 = Subnetwork.load(tmp_path / "rank1_lone.safetensors")
    assert lone0.sha256 == lone1.sha256
    assert not list(tmp_path.glob("imp/.*.tmp"))
