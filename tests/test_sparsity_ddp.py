"""Exact sparsity under DistributedDataParallel: two real processes, gloo backend, CPU (requirement 5)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

WORKER = Path(__file__).with_name("ddp_worker.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    if not dist.is_available() or not dist.is_gloo_available():  # pragma: no cover
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path_factory.mktemp("ddp")
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if sys.platform.startswith("linux"):  # keep gloo on loopback even where the hostname resolves elsewhere
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(rank), "2", str(port), str(out)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(2)]
    logs = []
    for proc in procs:
        try:
            logs.append(proc.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail("DDP workers timed out")
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, log[-3000:]
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
