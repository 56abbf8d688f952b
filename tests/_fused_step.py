"""Shared by the fused-CPU-step tests: the step's logits against the model's forward, position by position.

At each position ``i`` the forward runs first (writing ``i``'s K/V), then the step recomputes ``i``
from the same cache: both see the same inputs, so they differ only by float32 summation order (F32
files, ~1e-6) and, on quantized files, by where that order flips an 8-bit activation rounding.
"""

from __future__ import annotations

import numpy as np
import torch


def step_vs_forward(model, step, ids: list[int], start: int, label: str) -> list[torch.Tensor]:
    """Prefill ``ids[:start]``, then compare ``step`` with the forward at every later position; prints
    the figures and asserts the bounds (F32 in ``label``: worst rel < 1e-4 and every top-1 equal;
    else median < 3e-2, worst < 0.3, top-1 >= 85 %). Returns the step's logits per position."""
    rel, agree, singles = [], 0, []
    with torch.inference_mode():
        model(torch.tensor([ids[:start]]), 0)
        for i in range(start, len(ids)):
            fwd = model(torch.tensor([[ids[i]]]), i)[0, -1]
            got = step(ids[i], i)  # rewrites position i's K/V from the same inputs
            singles.append(got)
            rel.append(float((got - fwd).norm() / fwd.norm()))
            agree += int(got.argmax() == fwd.argmax())
    n, worst, med = len(rel), max(rel), float(np.median(rel))
    print(f"{label}: fused step vs forward over {n} positions: rel median {med:.1e}, max {worst:.1e}, "
          f"top-1 {agree}/{n}")
    if "F32" in label:
        assert worst < 1e-4 and agree == n
    else:
        assert med < 3e-2 and worst < 0.3 and agree >= 0.85 * n
    return singles
