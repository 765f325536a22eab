"""The learning rate of each step: `optim.schedule` over the run's `steps`.

A pure function of the step number, so `--resume` continues the curve exactly and every
learner rank uses the same value (rank 0 hands it over with the step's samples).

    constant  lr at every step (after any warmup)
    linear    lr falling in a straight line to lr * min_lr_ratio at the last step
    cosine    lr falling along half a cosine to lr * min_lr_ratio at the last step

`optim.warmup_steps` ramps lr up linearly first (step 1 trains at lr / warmup_steps).
"""

from __future__ import annotations

import math

from trainer.config import OptimConfig


def lr_at(step: int, total_steps: int, optim: OptimConfig) -> float:
    """The learning rate for 1-based `step` of a run of `total_steps` steps."""
    if step <= optim.warmup_steps:
        return optim.lr * step / optim.warmup_steps
    if optim.schedule == "constant":
        return optim.lr
    decay_steps = max(1, total_steps - optim.warmup_steps - 1)
    progress = min(1.0, (step - optim.warmup_steps - 1) / decay_steps)  # 0 at the first step after warmup, 1 at the last
    floor = optim.lr * optim.min_lr_ratio
    if optim.schedule == "linear":
        return floor + (optim.lr - floor) * (1.0 - progress)
    return floor + (optim.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
