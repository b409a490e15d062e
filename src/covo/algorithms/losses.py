"""Policy-gradient losses over per-token log-probs [R, G] with a response mask [R, G].

Every loss aggregation (`algorithm.loss_agg`, `LOSS_AGGREGATIONS`) is
sum_{i,t} w_it * l_it / n: per-token weights w that depend on their own row only, and a count
n over the whole mini-batch (tokens or sequences). The training loop accumulates gradients over
micro-batches, so a loss takes the weights and an optional `normalizer` (n on this rank, the
all-reduced count over the number of processes): the micro-batch losses then add up to the
mini-batch's aggregate, and DDP's gradient mean to the aggregate over every rank's rows.
Without weights and a normalizer a loss is the masked token mean.
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


def _token_mean_weights(mask: Tensor, max_len: int) -> Tensor:
    return mask


def _seq_mean_weights(mask: Tensor, max_len: int) -> Tensor:
    return mask / mask.sum(1, keepdim=True).clamp(min=1.0)


def _sum_norm_weights(mask: Tensor, max_len: int) -> Tensor:
    return mask / max_len


def _tokens(mask: Tensor) -> Tensor:
    return mask.sum()


def _sequences(mask: Tensor) -> Tensor:
    return (mask.sum(1) > 0).sum().to(mask.dtype)


# name -> (per-token weights w [R, G] from the mask and max_new_tokens, the count n)
LOSS_AGGREGATIONS: dict[str, tuple[Callable[[Tensor, int], Tensor], Callable[[Tensor], Tensor]]] = {
    # DAPO: (1 / sum_i |o_i|) sum_i sum_t l_it
    "token_mean": (_token_mean_weights, _tokens),
    # GRPO (DeepSeekMath): (1 / G) sum_i (1 / |o_i|) sum_t l_it
    "seq_mean_token_mean": (_seq_mean_weights, _sequences),
    # Dr. GRPO: (1 / G) sum_i (1 / L) sum_t l_it, L = max_new_tokens
    "seq_mean_token_sum_norm": (_sum_norm_weights, _sequences),
}


def loss_weights(mask: Tensor, loss_agg: str, max_len: int) -> Tensor:
    """Per-token weights [R, G] of aggregation `loss_agg`; a row's weights read its mask only.
    G counts the sequences with at least one token in the loss."""
    return LOSS_AGGREGATIONS[loss_agg][0](mask.float(), max_len)


def loss_count(mask: Tensor, loss_agg: str) -> Tensor:
    """The aggregate's divisor over these rows: their tokens, or their sequences in the loss."""
    return LOSS_AGGREGATIONS[loss_agg][1](mask.float())


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float,
    normalizer: float | Tensor | None = None,
    weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO-clip loss (scalar) and detached micro-batch statistics.

    ratio = exp(logp - logp_old); per-token loss = max(-A * ratio, -A * clip(ratio, 1 -+ eps)),
    reduced as sum(weights * loss) / normalizer (`weights` default to the mask).
    Stats (token means over the mask): `clip_frac` (share of tokens where the clipped term
    wins, so no gradient flows), `ratio_mean`, `approx_kl` (mean of logp_old - logp).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    loss = _reduce(torch.maximum(unclipped, clipped), mask, normalizer, weights)
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
    weights: Tensor | None = None,
) -> Tensor:
    """KL(pi || ref) penalty (scalar), for KL in the loss rather than the reward, aggregated
    like the policy loss."""
    return _reduce(kl_estimate(logprobs, ref_logprobs, estimator), mask, normalizer, weights)


def _reduce(per_token: Tensor, mask: Tensor, normalizer, weights: Tensor | None) -> Tensor:
    if weights is None:
        if normalizer is None:
            return masked_mean(per_token, mask)
        weights = mask
    assert normalizer is not None, "weights come with the count they are divided by"
    return (per_token * weights.to(per_token.dtype)).sum() / normalizer
