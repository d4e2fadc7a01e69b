"""Learning-rate schedules as pure functions of the global optimizer step (compatibility.md#optimizer-schedule).

The LR is recomputed from the step at every micro-batch, so a resumed run follows the saved step exactly.
"""

from __future__ import annotations

import math


def cosine_lr(step: int, base_lr: float, warmup: int, max_steps: int) -> float:
    """The reference schedule: linear warm-up ``base_lr·(step+1)/warmup``, then half a cosine to 0 (no floor)."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    span = max_steps - warmup
    if span <= 0:
        return base_lr
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / span)) * base_lr


def constant_lr(step: int, base_lr: float, warmup: int, max_steps: int) -> float:
    """``--skip-scheduler``: the base LR throughout (the reference parses the flag but ignores it)."""
    del step, warmup, max_steps
    return base_lr


def lr_at(step: int, base_lr: float, warmup: int, max_steps: int, skip_scheduler: bool = False) -> float:
    schedule = constant_lr if skip_scheduler else cosine_lr
    return schedule(step, base_lr, warmup, max_steps)


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
