"""Reward by number of states: does a reward pay for answers with hardly any reasoning?

A bare one-line answer has one state, hence CoVo's best Con (1) and Vol (0); a drift of the
policy towards such answers shows as a rising share of one-state responses and a high reward
for them. Counts responses a reward scored with `num_states` (CoVo: those with an answer in
groups with K >= 2), in the buckets T = 1, 2-3 and >= 4.
"""

from __future__ import annotations

import math

from covo.answers import AnswerEquivalence
from covo.rewards.base import GroupReward

# bucket name -> (fewest, most) states
BUCKETS = {"1": (1, 1), "2_3": (2, 3), "4plus": (4, math.inf)}
BUCKET_LABELS = {"1": "1", "2_3": "2-3", "4plus": "4+"}
# per bucket: responses, their reward sum, the correct ones among them
Counts = dict[str, list[float]]


def bucket_of(num_states: float) -> str | None:
    """The bucket of a response with `num_states` states; None when it was not scored (NaN).

    >>> [bucket_of(t) for t in (1.0, 3.0, 15.0, math.nan)]
    ['1', '2_3', '4plus', None]
    """
    for name, (low, high) in BUCKETS.items():
        if low <= num_states <= high:
            return name
    return None


def state_counts(res: GroupReward, correct: list[bool] | None = None) -> Counts:
    """[responses, reward sum, correct responses] per bucket of one group; the correct count
    stays 0 without `correct` (one bool per response)."""
    counts = {name: [0, 0.0, 0] for name in BUCKETS}
    for i, num_states in enumerate(res.components.get("num_states", [])):
        name = bucket_of(num_states)
        if name is not None:
            counts[name][0] += 1
            counts[name][1] += res.rewards[i]
            counts[name][2] += bool(correct and correct[i])
    return counts


def labelled_counts(res: GroupReward, label: str | None, equivalence: AnswerEquivalence) -> Counts:
    """`state_counts` with each response's answer checked against `label` (if any)."""
    if label is None:
        return state_counts(res)
    return state_counts(res, [equivalence.is_correct(answer, label) for answer in res.answers])


def pool(counts: list[Counts]) -> Counts:
    """The bucket-wise sums of several groups' counts."""
    return {name: [sum(c[name][j] for c in counts) for j in range(3)] for name in BUCKETS}


def state_metrics(results: list[GroupReward]) -> dict[str, float]:
    """`diag/reward_states_<bucket>`: mean reward of the responses with that many states;
    `diag/one_state_share`: their share with T = 1. Only the entries with responses."""
    counts = pool([state_counts(res) for res in results])
    total = sum(responses for responses, _, _ in counts.values())
    metrics = {
        f"diag/reward_states_{name}": rewards / responses
        for name, (responses, rewards, _) in counts.items()
        if responses
    }
    if total:
        metrics["diag/one_state_share"] = counts["1"][0] / total
    return metrics


def states_table(counts: Counts, with_correct: bool) -> str:
    """A Markdown table of the responses per bucket, their share, mean reward and (with
    labels) the share of them that is correct."""
    total = sum(responses for responses, _, _ in counts.values())
    header = "| states | responses | share | mean reward |" + (" correct |" if with_correct else "")
    lines = [header, "|---|---:|---:|---:|" + ("---:|" if with_correct else "")]
    for name, (responses, rewards, correct) in counts.items():
        cells = [BUCKET_LABELS[name], str(int(responses))]
        if responses:
            cells += [f"{responses / total:.3f}", f"{rewards / responses:.4f}"]
            cells += [f"{correct / responses:.3f}"] if with_correct else []
        else:
            cells += ["-"] * (3 if with_correct else 2)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
