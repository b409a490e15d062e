"""Policy-gradient losses over per-token log-probs [R, G] with a response mask [R, G].

Losses reduce as a masked token mean. The training loop accumulates gradients over
micro-batches, so each loss takes an optional `normalizer`: the number of masked tokens in the
whole batch on this rank. With it a micro-batch returns sum(loss * mask) / normalizer, and the
micro-batch losses add up to the full batch's token mean.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def _k1(log_ratio: Tensor) -> Tensor:
    return log_ratio


def _k2(log_ratio: Tensor) -> Tensor:
    return 0.5 * log_ratio.square()


K3_LOG_RATIO_LIMIT = 10.0


def _k3(log_ratio: Tensor) -> Tensor:
    # Schulman's estimator: unbiased like k1, never negative like the true KL. The clamp keeps
    # exp() finite where a padded position holds a -inf log-prob (inf * 0 would be NaN).
    log_ratio = log_ratio.clamp(-K3_LOG_RATIO_LIMIT, K3_LOG_RATIO_LIMIT)
    return torch.exp(-log_ratio) + log_ratio - 1.0


KL_ESTIMATORS: dict[str, Callable[[Tensor], Tensor]] = {"k1": _k1, "k2": _k2, "k3": _k3}


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, estimator: str) -> Tensor:
    """Per-token estimate [R, G] of KL(pi || ref) from samples of pi.

    With d = logp - logp_ref: k1 = d, k2 = d^2 / 2, k3 = exp(-d) + d - 1 (d clamped to
    +-10). Which divergence each one's value and gradient follow, in the reward and in the
    loss, is tabled in docs/training.md (KL).
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {list(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[estimator](logprobs - ref_logprobs)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `x` over entries where `mask` is 1, over `dim` (all when None); 0 if none."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float,
    normalizer: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO-clip loss (scalar) and detached micro-batch statistics.

    ratio = exp(logp - logp_old); per-token loss = max(-A * ratio, -A * clip(ratio, 1 -+ eps)).
    Stats: `clip_frac` (share of tokens where the clipped term wins, so no gradient flows),
    `ratio_mean`, `approx_kl` (mean of logp_old - logp).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    loss = _reduce(torch.maximum(unclipped, clipped), mask, normalizer)
    with torch.no_grad():
        stats = {
            "clip_frac": masked_mean((clipped > unclipped).to(ratio.dtype), mask),
            "ratio_mean": masked_mean(ratio, mask),
            "approx_kl": masked_mean(-log_ratio, mask),
        }
    return loss, stats


def kl_loss(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    estimator: str,
    normalizer: float | Tensor | None = None,
) -> Tensor:
    """Token-mean KL(pi || ref) penalty (scalar), for KL in the loss rather than the reward."""
    return _reduce(kl_estimate(logprobs, ref_logprobs, estimator), mask, normalizer)


def _reduce(per_token: Tensor, mask: Tensor, normalizer: float | Tensor | None) -> Tensor:
    if normalizer is None:
        return masked_mean(per_token, mask)
    return (per_token * mask.to(per_token.dtype)).sum() / normalizer
