"""Advantage estimators: sequence rewards [R] -> per-token advantages [R, G].

A rollout batch holds R = B * N responses ordered prompt-major (response r answers prompt
r // N, N = `group_size`). `mask` [R, G] is 1.0 on real response tokens (EOS included) and 0 on
padding. Every estimator takes the same keyword arguments (`token_kl`, `kl_coef`, `all_reduce`)
so the training loop can call whichever the config picked; an estimator that has no use for
one of them accepts and ignores it. Advantages are always zero on padding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

AllReduce = Callable[[Tensor], Tensor | None]


def masked_whiten(values: Tensor, mask: Tensor, all_reduce: AllReduce | None = None) -> Tensor:
    """(x - mean) / (std + 1e-8) over the masked entries of `values` [R, G]; zero on padding.

    The std is the population std. With `all_reduce` (sums a tensor across ranks, in place or
    by returning the sum) the statistics cover every rank's batch: sum, sum of squares and count
    travel in one float64 tensor, so one collective call suffices and cancellation in
    E[x^2] - E[x]^2 stays negligible.
    """
    mask = mask.to(values.dtype)
    x = values.double() * mask
    stats = torch.stack([x.sum(), (x * x).sum(), mask.double().sum()])
    if all_reduce is not None:
        reduced = all_reduce(stats)
        if reduced is not None:
            stats = reduced
    total, total_sq, count = stats.unbind()
    count = count.clamp(min=1.0)
    mean = total / count
    var = (total_sq / count - mean * mean).clamp(min=0.0)
    whitened = (values.double() - mean) / (var.sqrt() + 1e-8)
    return whitened.to(values.dtype) * mask


def reinforce_pp(
    rewards: Tensor,
    mask: Tensor,
    group_size: int,
    *,
    token_kl: Tensor | None = None,
    kl_coef: float = 0.0,
    gamma: float = 1.0,
    all_reduce: AllReduce | None = None,
) -> Tensor:
    """REINFORCE++ (OpenRLHF): `reinforce_returns` whitened over the whole batch. [R, G].

    The baseline is the batch mean (over all ranks with `all_reduce`), so `group_size` is
    unused.
    """
    returns = reinforce_returns(rewards, mask, token_kl=token_kl, kl_coef=kl_coef, gamma=gamma)
    return masked_whiten(returns, mask, all_reduce)


def reinforce_returns(
    rewards: Tensor,
    mask: Tensor,
    *,
    token_kl: Tensor | None = None,
    kl_coef: float = 0.0,
    gamma: float = 1.0,
) -> Tensor:
    """Discounted returns [R, G] of REINFORCE++'s per-token reward; zero on padding.

    Per-token reward = -kl_coef * token_kl on real tokens, plus the sequence reward on the last
    real token; returns[t] = reward[t] + gamma * returns[t + 1].
    """
    mask = mask.to(rewards.dtype)
    positions = torch.arange(mask.shape[1], device=mask.device)
    # The largest masked position, unlike mask.sum() - 1, holds under left padding too.
    last = (positions * mask).argmax(dim=1)
    token_rewards = torch.zeros_like(mask)
    if token_kl is not None and kl_coef != 0.0:
        token_rewards = token_rewards - kl_coef * token_kl * mask
    token_rewards[torch.arange(len(rewards)), last] += rewards

    returns = torch.zeros_like(token_rewards)
    running = torch.zeros_like(rewards)
    for t in reversed(range(mask.shape[1])):
        running = token_rewards[:, t] + gamma * running
        returns[:, t] = running
    return returns * mask


def grpo(
    rewards: Tensor,
    mask: Tensor,
    group_size: int,
    *,
    scale_by_std: bool = True,
    eps: float = 1e-6,
    token_kl: Tensor | None = None,
    kl_coef: float = 0.0,
    all_reduce: AllReduce | None = None,
) -> Tensor:
    """GRPO: (r - group mean) / (group std + eps), broadcast over each response's tokens. [R, G].

    The std is `torch.std`'s default, the unbiased (N - 1) one, as in TRL's GRPO trainer.
    `scale_by_std=False` keeps only the mean baseline (Dr. GRPO). With `token_kl`, the reward
    first loses kl_coef * (KL summed over the response). Groups never span ranks, so
    `all_reduce` is unused.
    """
    grouped = _grouped(_kl_penalised(rewards, mask, token_kl, kl_coef), group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_by_std:
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    return _broadcast(centred.reshape(-1), mask)


def rloo(
    rewards: Tensor,
    mask: Tensor,
    group_size: int,
    *,
    token_kl: Tensor | None = None,
    kl_coef: float = 0.0,
    all_reduce: AllReduce | None = None,
) -> Tensor:
    """RLOO: r_i - mean of the other responses' rewards, broadcast over tokens. [R, G].

    With `token_kl`, the reward first loses kl_coef * (KL summed over the response), as in TRL's
    RLOO trainer. Groups never span ranks, so `all_reduce` is unused.
    """
    grouped = _grouped(_kl_penalised(rewards, mask, token_kl, kl_coef), group_size)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return _broadcast((grouped - baseline).reshape(-1), mask)


def filter_groups(
    rewards: Tensor, group_size: int, drop_all_zero: bool, drop_all_equal: bool
) -> Tensor:
    """Which responses to keep, as a bool [R]; a prompt's group is kept or dropped whole."""
    grouped = _grouped(rewards, group_size, min_size=1)
    drop = torch.zeros(grouped.shape[0], dtype=torch.bool, device=rewards.device)
    if drop_all_zero:
        drop |= (grouped == 0).all(dim=1)
    if drop_all_equal:
        drop |= (grouped == grouped[:, :1]).all(dim=1)
    return (~drop).repeat_interleave(group_size)


def _grouped(rewards: Tensor, group_size: int, min_size: int = 2) -> Tensor:
    """[R] -> [B, N]; a baseline built from the other members needs `min_size` 2."""
    if group_size < min_size or rewards.numel() % group_size:
        raise ValueError(
            f"group_size must be >= {min_size} and divide the {rewards.numel()} rewards,"
            f" got {group_size}"
        )
    return rewards.reshape(-1, group_size)


def _kl_penalised(rewards: Tensor, mask: Tensor, token_kl: Tensor | None, kl_coef: float) -> Tensor:
    if token_kl is None or kl_coef == 0.0:
        return rewards
    return rewards - kl_coef * (token_kl * mask).sum(dim=1)


def _broadcast(sequence_values: Tensor, mask: Tensor) -> Tensor:
    return sequence_values[:, None] * mask.to(sequence_values.dtype)
