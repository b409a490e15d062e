"""Token-level confidence rewards: self-certainty (Intuitor), negative entropy (RENT) and the
sequence log-probability (RLSC, EM-RL)."""

from __future__ import annotations

import math

import torch

from covo.answers import AnswerEquivalence
from covo.infra.checks import between, check, choice
from covo.rewards.answered import AnswerClustering
from covo.rewards.base import Group, GroupReward, Scorer

REDUCTIONS = ("mean", "sum")


class _TokenStatReward(AnswerClustering):
    """Reward = sign * (mean or sum) of a per-token policy statistic over the response's tokens.

    `last_fraction` keeps only the last ceil(last_fraction * L) of a response's L tokens (1.0:
    all of them). Empty responses get reward and score 0 and a NaN component. Every response
    is rewarded, with or without an answer; answers are extracted and clustered only for
    diagnostics. `verdicts[c]` marks the cluster holding the highest-scoring response that has
    an answer.
    """

    field: str
    component: str
    sign: float

    def __init__(
        self,
        extractor: str = "boxed_or_last_number",
        timeout_s: float = 2.0,
        equivalence: AnswerEquivalence | None = None,
        reduction: str = "mean",
        last_fraction: float = 1.0,
    ):
        super().__init__(extractor, timeout_s, equivalence)
        check("reward.reduction", reduction, *choice(*REDUCTIONS))
        check(
            "reward.last_fraction",
            last_fraction,
            between(0.0, 1.0, low_open=True),
            "a number in (0, 1]",
        )
        self.reduction = reduction
        self.last_fraction = last_fraction

    def statistic(self, values: torch.Tensor) -> float:
        if not values.numel():
            return math.nan
        kept = values[-math.ceil(self.last_fraction * values.numel()) :].double()
        return float(kept.sum() if self.reduction == "sum" else kept.mean())

    def __call__(self, group: Group, scorer: Scorer | None = None) -> GroupReward:
        answers, clusters, representatives = self.answers_and_clusters(group)
        values = [self.statistic(v) for v in getattr(group, self.field)]
        rewards = [0.0 if math.isnan(m) else self.sign * m for m in values]
        answered = [i for i, c in enumerate(clusters) if c >= 0]
        winner = clusters[max(answered, key=lambda i: rewards[i])] if answered else -1
        return GroupReward(
            rewards=rewards,
            answers=answers,
            clusters=clusters,
            scores=list(rewards),
            verdicts=[c == winner for c in range(len(representatives))],
            components={self.component: values},
        )


class SelfCertaintyReward(_TokenStatReward):
    """Mean per-token KL(uniform || policy) of the response: higher = more confident."""

    field = "token_self_certainty"
    component = "self_certainty"
    sign = 1.0


class EntropyReward(_TokenStatReward):
    """Negative mean per-token entropy of the response (RENT scores its last part:
    `last_fraction`); the component logs the entropy itself."""

    field = "token_entropy"
    component = "entropy"
    sign = -1.0


class SequenceLogProbReward(_TokenStatReward):
    """Log-probability of the response under the sampling policy, per token (`mean`, RLSC's
    length-normalised form) or whole (`sum`, the sequence likelihood)."""

    field = "token_logprobs"
    component = "seq_logprob"
    sign = 1.0
