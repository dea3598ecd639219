"""Per-step learning-rate schedule of spec section 7: linear warmup, then cosine decay to zero."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def warmup_steps_for(total_steps: int, warmup_fraction: float) -> int:
    return int(round(total_steps * warmup_fraction))


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Multiplier of the base lr for optimizer step `step` (0-based).

    Warmup ramps (step+1)/warmup so that the first step already moves (a factor of 0 would waste it);
    after warmup the factor follows 0.5*(1+cos(pi*progress)) and reaches 0 at the last step.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_with_warmup(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int) -> LambdaLR:
    """A LambdaLR stepped once per optimizer step; each param group keeps its own base lr."""
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
    return LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, warmup_steps))
