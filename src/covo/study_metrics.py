"""The study's numbers: per-reward metrics over prompts with bootstrap intervals, paired
differences against a baseline reward, reward accuracy per bin of the model's accuracy, and
their Markdown tables.

Input: one entry per prompt, `{"accuracy": share of the N samples that are correct,
"rewards": {name: outcome}}`, an outcome holding `hits` and `clusters` (verdicts equal to
correctness, clusters judged: prompts with K >= 2), `passed` (clusters whose verdict passed),
`label_hit` (the reward's top cluster is correct), `scores` and `correct` (per response),
`seconds` (the reward's time) and `scorer_tokens` (tokens its scorer fed).
"""

from __future__ import annotations

import numpy as np

from covo.intervals import (
    Statistic,
    difference,
    estimate,
    pooled_auroc,
    ratio_of_sums,
    resample_counts,
    restricted,
)

METRICS = {
    "reward_accuracy": "reward accuracy",
    "auroc": "AUROC",
    "label_accuracy": "label accuracy",
    "pass_frac": "pass fraction",
    "seconds": "s / prompt",
    "scorer_tokens": "scorer tokens / prompt",
}
COMPARED = ("reward_accuracy", "auroc", "label_accuracy")  # paired against the baseline


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
    }


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


def markdown(summary: dict, baseline: str | None) -> str:
    """The study's tables: metrics per reward, differences against the baseline, and reward
    accuracy (and its difference) per bin of the model's accuracy."""
    digits = {"seconds": 2, "scorer_tokens": 0}
    rewards = summary["rewards"]
    parts = [
        table(
            ["reward", *METRICS.values()],
            [
                [name, *(cell(metrics[m], digits.get(m, 3)) for m in METRICS)]
                for name, metrics in rewards.items()
            ],
        )
    ]
    if summary["differences"]:
        parts.append(
            table(
                [f"reward - {baseline}", *(f"Δ {METRICS[m]}" for m in COMPARED)],
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
