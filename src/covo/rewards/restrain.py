"""RESTRAIN (arXiv 2510.02172): every answer of the group is a soft pseudo-label, weighted by
its vote share; a group without enough agreement is penalised as a whole."""

from __future__ import annotations

import math

from covo.answers import AnswerEquivalence
from covo.infra.checks import above, between, check
from covo.rewards.answered import AnswerClustering
from covo.rewards.base import Group, GroupReward, Scorer


def gaussian(share: float, center: float, sigma: float) -> float:
    """The paper's shaping function g: a Gaussian bump of the vote share."""
    return math.exp(-((share - center) ** 2) / (2 * sigma**2))


class RestrainReward(AnswerClustering):
    """With f_j the vote share of answer j (count / N) and M the largest share:

    - pseudo-label weights w_j = g(f_j) / sum_l g(f_l), g(f) = exp(-(f - center)^2 / 2 sigma^2);
    - M < `min_majority_share` (no answer counts as M = 0): every response gets -`penalty`;
    - otherwise r_i = u * w_j for response i with answer j (0 without an answer), where the
      prompt weight u = g(M) shrinks low-consistency groups (1 when `prompt_weighting` is off).

    The paper sums per-pseudo-label GRPO losses weighted by w_j; as a reward, response i gets the
    weight of the label it matches, which is that sum before each label's own normalisation.
    Its penalty is an offset -delta on the advantages and its prompt weight comes from the
    frozen base model, computed once offline; here both act on the reward, online. Under a
    group-normalised estimator (GRPO, RLOO) a constant penalty cancels: use REINFORCE++.
    """

    def __init__(
        self,
        center: float = 1.0,
        sigma: float = 0.5,
        min_majority_share: float = 0.3,
        penalty: float = 0.5,
        prompt_weighting: bool = True,
        extractor: str = "boxed_or_last_number",
        timeout_s: float = 2.0,
        equivalence: AnswerEquivalence | None = None,
    ):
        super().__init__(extractor, timeout_s, equivalence)
        check("reward.sigma", sigma, above(0.0), "a number > 0")
        check(
            "reward.min_majority_share", min_majority_share, between(0.0, 1.0), "a number in [0, 1]"
        )
        self.center, self.sigma = center, sigma
        self.min_majority_share = min_majority_share
        self.penalty = penalty
        self.prompt_weighting = prompt_weighting

    def __call__(self, group: Group, scorer: Scorer | None = None) -> GroupReward:
        answers, clusters, representatives = self.answers_and_clusters(group)
        shares = [clusters.count(c) / group.size for c in range(len(representatives))]
        shaped = [gaussian(f, self.center, self.sigma) for f in shares]
        weights = [g / math.fsum(shaped) for g in shaped]
        top = max(shares, default=0.0)
        penalized = top < self.min_majority_share
        prompt_weight = gaussian(top, self.center, self.sigma) if self.prompt_weighting else 1.0
        own = [weights[c] if c >= 0 else 0.0 for c in clusters]
        rewards = [-self.penalty] * group.size if penalized else [prompt_weight * w for w in own]
        winner = -1 if penalized or not shares else shares.index(top)
        return GroupReward(
            rewards=rewards,
            answers=answers,
            clusters=clusters,
            scores=list(own),
            verdicts=[c == winner for c in range(len(representatives))],
            components={"pseudo_label_weight": own},
            group_metrics={"prompt_weight": prompt_weight, "penalized": float(penalized)},
        )
