"""Per-item metrics over n sampled responses: unbiased pass@k and majority-vote maj@k."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence

from covo.answers import cluster_answers


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al., 2021) from n samples of which c are correct.

    1 - C(n-c, k) / C(n, k), written as 1 - prod_{i=n-c+1..n} (1 - k/i) so that no large
    binomial is formed.
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def majority_vote(answers: Sequence[str | None], same: Callable[[str, str], bool]) -> int | None:
    """Index of the first sample of the largest answer cluster; None when nothing answered.

    Clusters are formed in sample order (`cluster_answers`); responses without an answer do
    not vote. A tie goes to the cluster whose first member came earliest.
    """
    clusters, representatives = cluster_answers(list(answers), same)
    if not representatives:
        return None
    votes = Counter(c for c in clusters if c >= 0)
    # max keeps the first of equal maxima, and cluster ids follow first appearance
    winner = max(range(len(representatives)), key=lambda c: votes[c])
    return clusters.index(winner)


def maj_at_k(
    answers: Sequence[str | None],
    correct: Sequence[bool],
    k: int,
    same: Callable[[str, str], bool],
) -> float:
    """1.0 if the majority answer of the first k samples is correct, else 0.0."""
    if not 1 <= k <= len(answers):
        raise ValueError(f"maj@{k} needs at least {k} samples, got {len(answers)}")
    winner = majority_vote(answers[:k], same)
    return float(winner is not None and correct[winner])


def item_metrics(
    answers: Sequence[str | None],
    correct: Sequence[bool],
    ks: Sequence[int],
    same: Callable[[str, str], bool],
) -> dict[str, float]:
    """`pass@k` for every k and `maj@k` for every k > 1 (maj@1 is just the first sample)."""
    n, c = len(correct), sum(map(bool, correct))
    metrics = {f"pass@{k}": pass_at_k(n, c, k) for k in ks}
    metrics.update({f"maj@{k}": maj_at_k(answers, correct, k, same) for k in ks if k > 1})
    return metrics


def mean_metrics(per_item: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over items (all items carry the same keys)."""
    if not per_item:
        return {}
    return {key: sum(m[key] for m in per_item) / len(per_item) for key in per_item[0]}
