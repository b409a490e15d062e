"""The study's numbers: per-reward metrics over prompts with bootstrap intervals, paired
differences against a baseline reward, reward accuracy per bin of the model's accuracy, and
their Markdown tables.

Input: one entry per prompt, `{"accuracy": share of the N samples that are correct,
"rewards": {name: outcome}}`, an outcome holding `hits` and `clusters` (verdicts equal to
correctness, clusters judged: prompts with K >= 2), `passed` (clusters whose verdict passed),
`label_hit` (the reward's top cluster is correct), `scores` and `correct` (per response),
`seconds` (the reward's time) and `scorer_tokens` (tokens its scorer fed), the judged clusters'
`correct_clusters`, `correct_passed`, `wrong_clusters`, `wrong_rejected` and
`passed_singletons` (`covo.metrics.diagnostics.verdict_counts`), and `states`: per bucket of states
[responses, reward sum, correct responses] (`covo.metrics.states`).
"""

from __future__ import annotations

import numpy as np

from covo.analysis.intervals import (
    Statistic,
    difference,
    estimate,
    pooled_auroc,
    ratio_of_sums,
    resample_counts,
    restricted,
)
from covo.metrics.states import BUCKET_LABELS, BUCKETS

METRICS = {
    "reward_accuracy": "reward accuracy",
    "auroc": "AUROC",
    "label_accuracy": "label accuracy",
    "pass_frac": "pass fraction",
    "seconds": "s / prompt",
    "scorer_tokens": "scorer tokens / prompt",
}
VERDICT_METRICS = {
    "balanced_reward_accuracy": "balanced reward accuracy",
    "correct_pass_rate": "correct clusters passed",
    "wrong_reject_rate": "wrong clusters rejected",
    "pass_precision": "passed clusters correct",
    "singleton_pass_share": "passed clusters singletons",
}
STATE_METRICS = {
    "one_state_share": "share T = 1",
    **{f"reward_states_{b}": f"reward T = {BUCKET_LABELS[b]}" for b in BUCKETS},
    **{f"correct_states_{b}": f"correct T = {BUCKET_LABELS[b]}" for b in BUCKETS},
}
LABELS = {**METRICS, **VERDICT_METRICS, **STATE_METRICS}
# paired against the baseline
COMPARED = ("reward_accuracy", "balanced_reward_accuracy", "auroc", "label_accuracy")


def statistics(prompts: list[dict], name: str) -> dict[str, Statistic]:
    """Each metric of reward `name` as a function of prompt weights."""
    out = [p["rewards"][name] for p in prompts]
    ones = np.ones(len(out))

    def column(key: str) -> np.ndarray:
        return np.array([o[key] for o in out], float)

    item_of = [i for i, o in enumerate(out) for _ in o["scores"]]
    return {
        "reward_accuracy": ratio_of_sums(column("hits"), column("clusters")),
        "auroc": pooled_auroc(
            [s for o in out for s in o["scores"]], [c for o in out for c in o["correct"]], item_of
        ),
        "label_accuracy": ratio_of_sums(column("label_hit"), ones),
        "pass_frac": ratio_of_sums(column("passed"), column("clusters")),
        "seconds": ratio_of_sums(column("seconds"), ones),
        "scorer_tokens": ratio_of_sums(column("scorer_tokens"), ones),
        **verdict_statistics(column),
        **state_statistics([o["states"] for o in out]),
    }


def verdict_statistics(column) -> dict[str, Statistic]:
    """Shares of the judged clusters pooled over prompts, as reward accuracy pools them."""
    passes = ratio_of_sums(column("correct_passed"), column("correct_clusters"))
    rejects = ratio_of_sums(column("wrong_rejected"), column("wrong_clusters"))
    return {
        "balanced_reward_accuracy": lambda weights: (passes(weights) + rejects(weights)) / 2,
        "correct_pass_rate": passes,
        "wrong_reject_rate": rejects,
        "pass_precision": ratio_of_sums(column("correct_passed"), column("passed")),
        "singleton_pass_share": ratio_of_sums(column("passed_singletons"), column("passed")),
    }


def state_statistics(states: list[dict]) -> dict[str, Statistic]:
    """Share of the scored responses with one state; mean reward and share correct of the
    responses in each bucket of states, pooled over prompts."""

    def column(bucket: str, j: int) -> np.ndarray:
        return np.array([s[bucket][j] for s in states], float)

    responses = sum(column(b, 0) for b in BUCKETS)
    out = {"one_state_share": ratio_of_sums(column("1", 0), responses)}
    for b in BUCKETS:
        out[f"reward_states_{b}"] = ratio_of_sums(column(b, 1), column(b, 0))
        out[f"correct_states_{b}"] = ratio_of_sums(column(b, 2), column(b, 0))
    return out


def bin_of(accuracy: float, edges: list[float]) -> int:
    """Index of the bin [edges[b], edges[b + 1]) holding `accuracy`; the last bin is closed."""
    for b in range(len(edges) - 1):
        if edges[b] <= accuracy < edges[b + 1] or (b == len(edges) - 2 and accuracy == edges[-1]):
            return b
    raise ValueError(f"accuracy {accuracy} outside accuracy_bins {edges}")


def summarize(
    prompts: list[dict],
    rewards: list[str],
    baseline: str | None,
    edges: list[float],
    resamples: int,
    confidence: float,
    seed: int,
) -> dict:
    """`rewards` / `differences` (reward - baseline, same resamples) per metric, the model's
    accuracy, and `bins`: reward accuracy per bin of the model's per-prompt accuracy, with the
    prompts in each bin and those of them with K >= 2 (`compared`, as the first reward
    clusters them)."""
    counts = resample_counts(len(prompts), resamples, seed)
    stats = {name: statistics(prompts, name) for name in rewards}
    accuracy = np.array([p["accuracy"] for p in prompts])

    def run(statistic: Statistic) -> dict:
        return estimate(statistic, counts, confidence).as_dict()

    out: dict = {
        "model_accuracy": run(ratio_of_sums(accuracy, np.ones(len(prompts)))),
        "rewards": {n: {m: run(s) for m, s in stats[n].items()} for n in rewards},
        "differences": {},
        "bins": [],
    }
    others = [n for n in rewards if baseline is not None and n != baseline]
    for name in others:
        out["differences"][name] = {
            m: run(difference(stats[name][m], stats[baseline][m])) for m in COMPARED
        }
    member = np.array([bin_of(a, edges) for a in accuracy])
    compared = np.array([p["rewards"][rewards[0]]["clusters"] > 0 for p in prompts])
    for b in range(len(edges) - 1):
        inside = member == b
        accuracy_of = {n: restricted(stats[n]["reward_accuracy"], inside) for n in rewards}
        out["bins"].append(
            {
                "low": edges[b],
                "high": edges[b + 1],
                "prompts": int(inside.sum()),
                "compared": int((inside & compared).sum()),
                "reward_accuracy": {n: run(s) for n, s in accuracy_of.items()},
                "differences": {
                    n: run(difference(accuracy_of[n], accuracy_of[baseline])) for n in others
                },
            }
        )
    return out


def cell(e: dict, digits: int = 3) -> str:
    """`value [low, high]`, `-` where undefined."""
    if e["value"] is None:
        return "-"
    if e["low"] is None:
        return f"{e['value']:.{digits}f}"
    return f"{e['value']:.{digits}f} [{e['low']:.{digits}f}, {e['high']:.{digits}f}]"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def bin_label(b: dict, last: bool) -> str:
    return f"[{b['low']:g}, {b['high']:g}{']' if last else ')'}"


def metrics_table(rewards: dict, columns: dict[str, str]) -> str:
    """One row per reward, one column per metric in `columns`."""
    digits = {"seconds": 2, "scorer_tokens": 0}
    return table(
        ["reward", *columns.values()],
        [
            [name, *(cell(metrics[m], digits.get(m, 3)) for m in columns)]
            for name, metrics in rewards.items()
        ],
    )


def markdown(summary: dict, baseline: str | None) -> str:
    """The study's tables: metrics per reward, where the verdicts go, reward by number of
    states, differences against the baseline, and reward accuracy (and its difference) per bin
    of the model's accuracy."""
    rewards = summary["rewards"]
    parts = [
        metrics_table(rewards, METRICS),
        "where the verdicts go (clusters of prompts with K >= 2)\n\n"
        + metrics_table(rewards, VERDICT_METRICS),
        "reward by number of states (responses the reward scored with T states)\n\n"
        + metrics_table(rewards, STATE_METRICS),
    ]
    if summary["differences"]:
        parts.append(
            table(
                [f"reward - {baseline}", *(f"Δ {LABELS[m]}" for m in COMPARED)],
                [[n, *(cell(d[m]) for m in COMPARED)] for n, d in summary["differences"].items()],
            )
        )
    bins = summary["bins"]
    heads = ["model accuracy", "prompts (K >= 2)"]
    count = [f"{b['prompts']} ({b['compared']})" for b in bins]
    labels = [bin_label(b, i == len(bins) - 1) for i, b in enumerate(bins)]
    parts.append(
        "reward accuracy by the model's per-prompt accuracy\n\n"
        + table(
            [*heads, *rewards],
            [
                [label, n, *(cell(b["reward_accuracy"][r]) for r in rewards)]
                for label, n, b in zip(labels, count, bins)
            ],
        )
    )
    if summary["differences"]:
        names = list(summary["differences"])
        parts.append(
            f"reward accuracy minus {baseline}'s, by the model's per-prompt accuracy\n\n"
            + table(
                [*heads, *names],
                [
                    [label, n, *(cell(b["differences"][r]) for r in names)]
                    for label, n, b in zip(labels, count, bins)
                ],
            )
        )
    return "\n\n".join(parts)
