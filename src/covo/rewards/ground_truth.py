"""Supervised reference reward: 1 when the extracted answer matches the group's label."""

from __future__ import annotations

from covo.infra.errors import DataError
from covo.rewards.answered import AnswerClustering
from covo.rewards.base import Group, GroupReward, Scorer


class GroundTruthReward(AnswerClustering):
    """1.0 for a response whose answer matches `group.label`, else 0.0 (no answer: 0.0)."""

    needs_labels = True

    def __call__(self, group: Group, scorer: Scorer | None = None) -> GroupReward:
        if group.label is None:
            raise DataError("GroundTruthReward needs labels: this item has no answer")
        answers, clusters, representatives = self.answers_and_clusters(group)
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
