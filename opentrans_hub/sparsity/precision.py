"""Low-precision traps the library can see but not fix: an optimizer ``eps`` that float16 rounds to 0."""

from __future__ import annotations

import warnings

import torch

from ..errors import OpenTransWarning


def warn_float16_eps(optimizer: torch.optim.Optimizer) -> bool:
    """Warn (once per optimizer, at its first step) when float16 parameters meet an ``eps`` that float16 rounds
    to 0: Adam-type and RMSprop updates then divide 0 by 0, and every weight, kept or pruned, dense models too,
    becomes NaN within steps. torch's defaults (1e-8, 1e-10) do; the library cannot change the optimizer."""
    for group in optimizer.param_groups:
        eps = group.get("eps")
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps <= 0:
            continue
        if any(p.dtype == torch.float16 for p in group["params"]) and float(torch.tensor(eps).half()) == 0.0:
            warnings.warn(f"{type(optimizer).__name__} steps float16 parameters with eps={eps:g}, which float16 "
                          "rounds to 0: its updates divide 0 by 0 and the weights become NaN. Use an eps float16 "
                          "holds (1e-4), autocast with float32 master weights, or bfloat16", OpenTransWarning,
                          stacklevel=3)
            return True
    return False
