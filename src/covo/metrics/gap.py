"""How far the sampler's log-probs are from the policy's: the rollout-vs-update gap.

The rollout records, while decoding, the log-prob of every sampled token under the
distribution it sampled from; the update computes the log-prob of the same tokens under the
policy it trains (same temperature). A sampler that runs another dtype, engine or set of logits
processors than the update shows here; in float32 with the same weights the gap is rounding.
"""

from __future__ import annotations

import torch

from covo.infra import distributed as dist


def gap_sums(sampled: torch.Tensor, policy: torch.Tensor, mask: torch.Tensor) -> dict:
    """This rank's largest and summed |sampled - policy| over the tokens where `mask` [R, G] is
    1, and their count, as device tensors (read to the host with the update's other values)."""
    gap = (sampled.float() - policy.float()).abs() * mask.bool()
    return {"gap_max": gap.max(), "gap_sum": gap.sum(), "gap_count": mask.bool().sum()}


def logprob_gap(gap_max: float, gap_sum: float, gap_count: float) -> dict:
    """`rollout/logprob_gap_max` and `rollout/logprob_gap_mean` over every rank's tokens (the
    same numbers on every rank), from each rank's `gap_sums` read to the host; none without
    tokens anywhere.

    >>> logprob_gap(**{k: float(v) for k, v in gap_sums(
    ...     torch.tensor([[-1.0, -2.0, -3.0]]), torch.tensor([[-1.5, -2.0, 0.0]]),
    ...     torch.tensor([[1.0, 1.0, 0.0]])).items()})
    {'rollout/logprob_gap_max': 0.5, 'rollout/logprob_gap_mean': 0.25}
    """
    every = dist.all_gather_objects((gap_max, gap_sum, gap_count))
    count = sum(n for _, _, n in every)
    if not count:
        return {}
    return {
        "rollout/logprob_gap_max": max(m for m, _, n in every if n),
        "rollout/logprob_gap_mean": sum(s for _, s, _ in every) / count,
    }
