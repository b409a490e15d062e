"""Majority vote (TTRL): the group's most frequent answer stands in for the label."""

from __future__ import annotations

from covo.answers import AnswerEquivalence, cluster_answers, get_extractor
from covo.rewards.base import Group, GroupReward, Scorer


class MajorityReward:
    """1.0 for responses in the largest answer cluster, 0.0 for the rest and for no-answers.

    Ties go to the cluster that appears first in sample order. The score is the cluster's
    vote share: its size over the group size N.
    """

    def __init__(
        self,
        extractor: str = "boxed_or_last_number",
        timeout_s: float = 2.0,
        equivalence: AnswerEquivalence | None = None,
    ):
        self.extract = get_extractor(extractor)
        self.equivalence = equivalence or AnswerEquivalence(timeout_s)

    def __call__(self, group: Group, scorer: Scorer | None = None) -> GroupReward:
        answers = [self.extract(text) for text in group.texts]
        clusters, representatives = cluster_answers(answers, self.equivalence)
        counts = [clusters.count(c) for c in range(len(representatives))]
        # list.index of the max returns the first cluster reaching it: the sample-order tie rule.
        winner = counts.index(max(counts)) if counts else -1
        shares = [counts[c] / group.size if c >= 0 else 0.0 for c in clusters]
        rewards = [float(c >= 0 and c == winner) for c in clusters]
        return GroupReward(
            rewards=rewards,
            answers=answers,
            clusters=clusters,
            scores=shares,
            verdicts=[c == winner for c in range(len(representatives))],
            components={"majority_share": list(shares)},
        )
