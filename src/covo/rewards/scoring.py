"""A rollout's rewards: each prompt's group through the reward, which may read likelihoods
from a prefix-shared scorer over the model it is given."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from covo.rewards.base import GroupReward, Reward, label_for
from covo.rewards.covo.scorer import PrefixSharedScorer
from covo.rollout.sampling import Rollout


@dataclass
class Scored:
    """`rewards`: float32 [B * N], prompt-major as the rollout's rows; `labels` reach the
    diagnostics only; `counts`: the scorer's tokens (`perf/scoring_*`)."""

    rewards: torch.Tensor
    results: list[GroupReward]
    labels: list[str | None]
    counts: dict[str, float]


def score_rollout(
    reward: Reward,
    model,
    tokenizer,
    rollout: Rollout,
    labels: list[str | None],
    step: int,
    rank: int,
) -> Scored:
    """Rewards of every group of `rollout`; a label reaches only a reward that declares it
    needs labels. Frees the trajectories' kept keys and values afterwards."""
    scorer = PrefixSharedScorer(model, tokenizer)
    truths = [label_for(reward, label) for label in labels]
    results = [reward(group, scorer) for group in rollout.groups(truths, step, rank)]
    rollout.context_caches = None  # the update needs the memory
    rewards = torch.tensor([r for res in results for r in res.rewards], dtype=torch.float32)
    counts = {
        "perf/scoring_tokens": float(scorer.tokens_processed),
        "perf/scoring_floor_tokens": float(scorer.floor_tokens),
        "perf/scoring_reused_tokens": float(scorer.reused_tokens),
    }
    return Scored(rewards, results, labels, counts)
