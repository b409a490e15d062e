"""Self-Harmony (arXiv 2511.01191): the pseudo-label is the answer that stays frequent when the
question is reframed, chosen by the harmonic mean of its vote shares in the views."""

from __future__ import annotations

from collections.abc import Mapping
from fractions import Fraction

from covo.answers import AnswerEquivalence, cluster_answers
from covo.rewards.answered import AnswerClustering
from covo.rewards.base import Group, GroupReward, Scorer
from covo.rollout.views import check_views

REFRAME = (
    "{prompt}\n"
    "First restate the problem in your own words (with concrete values, in a more general "
    "form, or in another setting), then solve your restatement step by step and put the "
    "final answer within \\boxed{}."
)


def harmonic_pseudo_label(
    view_clusters: list[list[int]], num_clusters: int
) -> tuple[int, list[float]]:
    """(pseudo-label cluster or -1, harmonic mean per cluster) from each view's cluster ids.

    `view_clusters[v][i]` is the joint cluster of response i of view v (-1: no answer); a
    cluster's share in a view is its count over that view's N. The harmonic mean of a cluster
    missing from any view is 0, and no cluster with a score of 0 becomes the label. Ties go to
    the larger summed share, then to the cluster seen first.

    >>> harmonic_pseudo_label([[0, 0, 0, 1], [1, 1, 2, 2]], 3)  # 0 never appears reframed
    (1, [0.0, 0.3333333333333333, 0.0])
    """
    # exact fractions: equal scores are ties, not rounding noise
    shares = [[Fraction(v.count(c), len(v)) for c in range(num_clusters)] for v in view_clusters]
    harmony, total = [], []
    for c in range(num_clusters):
        per_view = [s[c] for s in shares]
        present = all(p > 0 for p in per_view)
        harmony.append(len(per_view) / sum(1 / p for p in per_view) if present else Fraction(0))
        total.append(sum(per_view))
    best = max(range(num_clusters), key=lambda c: (harmony[c], total[c], -c), default=-1)
    return (best if best >= 0 and harmony[best] > 0 else -1), [float(h) for h in harmony]


class SelfHarmonyReward(AnswerClustering):
    """r = 1 for a response of the original view whose answer is the pseudo-label, else 0
    (all 0 when no answer appears in every view).

    `views` maps a view's name to its prompt template (`{prompt}` is the original prompt);
    the rollout samples each as a group of N of its own. Answers of all views are clustered
    together. With `train_views` the views' responses are trained on too, rewarded against
    the same pseudo-label.
    """

    def __init__(
        self,
        views: Mapping[str, str] | None = None,
        train_views: bool = False,
        extractor: str = "boxed_or_last_number",
        timeout_s: float = 2.0,
        equivalence: AnswerEquivalence | None = None,
    ):
        super().__init__(extractor, timeout_s, equivalence)
        self.views = check_views({"reframed": REFRAME} if views is None else views)
        if not self.views:
            raise ValueError("reward.views must name at least one view for self_harmony")
        self.train_views = train_views

    def __call__(self, group: Group, scorer: Scorer | None = None) -> GroupReward:
        missing = [name for name in self.views if name not in group.views]
        if missing:
            raise ValueError(
                f"self_harmony needs the view {missing[0]!r} in Group.views; "
                f"this group has {sorted(group.views)}"
            )
        groups = [group, *(group.views[name] for name in self.views)]
        answers = [[self.extract(text) for text in g.texts] for g in groups]
        joint, representatives = cluster_answers(
            [a for view in answers for a in view], self.equivalence
        )
        view_clusters, start = [], 0
        for view in answers:
            view_clusters.append(joint[start : start + len(view)])
            start += len(view)
        label, harmony = harmonic_pseudo_label(view_clusters, len(representatives))

        def agree(ids: list[int]) -> list[float]:
            return [float(label >= 0 and c == label) for c in ids]

        own = view_clusters[0]
        # the original view is clustered first: its clusters are exactly 0 .. K0 - 1
        own_count = max(own, default=-1) + 1
        scores = [harmony[c] if c >= 0 else 0.0 for c in own]
        return GroupReward(
            rewards=agree(own),
            answers=answers[0],
            clusters=own,
            scores=scores,
            verdicts=[c == label for c in range(own_count)],
            components={"harmony": scores},
            group_metrics={
                "pseudo_label_found": float(label >= 0),
                "view_answered_frac": sum(a is not None for a in answers[1]) / len(answers[1]),
            },
            view_rewards={name: agree(ids) for name, ids in zip(self.views, view_clusters[1:])},
        )
