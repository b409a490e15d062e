"""The part rewards share: extract each response's answer and cluster the group's answers."""

from __future__ import annotations

from covo.answers import EXTRACTORS, AnswerEquivalence, cluster_answers, get_extractor
from covo.infra.checks import above, check, choice
from covo.rewards.base import Group


class AnswerClustering:
    """Extractor and (cached) answer equivalence, set by the reward's config; a value out of
    range raises a `covo.infra.checks.BadSetting` naming its argument."""

    def __init__(
        self,
        extractor: str = "boxed_or_last_number",
        timeout_s: float = 2.0,
        equivalence: AnswerEquivalence | None = None,
    ):
        check("reward.extractor", extractor, *choice(*EXTRACTORS))
        check("reward.timeout_s", timeout_s, above(0.0), "a number > 0")
        self.extract = get_extractor(extractor)
        self.equivalence = equivalence or AnswerEquivalence(timeout_s)

    def answers_and_clusters(self, group: Group) -> tuple[list[str | None], list[int], list[str]]:
        """(answer per response, cluster per response (-1: none), representative per cluster)."""
        answers = [self.extract(text) for text in group.texts]
        clusters, representatives = cluster_answers(answers, self.equivalence)
        return answers, clusters, representatives
