"""torch.compile on a masked model: the same graphs as the dense model, forward and optimizer step alike, no
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
        for i in range(3):  # the compiled step, where the masking happens, under the same guard
            optimizer.zero_grad()
            compiled(batch(10 + i)).pow(2).mean().backward()
            step()
    assert_exact_zeros(model, masks)
    assert verify_exact(model)["violations"] == 0
    params = dict(model.named_parameters())
    assert sum(int((params[n].detach()[m] != before[n][m]).sum()) for n, m in masks.items()) > 0


def optimizer_step_graphs(masked: bool) -> tuple[int, int, list[str]]:
    torch._dynamo.reset()
    model = make_tiny_resnet(width=8)
    if masked:
        apply_masks(model, conv_masks(model))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for i in range(2):  # the second step finds the optimizer state in place
        model(batch(i)).pow(2).mean().backward()
        if i:
            explained = torch._dynamo.explain(optimizer.step)()
        else:
            optimizer.step()
    return explained.graph_count, explained.graph_break_count, [str(r.reason) for r in explained.break_reasons]


@pytest.mark.slow
def test_the_optimizer_step_compiles_into_the_same_graph_as_dense():
    dense, masked = optimizer_step_graphs(False), optimizer_step_graphs(True)
    assert masked[:2] == dense[:2], (masked, dense)
    assert masked[1] == 0, masked[2]  # the mask hooks add no graph break
