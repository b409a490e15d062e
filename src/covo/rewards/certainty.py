"""Token-level confidence rewards: self-certainty (Intuitor) and negative entropy."""

from __future__ import annotations

import math

from covo.rewards.answered import AnswerClustering
from covo.rewards.base import Group, GroupReward, Scorer


class _TokenMeanReward(AnswerClustering):
    """Reward = sign * mean of a per-token policy statistic over the response's tokens.

    Empty responses get reward and score 0 and a NaN component. Every response is rewarded,
    with or without an answer; answers are extracted and clustered only for diagnostics.
    `verdicts[c]` marks the cluster holding the highest-scoring response that has an answer.
    """

    field: str
    component: str
    sign: float

    def __call__(self, group: Group, scorer: Scorer | None = None) -> GroupReward:
        answers, clusters, representatives = self.answers_and_clusters(group)
        means = [
            v.float().mean().item() if v.numel() else math.nan for v in getattr(group, self.field)
        ]
        rewards = [0.0 if math.isnan(m) else self.sign * m for m in means]
        answered = [i for i, c in enumerate(clusters) if c >= 0]
        winner = clusters[max(answered, key=lambda i: rewards[i])] if answered else -1
        return GroupReward(
            rewards=rewards,
            answers=answers,
            clusters=clusters,
            scores=list(rewards),
            verdicts=[c == winner for c in range(len(representatives))],
            components={self.component: means},
        )


class SelfCertaintyReward(_TokenMeanReward):
    """Mean per-token KL(uniform || policy) of the response: higher = more confident."""

    field = "token_self_certainty"
    component = "self_certainty"
    sign = 1.0


class EntropyReward(_TokenMeanReward):
    """Negative mean per-token entropy of the response; the component logs the entropy itself."""

    field = "token_entropy"
    component = "entropy"
    sign = -1.0
