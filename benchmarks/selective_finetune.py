"""One training step of the open_clip RN50 visual tower (batch 8, 224 px, CPU): all layers vs the median selection.

The selection is the paper's: alpha per layer (``xmin`` peak), layers below the median frozen (biases follow,
norms frozen). Both configurations run interleaved in one process, ``--repeats`` times after a warm-up step;
the median step time is reported. FLOPs of one step (forward + backward) come from
``torch.utils.flop_counter`` through ``opentrans_hub.methods.report.selection_training_flops``: a frozen weight pays
no weight-gradient FLOPs, and no input gradient is computed below the lowest trainable layer. Random-init
weights (no downloads here). The last line of stdout is one JSON object.
"""

from __future__ import annotations

import logging
import time

import _bench
import torch


def step(tower: torch.nn.Module, images: torch.Tensor, target: torch.Tensor) -> float:
    params = [p for p in tower.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss = torch.nn.functional.mse_loss(tower(images), target)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = _bench.options(__doc__, repeats=3, quick="one repeat, batch 2", threads=0)
    parser.add_argument("--batch", type=int, default=8)
    args = _bench.parse(parser, repeats=1, batch=2)
    repeats, batch = args.repeats, args.batch
    _bench.set_threads(args.threads)
    logging.disable(logging.WARNING)
    from opentrans_hub.methods.costs import parameter_counts, selection_training_flops
    from opentrans_hub.methods.select import select_layers
    from opentrans_hub.methods.spectral import compute_metrics

    tower = _bench.rn50_tower().train()
    selection = select_layers(compute_metrics(tower, "peak"), "median", arch="open_clip/RN50")
    images = torch.randn(batch, 3, 224, 224)
    target = torch.randn(batch, tower.output_dim)

    def full() -> None:
        for p in tower.parameters():
            p.requires_grad_(True)

    def selected() -> None:
        full()
        selection.apply(tower)

    configs = {"full": full, "selected": selected}
    times = _bench.Timings(*configs)
    for setup in configs.values():  # warm-up
        setup()
        step(tower, images, target)
    for rep in range(repeats):
        for name, setup in configs.items():
            setup()
            times.add(name, step(tower, images, target))
        print(f"repeat {rep + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.wall.items()), flush=True)
    full()
    loss_fn = lambda out: torch.nn.functional.mse_loss(out, target)  # noqa: E731
    flops = selection_training_flops(tower, images, selection, loss_fn=loss_fn)
    selected()
    counts = parameter_counts(tower)
    full_s, selected_s = times.median("full"), times.median("selected")
    _bench.emit({
        "batch": batch, "image_size": 224, "repeats": repeats, "threads": torch.get_num_threads(), **_bench.host(),
        "layers": len(selection.layers), "trainable_layers": len(selection.trainable),
        "full_step_s": round(full_s, 3), "selected_step_s": round(selected_s, 3),
        "step_ratio": round(selected_s / full_s, 3),
        "full_train_flops": flops["full_train_flops"], "selected_train_flops": flops["selected_train_flops"],
        "flops_ratio": round(flops["flops_ratio"], 4),
        "full_trainable_params": flops["full_trainable_params"], "selected_trainable_params": counts["trainable"],
        "paper_flops_ratio": round(159.6 / 181.4, 3),
        "all_s": times.all_s(3),
    }, args)


if __name__ == "__main__":
    main()
