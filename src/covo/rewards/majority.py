"""Voting rewards: majority vote (TTRL) and vote share (EMPO)."""

from __future__ import annotations

from covo.rewards.answered import AnswerClustering
from covo.rewards.base import Group, GroupReward, Scorer


class MajorityReward(AnswerClustering):
    """1.0 for responses in the largest answer cluster, 0.0 for the rest and for no-answers.

    Ties go to the cluster that appears first in sample order. The score is the cluster's
    vote share: its size over the group size N.
    """

    def __call__(self, group: Group, scorer: Scorer | None = None) -> GroupReward:
        answers, clusters, representatives = self.answers_and_clusters(group)
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


class VoteShareReward(AnswerClustering):
    """Vote share (EMPO's semantic-entropy reward for maths): r_i = size of response i's
    answer cluster / N; 0 without an answer. The cluster with the most votes (the first on
    ties) is the one marked as passing."""

    def __call__(self, group: Group, scorer: Scorer | None = None) -> GroupReward:
        answers, clusters, representatives = self.answers_and_clusters(group)
        counts = [clusters.count(c) for c in range(len(representatives))]
        shares = [counts[c] / group.size if c >= 0 else 0.0 for c in clusters]
        winner = counts.index(max(counts)) if counts else -1
        return GroupReward(
            rewards=list(shares),
            answers=answers,
            clusters=clusters,
            scores=list(shares),
            verdicts=[c == winner for c in range(len(representatives))],
            components={"vote_share": list(shares)},
        )
