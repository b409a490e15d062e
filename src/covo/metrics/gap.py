"""How far the sampler's log-probs are from the policy's: the rollout-vs-update gap.

The rollout records, while decoding, the log-prob of every sampled token under the
distribution it sampled from; the update computes the log-prob of the same tokens under the
policy it trains (same temperature). A sampler that runs another dtype, engine or set of logits
processors than the update shows here; in float32 with the same weights the gap is rounding.
"""

from __future__ import annotations

import torch

from covo.infra import distributed as dist


def logprob_gap(sampled: torch.Tensor, policy: torch.Tensor, mask: torch.Tensor) -> dict:
    """`rollout/logprob_gap_max` and `rollout/logprob_gap_mean`: the largest and the mean
    |sampled - policy| over the tokens where `mask` [R, G] is 1, over every rank's tokens
    (the same numbers on every rank); none without tokens anywhere.

    >>> logprob_gap(torch.tensor([[-1.0, -2.0, -3.0]]), torch.tensor([[-1.5, -2.0, 0.0]]),
    ...             torch.tensor([[1.0, 1.0, 0.0]]))
    {'rollout/logprob_gap_max': 0.5, 'rollout/logprob_gap_mean': 0.25}
    """
    gap = (sampled.float() - policy.float()).abs()[mask.bool()]
    local = (float(gap.max()) if gap.numel() else 0.0, float(gap.sum()), gap.numel())
    every = dist.all_gather_objects(local)
    count = sum(n for _, _, n in every)
    if not count:
        return {}
    return {
        "rollout/logprob_gap_max": max(m for m, _, n in every if n),
        "rollout/logprob_gap_mean": sum(s for _, s, _ in every) / count,
    }
