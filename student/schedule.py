"""The learning-rate schedule as a pure function of the step, so that a resumed run needs no scheduler state.

``lr_factor(step, cfg)`` multiplies the engine's base learning rate (``optim.lr``, or a recipe's own) for the
update made at ``step`` (0-based): a linear warm-up over ``warmup_steps``, then either constant or a cosine
decay that reaches ``min_lr_ratio`` at the last step (``optim.steps - 1``). A decay matters for short runs
scored at their last step: at a constant rate the final weights still wander, and two seeds of one recipe
can differ by more than two recipes do.
"""

from __future__ import annotations

import math

from student.config import OptimConfig


def lr_factor(step: int, cfg: OptimConfig) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, cfg.steps - 1 - cfg.warmup_steps)
    progress = min(1.0, max(0, step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
