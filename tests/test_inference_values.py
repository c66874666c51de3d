"""Values decide what names and shapes cannot: a square projection stored transposed under new names is mapped
with ``transpose`` when the base weights are given, and a pairing the weights contradict is not mapped at all."""

from __future__ import annotations

import warnings

import pytest
import torch
from support.towers import RN_TINY, register, tower

from opentrans_hub import OpenTransWarning, infer_name_map

PROJECTIONS = {"attnpool.q_proj.weight": "pool.query.weight", "attnpool.k_proj.weight": "pool.key.weight",
               "attnpool.v_proj.weight": "pool.value.weight"}


@pytest.fixture(scope="module")
def base() -> dict[str, torch.Tensor]:
    register()
    return tower(RN_TINY, seed=3).state_dict()


def reimplemented(state: dict[str, torch.Tensor], transposed: bool = True) -> dict[str, torch.Tensor]:
    """The tower as a framework re-implements it: the attention pool's q/k/v under new names, stored transposed."""
    out = {}
    for name, tensor in state.items():
        if name in PROJECTIONS:
            assert tensor.shape[0] == tensor.shape[1]  # square: names and shapes cannot tell the orientation
            out[PROJECTIONS[name]] = tensor.t().contiguous() if transposed else tensor.clone()
        else:
            out[name] = tensor.clone()
    return out


def test_a_transposed_square_projection_is_found_transposed(base):
    _, report = infer_name_map(reimplemented(base), RN_TINY, weights=base)
    for source, target in PROJECTIONS.items():
        found = report.tensors[source]
        assert found.targets == [target] and found.transform == "transpose", (source, found)
        assert found.evidence[0] == "values: equal"
    _, straight = infer_name_map(reimplemented(base, transposed=False), RN_TINY, weights=base)
    assert {straight.tensors[s].transform for s in PROJECTIONS} == {"identity"}


def test_a_pairing_the_weights_contradict_is_not_mapped(base):
    state = reimplemented(base, transposed=False)
    gen = torch.Generator().manual_seed(9)
    state["pool.value.weight"] = torch.randn(state["pool.value.weight"].shape, generator=gen)  # not from the base
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, report = infer_name_map(state, RN_TINY, weights=base)
    assert "attnpool.v_proj.weight" not in report.tensors
    assert "contradicts the weights" in report.unmapped["attnpool.v_proj.weight"]
    notes = [str(w.message) for w in caught if issubclass(w.category, OpenTransWarning)]
    assert len(notes) == len(set(notes))  # each note once
    assert not any("--weights adds value evidence" in note for note in notes)  # weights were given
