"""Every decoder of untrusted bytes (subnetwork, packed, selection JSON, sniff), fuzzed in a fresh process under an
address-space limit: each input is accepted as exactly the sample it came from or refused with one OpenTransError,
never another exception and never an allocation the limit does not allow (``fuzz_worker.py`` says how).
"""

from __future__ import annotations

import json
import subprocess

from support.processes import worker, worker_env

HEADROOM = 1 << 30  # above what the worker maps once torch is imported (about 3.3 GB of address space on its own)


def test_decoders_accept_or_refuse_cleanly_under_a_memory_limit(tmp_path):
    done = subprocess.run([*worker("fuzz_worker"), "300", str(HEADROOM)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300, env=worker_env())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["address_space_limit"] > HEADROOM
    for decoder in ("subnetwork", "packed", "packed reader", "selection"):
        # both outcomes happen, so the fuzz reaches the decoders' success paths and not only their first check
        assert seen.get(f"{decoder} accepted", 0) > 0 and seen.get(f"{decoder} refused", 0) > 0, (decoder, seen)
