"""Learning-rate schedules, completed with the run's length by the module."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    return math.ceil(total_steps * warmup_ratio)


def cosine_with_warmup(
    optimizer: Optimizer, total_steps: int, warmup_ratio: float = 0.03, min_lr_ratio: float = 0.0
) -> LambdaLR:
    """Linear warm-up from 0, then cosine decay to `min_lr_ratio` x lr at `total_steps`.

    >>> import torch
    >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    >>> s = cosine_with_warmup(opt, total_steps=10, warmup_ratio=0.2)
    >>> [round(s.lr_lambdas[0](t), 3) for t in (0, 1, 2, 6, 10)]
    [0.333, 0.667, 1.0, 0.5, 0.0]
    """
    warmup = warmup_steps(total_steps, warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def constant_with_warmup(
    optimizer: Optimizer, total_steps: int, warmup_ratio: float = 0.0
) -> LambdaLR:
    warmup = warmup_steps(total_steps, warmup_ratio)
    return LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1)))
