"""Supervised reference reward: 1 when the extracted answer matches the group's label."""

from __future__ import annotations

from covo.answers import AnswerEquivalence, cluster_answers, get_extractor
from covo.rewards.base import Group, GroupReward, Scorer


class GroundTruthReward:
    """1.0 for a response whose answer matches `group.label`, else 0.0 (no answer: 0.0)."""

    def __init__(
        self,
        extractor: str = "boxed_or_last_number",
        timeout_s: float = 2.0,
        equivalence: AnswerEquivalence | None = None,
    ):
        self.extract = get_extractor(extractor)
        self.equivalence = equivalence or AnswerEquivalence(timeout_s)

    def __call__(self, group: Group, scorer: Scorer | None = None) -> GroupReward:
        if group.label is None:
            raise ValueError("GroundTruthReward needs group.label; this group has none")
        answers = [self.extract(text) for text in group.texts]
        clusters, representatives = cluster_answers(answers, self.equivalence)
        rewards = [float(self.equivalence.is_correct(a, group.label)) for a in answers]
        verdicts = [self.equivalence.is_correct(rep, group.label) for rep in representatives]
        return GroupReward(
            rewards=rewards,
            answers=answers,
            clusters=clusters,
            scores=list(rewards),
            verdicts=verdicts,
            components={"correct": list(rewards)},
        )
