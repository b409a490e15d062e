"""Supervised reference reward: 1 when the extracted answer matches the group's label."""

from __future__ import annotations

from covo.answers import AnswerEquivalence
from covo.infra.errors import DataError
from covo.rewards.answered import AnswerClustering
from covo.rewards.base import Group, GroupReward, Scorer


class GroundTruthReward(AnswerClustering):
    """`scale` for a response whose answer matches `group.label`, else 0.0 (no answer: 0.0).

    `scale: -1` (`reward=negated_ground_truth`) punishes correct answers: a control under which
    a learning policy must get worse.
    """

    needs_labels = True

    def __init__(
        self,
        extractor: str = "boxed_or_last_number",
        timeout_s: float = 2.0,
        equivalence: AnswerEquivalence | None = None,
        scale: float = 1.0,
    ):
        super().__init__(extractor, timeout_s, equivalence)
        self.scale = scale

    def __call__(self, group: Group, scorer: Scorer | None = None) -> GroupReward:
        if group.label is None:
            raise DataError("GroundTruthReward needs labels: this item has no answer")
        answers, clusters, representatives = self.answers_and_clusters(group)
        correct = [float(self.equivalence.is_correct(a, group.label)) for a in answers]
        verdicts = [self.equivalence.is_correct(rep, group.label) for rep in representatives]
        return GroupReward(
            rewards=[self.scale * c for c in correct],
            answers=answers,
            clusters=clusters,
            scores=list(correct),
            verdicts=verdicts,
            components={"correct": correct},
        )
