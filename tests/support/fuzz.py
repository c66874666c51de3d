"""Byte-level mutations of valid files for the decoder fuzz tests (hypothesis draws, reproducible)."""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st


def fuzz_settings(examples: int) -> settings:
    """Deterministic examples, no deadline (2 shared CPU cores), large draws allowed."""
    return settings(max_examples=examples, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def mutate(data: st.DataObject, blob: bytes, mutations: int, chunk: int, overwrite: bool = False) -> bytes:
    """Up to ``mutations`` bit flips, truncations, insertions and deletions (of up to ``chunk`` bytes), and with
    ``overwrite`` overwritten runs of up to 8 bytes, at drawn positions."""
    blob = bytearray(blob)
    kinds = ["flip", "truncate", "insert", "delete"] + (["overwrite"] if overwrite else [])
    for _ in range(data.draw(st.integers(1, mutations), label="mutations")):
        kind = data.draw(st.sampled_from(kinds), label="kind")
        pos = data.draw(st.integers(0, max(len(blob) - 1, 0)), label="pos")
        if kind == "flip" and blob:
            blob[pos] ^= 1 << data.draw(st.integers(0, 7), label="bit")
        elif kind == "truncate":
            del blob[pos:]
        elif kind == "insert":
            blob[pos:pos] = data.draw(st.binary(min_size=1, max_size=chunk), label="inserted")
        elif kind == "delete":
            del blob[pos:pos + data.draw(st.integers(1, chunk), label="deleted")]
        elif blob:
            piece = data.draw(st.binary(min_size=1, max_size=8), label="overwrite")
            blob[pos:pos + len(piece)] = piece
    return bytes(blob)
