"""Self-reward diagnostics against ground-truth labels (docs/covo.md, Diagnostics).

Labels are read here only, never by a reward. Every function takes one `GroupReward` and one
label per prompt; prompts whose label is None are left out. A response is correct when its own
answer matches the label (no answer: incorrect); a cluster is correct when its representative,
the answer of its first member, matches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torchmetrics.functional.classification import binary_auroc

from covo.answers import AnswerEquivalence
from covo.rewards.base import GroupReward


def auroc(scores: Sequence[float], positives: Sequence[bool]) -> float:
    """Area under the ROC curve (torchmetrics' `binary_auroc`) in float64.

    Equals P(score of a random positive > score of a random negative), ties counting 1/2.
    NaN when either class is empty.

    >>> auroc([0.9, 0.5, 0.5, 0.1], [True, True, False, False])  # (1 + 1 + 0.5 + 1) / 4
    0.875
    """
    n_pos = sum(bool(p) for p in positives)
    if n_pos == 0 or n_pos == len(positives):
        return math.nan
    target = torch.tensor([bool(p) for p in positives], dtype=torch.long)
    return binary_auroc(torch.tensor(scores, dtype=torch.float64), target).item()


def _labelled(results: list[GroupReward], labels: list[str | None]):
    return [(res, label) for res, label in zip(results, labels) if label is not None]


def _cluster_sizes(clusters: list[int]) -> list[int]:
    return [clusters.count(c) for c in range(max(clusters, default=-1) + 1)]


def _cluster_correct(res: GroupReward, label: str, equivalence: AnswerEquivalence) -> list[bool]:
    reps = [res.answers[res.clusters.index(c)] for c in range(len(_cluster_sizes(res.clusters)))]
    return [equivalence.is_correct(rep, label) for rep in reps]


def _first_max(values: list[float]) -> int:
    """Index of the largest value, the earliest on ties; NaN ranks below everything."""
    keyed = [-math.inf if math.isnan(v) else v for v in values]
    return keyed.index(max(keyed))


def _top_by_score(res: GroupReward) -> int:
    """Cluster with the highest mean score over its members (-1 without answers)."""
    k = len(_cluster_sizes(res.clusters))
    if k == 0:
        return -1
    means = []
    for c in range(k):
        member = [s for s, ci in zip(res.scores, res.clusters) if ci == c and not math.isnan(s)]
        means.append(math.fsum(member) / len(member) if member else math.nan)
    return _first_max(means)


def _majority(res: GroupReward) -> int:
    sizes = _cluster_sizes(res.clusters)
    return sizes.index(max(sizes)) if sizes else -1


def _entropy(sizes: list[int]) -> float:
    total = sum(sizes)
    return -math.fsum(n / total * math.log(n / total) for n in sizes)


def _mean(values: list[float]) -> float:
    return math.fsum(values) / len(values) if values else math.nan


def _share(part: float, whole: float) -> float:
    return part / whole if whole else math.nan


@dataclass
class PromptOutcome:
    """One labelled prompt's share of the diagnostics, to be pooled over prompts.

    `verdict_hits` / `majority_hits` / `passed`: per cluster, 1.0 when the reward's verdict
    (/ "is the majority cluster") equals the cluster's correctness, and 1.0 when the verdict
    passed; empty unless K >= 2 and the reward passes a verdict per cluster; `judged_correct`
    and `judged_sizes`: the correctness and member count of those same clusters. `scores` /
    `correct`: the finite per-response scores and each response's correctness. `label_hit` /
    `majority_label_hit`: the top cluster (highest mean score / most members; ties -> earliest)
    is correct. `num_answers`: K; `entropy`: of the cluster sizes (NaN without answers).
    """

    verdict_hits: list[float]
    majority_hits: list[float]
    passed: list[float]
    judged_correct: list[bool]
    judged_sizes: list[int]
    scores: list[float]
    correct: list[bool]
    label_hit: float
    majority_label_hit: float
    num_answers: int
    entropy: float


def prompt_outcome(res: GroupReward, label: str, equivalence: AnswerEquivalence) -> PromptOutcome:
    """The diagnostics' pieces of one prompt (see `PromptOutcome`)."""
    sizes = _cluster_sizes(res.clusters)
    cluster_correct = _cluster_correct(res, label, equivalence)
    top, majority = _top_by_score(res), _majority(res)
    verdict_hits, majority_hits, passed = [], [], []
    # Rewards that pass no verdict per cluster are left out of reward accuracy.
    if len(sizes) >= 2 and len(res.verdicts) == len(sizes):
        for c, is_correct in enumerate(cluster_correct):
            verdict_hits.append(float(bool(res.verdicts[c]) == is_correct))
            majority_hits.append(float((c == majority) == is_correct))
            passed.append(float(bool(res.verdicts[c])))
    finite = [(a, s) for a, s in zip(res.answers, res.scores) if math.isfinite(s)]
    return PromptOutcome(
        verdict_hits=verdict_hits,
        majority_hits=majority_hits,
        passed=passed,
        judged_correct=cluster_correct if passed else [],
        judged_sizes=sizes if passed else [],
        scores=[s for _, s in finite],
        correct=[equivalence.is_correct(a, label) for a, _ in finite],
        label_hit=float(top >= 0 and cluster_correct[top]),
        majority_label_hit=float(majority >= 0 and cluster_correct[majority]),
        num_answers=len(sizes),
        entropy=_entropy(sizes) if sizes else math.nan,
    )


def verdict_counts(outcomes: list[PromptOutcome]) -> dict[str, int]:
    """Judged clusters (prompts with K >= 2) pooled over `outcomes`: `correct_clusters` and
    those of them `correct_passed`, `wrong_clusters` and those `wrong_rejected`, `passed` ones
    and those of them `passed_singletons` (one member)."""
    names = (
        "correct_clusters",
        "correct_passed",
        "wrong_clusters",
        "wrong_rejected",
        "passed",
        "passed_singletons",
    )
    counts = dict.fromkeys(names, 0)
    for o in outcomes:
        for verdict, correct, size in zip(o.passed, o.judged_correct, o.judged_sizes):
            passed = verdict > 0
            counts["correct_clusters" if correct else "wrong_clusters"] += 1
            counts["correct_passed"] += correct and passed
            counts["wrong_rejected"] += not correct and not passed
            counts["passed"] += passed
            counts["passed_singletons"] += passed and size == 1
    return counts


def verdict_diagnostics(outcomes: list[PromptOutcome]) -> dict[str, float]:
    """Where a reward's verdicts go, over the clusters of prompts with K >= 2, pooled as
    `diag/reward_accuracy` pools them (NaN where a share has no clusters to count):

    - correct_pass_rate: share of the correct clusters that passed;
    - wrong_reject_rate: share of the wrong clusters that failed;
    - balanced_reward_accuracy: the mean of the two (0.5 for passing all or rejecting all,
      however few clusters are correct);
    - pass_precision: share of the passed clusters that are correct;
    - singleton_pass_share: share of the passed clusters that have one member.
    """
    n = verdict_counts(outcomes)
    passes = _share(n["correct_passed"], n["correct_clusters"])
    rejects = _share(n["wrong_rejected"], n["wrong_clusters"])
    return {
        "diag/balanced_reward_accuracy": (passes + rejects) / 2,
        "diag/correct_pass_rate": passes,
        "diag/wrong_reject_rate": rejects,
        "diag/pass_precision": _share(n["correct_passed"], n["passed"]),
        "diag/singleton_pass_share": _share(n["passed_singletons"], n["passed"]),
    }


def reward_diagnostics(
    results: list[GroupReward], labels: list[str | None], equivalence: AnswerEquivalence
) -> dict[str, float]:
    """Batch diagnostics of one step: `diag/...` -> value, only the entries defined here.

    - reward_accuracy / majority_reward_accuracy: over prompts with >= 2 clusters, the share of
      all their clusters (pooled) whose verdict (the reward's / "is the majority cluster")
      equals the cluster's correctness (paper Fig. 5).
    - auroc: `scores` against correctness over all responses (non-finite scores left out).
    - label_accuracy / majority_label_accuracy: share of prompts whose top cluster (highest
      mean score / most members; ties -> earliest) is correct; no answers count as wrong.
    - num_answers: mean clusters per prompt; answer_entropy: mean entropy (nats) of the
      cluster-size distribution over prompts with at least one answer;
    - the verdict shares of `verdict_diagnostics`.
    """
    outcomes = [
        prompt_outcome(res, label, equivalence) for res, label in _labelled(results, labels)
    ]

    def pooled(name: str) -> list:
        return [value for o in outcomes for value in getattr(o, name)]

    metrics = {
        "diag/reward_accuracy": _mean(pooled("verdict_hits")),
        "diag/majority_reward_accuracy": _mean(pooled("majority_hits")),
        "diag/auroc": auroc(pooled("scores"), pooled("correct")),
        "diag/label_accuracy": _mean([o.label_hit for o in outcomes]),
        "diag/majority_label_accuracy": _mean([o.majority_label_hit for o in outcomes]),
        "diag/num_answers": _mean([float(o.num_answers) for o in outcomes]),
        "diag/answer_entropy": _mean([o.entropy for o in outcomes if o.num_answers]),
        **verdict_diagnostics(outcomes),
    }
    return {name: value for name, value in metrics.items() if not math.isnan(value)}


def distance_curves(
    results: list[GroupReward],
    labels: list[str | None],
    equivalence: AnswerEquivalence,
    key: str = "ratios",
    bins: int = 10,
) -> dict[str, list[float] | int]:
    """Mean distance ratio r_i per bin of state position, correct vs incorrect (paper Fig. 2).

    State i of a trajectory with T states sits at position (i + 1) / T in (0, 1]: the share of
    its steps the state has seen under the released-code states (with `include_prompt_state`
    each state has seen one step less). Bin b covers (b / bins, (b + 1) / bins]. Reads
    `details[key][i]` (r per state, None when not scored). Returns `bin_centers` [bins] and,
    for `correct` and `incorrect`, `<which>_mean` [bins] (NaN for empty bins), `<which>_count`
    [bins] (states per bin) and `<which>_trajectories` (int). Non-finite ratios are skipped.
    """
    sums = {which: [0.0] * bins for which in ("correct", "incorrect")}
    counts = {which: [0] * bins for which in ("correct", "incorrect")}
    trajectories = {"correct": 0, "incorrect": 0}
    for res, label in _labelled(results, labels):
        for answer, ratios in zip(res.answers, res.details.get(key, [])):
            if not ratios:
                continue
            which = "correct" if equivalence.is_correct(answer, label) else "incorrect"
            trajectories[which] += 1
            T = len(ratios)
            for i, r in enumerate(ratios):
                if math.isfinite(r):
                    # Integer form of ceil((i + 1) / T * bins) - 1: exact at bin edges.
                    b = ((i + 1) * bins - 1) // T
                    sums[which][b] += r
                    counts[which][b] += 1
    out: dict[str, list[float] | int] = {"bin_centers": [(b + 0.5) / bins for b in range(bins)]}
    for which in ("correct", "incorrect"):
        out[f"{which}_mean"] = [
            s / n if n else math.nan for s, n in zip(sums[which], counts[which])
        ]
        out[f"{which}_count"] = counts[which]
        out[f"{which}_trajectories"] = trajectories[which]
    return out


def consistency_volatility_values(
    results: list[GroupReward], labels: list[str | None], equivalence: AnswerEquivalence
) -> dict[str, list[float]]:
    """Per-response `consistency` / `volatility` components split by correctness.

    Keys `consistency/correct`, `consistency/incorrect`, `volatility/correct`,
    `volatility/incorrect`; NaN entries (responses not judged) are skipped and empty lists
    left out, so every value can go to a histogram as it is.
    """
    values: dict[str, list[float]] = {}
    for res, label in _labelled(results, labels):
        correct = [equivalence.is_correct(answer, label) for answer in res.answers]
        for name in ("consistency", "volatility"):
            for value, is_correct in zip(res.components.get(name, []), correct):
                if not math.isnan(value):
                    which = "correct" if is_correct else "incorrect"
                    values.setdefault(f"{name}/{which}", []).append(value)
    return values
