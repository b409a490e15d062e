"""Per-step metrics from a rollout and its rewards (names as listed in docs/metrics.md)."""

from __future__ import annotations

import math

import torch

from covo.algorithms.losses import masked_mean
from covo.algorithms.update import UpdatePlan
from covo.answers import AnswerEquivalence
from covo.metrics.diagnostics import reward_diagnostics
from covo.metrics.states import state_metrics
from covo.rewards.base import Group, GroupReward
from covo.rewards.scoring import Scored
from covo.rollout.sampling import Rollout


def nanmean(values: list[float]) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def rollout_metrics(rollout: Rollout, keep: torch.Tensor) -> dict[str, float]:
    lengths = rollout.response_mask.sum(1)
    return {
        "rollout/len_mean": float(lengths.mean()),
        "rollout/len_max": float(lengths.max()),
        "rollout/truncated_frac": float(rollout.truncated.float().mean()),
        "rollout/kept_frac": float(keep.float().mean()),
        "train/entropy": float(
            (rollout.entropy * rollout.response_mask).sum() / rollout.response_mask.sum()
        ),
        "rollout/self_certainty": float(
            (rollout.self_certainty * rollout.response_mask).sum() / rollout.response_mask.sum()
        ),
    }


def group_token_metrics(groups: list[Group]) -> dict[str, float]:
    """`train/entropy` and `rollout/self_certainty` of groups of given responses (TRL's): the
    means over every response token, as `rollout_metrics` gives them for a rollout but without
    the EOS token, which a `Group` does not hold; none without tokens."""
    entropy = torch.cat([t for group in groups for t in group.token_entropy] or [torch.zeros(0)])
    if not entropy.numel():
        return {}
    certainty = torch.cat([t for group in groups for t in group.token_self_certainty])
    return {
        "train/entropy": float(entropy.mean()),
        "rollout/self_certainty": float(certainty.mean()),
    }


def answer_metrics(results: list[GroupReward]) -> dict[str, float]:
    """How much each group agrees on its answers, without labels; means over groups.

    - answer_entropy: entropy (nats) of the group's answer distribution over all N responses,
      each response without an answer counting as an answer of its own (no agreement);
    - top_answer_share: size of the largest answer cluster / N (0 without answers);
    - distinct_answers: number of answer clusters;
    - reward/zero_var_frac: share of groups whose rewards are all equal (no group signal).
    """
    entropies, shares, distinct, flat = [], [], [], []
    for res in results:
        n = len(res.clusters)
        sizes = [res.clusters.count(c) for c in set(res.clusters) if c >= 0]
        outcomes = sizes + [1] * res.clusters.count(-1)
        entropies.append(-math.fsum(k / n * math.log(k / n) for k in outcomes))
        shares.append(max(sizes, default=0) / n)
        distinct.append(float(len(sizes)))
        flat.append(float(len(set(res.rewards)) <= 1))
    return {
        "rollout/answer_entropy": nanmean(entropies),
        "rollout/top_answer_share": nanmean(shares),
        "rollout/distinct_answers": nanmean(distinct),
        "reward/zero_var_frac": nanmean(flat),
    }


def correctness(
    results: list[GroupReward], labels: list[str | None], equivalence: AnswerEquivalence
) -> list[list[bool]] | None:
    """Per group, per response: is the extracted answer right? None when labels are missing."""
    if any(label is None for label in labels):
        return None
    return [
        [equivalence.is_correct(answer, label) for answer in res.answers]
        for res, label in zip(results, labels)
    ]


def reward_metrics(
    results: list[GroupReward],
    rewards: torch.Tensor,
    labels: list[str | None],
    equivalence: AnswerEquivalence,
) -> dict[str, float]:
    metrics = {
        "reward/mean": float(rewards.mean()),
        "reward/std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
        "reward/answered_frac": nanmean(
            [float(a is not None) for res in results for a in res.answers]
        ),
    }
    for name in sorted({n for res in results for n in res.components}):
        metrics[f"reward/{name}"] = nanmean(
            [v for res in results for v in res.components.get(name, [])]
        )
    for name in sorted({n for res in results for n in res.group_metrics}):
        values = [res.group_metrics[name] for res in results if name in res.group_metrics]
        metrics[f"reward/{name}"] = nanmean(values)
    metrics.update(answer_metrics(results))
    correct = correctness(results, labels, equivalence)
    if correct is not None:
        metrics["diag/accuracy"] = nanmean([float(c) for group in correct for c in group])
    metrics.update(reward_diagnostics(results, labels, equivalence))
    metrics.update(state_metrics(results))
    return {k: v for k, v in metrics.items() if not math.isnan(v)}


def step_metrics(
    trained: Rollout,
    scored: Scored,
    plan: UpdatePlan,
    update: dict[str, float],
    timings: dict[str, float],
    equivalence: AnswerEquivalence,
    lr: float | None,
) -> dict[str, float]:
    """A training step's values. `trained` holds the rows the update saw (the rollout's, plus
    other views' when the reward trains on them), `scored` the rollout's rewards; `lr`, the
    last optimizer step's, is logged with an update."""
    metrics = {
        **rollout_metrics(trained, plan.keep),
        **reward_metrics(scored.results, scored.rewards, scored.labels, equivalence),
        **update,
        **timings,
        **scored.counts,
    }
    if update:
        metrics["train/lr"] = lr
    if plan.old_logprobs is not None and plan.ref_logprobs is not None:
        mask = trained.response_mask * plan.keep[:, None]
        metrics["train/kl"] = float(masked_mean(plan.old_logprobs - plan.ref_logprobs, mask))
    tokens = float(trained.response_mask.sum())
    step_time = sum(v for k, v in timings.items() if k != "time/scoring_s")
    metrics["perf/tokens_per_s"] = tokens / max(step_time, 1e-9)
    return metrics


def sample_table(
    rollout: Rollout, results: list[GroupReward], labels: list[str | None], per_group: int = 2
) -> str:
    """A Markdown table of a few responses per prompt, for TensorBoard's text tab."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", "<br>")[:1500]

    rows = ["| prompt | label | response | answer | reward |", "|---|---|---|---|---|"]
    n = rollout.group_size
    for b, res in enumerate(results):
        for i in range(min(per_group, n)):
            rows.append(
                f"| {b} | {cell(str(labels[b]))} | {cell(rollout.texts[b * n + i])} "
                f"| {cell(str(res.answers[i]))} | {res.rewards[i]:.3f} |"
            )
    return "\n".join(rows)
