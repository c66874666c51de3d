"""torch.compile on a masked model (issue 11, requirement 5): the same graphs as the dense model, no
recompilation caused by the masks, exact zeros, and a compiled optimizer step that keeps them."""

from __future__ import annotations

import pytest
import torch
from support.sparsity import assert_exact_zeros, batch, conv_masks, snapshot
from support.towers import make_tiny_resnet

from opentrans_hub import apply_masks, verify_exact


def test_masked_model_compiles_into_the_same_graphs_as_dense():
    torch._dynamo.reset()
    x = batch(0)
    dense = torch._dynamo.explain(make_tiny_resnet(width=8))(x)
    model = make_tiny_resnet(width=8)
    apply_masks(model, conv_masks(model))
    masked = torch._dynamo.explain(model)(x)
    assert (masked.graph_count, masked.graph_break_count) == (dense.graph_count, dense.graph_break_count)
    assert masked.graph_break_count == 0, masked.break_reasons


@pytest.mark.slow
def test_compiled_training_and_compiled_optimizer_step_stay_exact():
    torch._dynamo.reset()
    model = make_tiny_resnet(width=8)
    masks = conv_masks(model)
    apply_masks(model, masks)
    before = snapshot(model)
    compiled = torch.compile(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)

    @torch.compile
    def step() -> None:
        optimizer.step()

    with torch._dynamo.config.patch(error_on_recompile=True):  # a guard on our state would recompile
        for i in range(3):
            optimizer.zero_grad()
            compiled(batch(i)).pow(2).mean().backward()
            optimizer.step()
    for i in range(2):
        optimizer.zero_grad()
        compiled(batch(10 + i)).pow(2).mean().backward()
        step()
    assert_exact_zeros(model, masks)
    assert verify_exact(model)["violations"] == 0
    params = dict(model.named_parameters())
    assert sum(int((params[n].detach()[m] != before[n][m]).sum()) for n, m in masks.items()) > 0
