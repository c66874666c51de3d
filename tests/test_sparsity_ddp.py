"""Exact sparsity under DistributedDataParallel: two real processes, gloo backend, CPU (requirement 5)."""

from __future__ import annotations

import json

import pytest
import torch.distributed as dist
from support.processes import launch_ranks

pytestmark = pytest.mark.slow  # two processes, both training


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    if not dist.is_available() or not dist.is_gloo_available():  # pragma: no cover
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path_factory.mktemp("ddp")
    launch_ranks("ddp_worker", lambda rank, port: [rank, 2, port, out])
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]


def test_masks_survive_wrapping_and_broadcast(ranks):
    for result in ranks:
        assert result["a_masked_inside_ddp"] and result["a_masked_through_wrapper"]
        assert result["a_state_keys_plain"]


def test_pruned_weights_exactly_zero_on_every_rank(ranks):
    for result in ranks:
        assert result["a_pruned_nonzeros"] == 0
        assert result["b_pruned_nonzeros"] == 0
        assert result["b_mapped"] > 0


def test_verify_exact_reduces_over_ranks(ranks):
    for result in ranks:
        assert result["a_verify"]["violations"] == 0
        assert result["a_verify"]["pruned"] == 2 * result["a_pruned_local"]  # each rank's full copy, summed


def test_ranks_stay_in_sync(ranks):
    # ranks started from different random weights and saw different data: equal weights mean DDP's
    # broadcast and gradient all-reduce ran, and the masking did the same thing everywhere
    assert ranks[0]["a_checksum"] == ranks[1]["a_checksum"]
    assert ranks[0]["b_checksum"] == ranks[1]["b_checksum"]
