"""Control rewards that carry no information about correctness ("Spurious Rewards",
arXiv 2506.10947): a coin flip, and a reward for the answer format alone."""

from __future__ import annotations

import random

from covo.answers import AnswerEquivalence
from covo.infra.checks import between, check
from covo.rewards.answered import AnswerClustering
from covo.rewards.base import Group, GroupReward, Scorer


class RandomReward(AnswerClustering):
    """r_i ~ Bernoulli(p), independent of the response.

    The draws of a group are seeded by (seed, step, rank, group index): a run repeats them
    exactly, and every step, process and group draws afresh. No cluster passes a verdict.
    """

    def __init__(
        self,
        p: float = 0.5,
        seed: int = 0,
        extractor: str = "boxed_or_last_number",
        timeout_s: float = 2.0,
        equivalence: AnswerEquivalence | None = None,
    ):
        super().__init__(extractor, timeout_s, equivalence)
        check("reward.p", p, between(0.0, 1.0), "a number in [0, 1]")
        self.p = p
        self.seed = seed

    def __call__(self, group: Group, scorer: Scorer | None = None) -> GroupReward:
        answers, clusters, _ = self.answers_and_clusters(group)
        # a string seed is hashed with SHA-512: the same draws on every machine and run
        rng = random.Random(f"{self.seed}/{group.step}/{group.rank}/{group.index}")
        rewards = [float(rng.random() < self.p) for _ in range(group.size)]
        return GroupReward(
            rewards=rewards,
            answers=answers,
            clusters=clusters,
            scores=list(rewards),
            components={"random": list(rewards)},
        )


class FormatReward(AnswerClustering):
    """1.0 when the response ends its reasoning with an answer the extractor finds (by default
    a final, balanced, non-empty `\\boxed{...}`), else 0.0. No cluster passes a verdict."""

    def __init__(
        self,
        extractor: str = "boxed",
        timeout_s: float = 2.0,
        equivalence: AnswerEquivalence | None = None,
    ):
        super().__init__(extractor, timeout_s, equivalence)

    def __call__(self, group: Group, scorer: Scorer | None = None) -> GroupReward:
        answers, clusters, _ = self.answers_and_clusters(group)
        rewards = [float(answer is not None) for answer in answers]
        return GroupReward(
            rewards=rewards,
            answers=answers,
            clusters=clusters,
            scores=list(rewards),
            components={"format": list(rewards)},
        )
