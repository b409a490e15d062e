"""Learning-rate schedules over optimizer steps, completed with the run's length by the module.

`total_steps` is `trainer.max_steps`: optimizer steps, whatever the mini-batches, PPO epochs
and group filtering do. The module steps the schedule once after every optimizer step, so the
factor at step t (0-based) is the one that step used.
"""

from __future__ import annotations

import math

from omegaconf import DictConfig
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from covo.infra.checks import Rule, apply_rules, apply_rules_where_set, between

WARMUP_RULE: Rule = ("warmup_ratio", between(0.0, 1.0, high_open=True), "a number in [0, 1)")
# `cosine_with_warmup`'s own
MIN_LR_RULE: Rule = ("min_lr_ratio", between(0.0, 1.0), "a number in [0, 1]")


def check_scheduler(scheduler: DictConfig, prefix: str = "scheduler.") -> None:
    """The schedule's knobs, before any model work: every schedule warms up; only the cosine
    one has a floor."""
    apply_rules(scheduler, [WARMUP_RULE], prefix)
    apply_rules_where_set(scheduler, [MIN_LR_RULE], prefix)


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    return math.ceil(total_steps * warmup_ratio)


def cosine_with_warmup(
    optimizer: Optimizer, total_steps: int, warmup_ratio: float = 0.03, min_lr_ratio: float = 0.0
) -> LambdaLR:
    """Linear warm-up to lr at step `w` = ceil(total * warmup_ratio), then cosine decay that
    reaches `min_lr_ratio` x lr at the last optimizer step (`total_steps` - 1).

    >>> import torch
    >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    >>> s = cosine_with_warmup(opt, total_steps=10, warmup_ratio=0.1)
    >>> [round(s.lr_lambdas[0](t), 3) for t in (0, 1, 3, 5, 9)]
    [0.5, 1.0, 0.854, 0.5, 0.0]
    """
    warmup = warmup_steps(total_steps, warmup_ratio)
    decay_steps = max(1, total_steps - 1 - warmup)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / decay_steps)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def constant_with_warmup(
    optimizer: Optimizer, total_steps: int, warmup_ratio: float = 0.0
) -> LambdaLR:
    warmup = warmup_steps(total_steps, warmup_ratio)
    return LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1)))
