"""Does `covo.study`'s premise predict training? Each reward's premise next to its outcome.

    python scripts/premise_vs_outcome.py --study logs/study/runs/<time>/study.json \\
        --outcomes logs/outcomes/calibrated_lr1e-4/outcomes.json [more outcomes.json] \\
        --out logs/readme/premise_vs_outcome.png

Premise, per reward, from a study of the same model (`scripts/lab_profile.py` writes one):
AUROC (does its score rank right answers above wrong ones) and label accuracy (is its top
answer right). Outcome, per reward and outcome study: held-out sampled-accuracy gain at the
end and at the peak, with the 95% t-intervals over seeds. Prints one markdown row per reward
and study, each study's rank correlation of AUROC and gain over the label-free rewards
(Spearman, average ranks for ties) with its one-sided permutation p-value and a bootstrap
interval over each reward's seeds (`covo.analysis.verdict_stats.rank_agreement`), and draws
gain at the end against AUROC, one marker per study.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from covo.analysis.plots import save_figure
from covo.analysis.verdict_stats import rank_agreement


def cell(c: dict | None) -> str:
    if not c or c.get("value") is None:
        return "-"
    if c.get("low") is None:  # one seed: no interval
        return f"{c['value']:+.3f}"
    return f"{c['value']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", type=Path, required=True)
    parser.add_argument("--outcomes", type=Path, nargs="+", required=True)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    premise = json.loads(args.study.read_text())["rewards"]
    fig = Figure(figsize=(6.0, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    print("| reward | AUROC | label accuracy | study | runs | gain at the end | gain at the peak |")
    print("|---|---:|---:|---|---:|---:|---:|")
    correlations = []
    for marker, path in zip("osD^v", args.outcomes):
        outcomes = json.loads(path.read_text())
        study = path.parent.name
        xs, ys, names = [], [], []
        for name, numbers in outcomes["rewards"].items():
            auroc = premise.get(name, {}).get("auroc", {}).get("value")
            label = premise.get(name, {}).get("label_accuracy", {}).get("value")
            gain = numbers["gain_end"]
            print(
                f"| {name} | {auroc if auroc is None else f'{auroc:.3f}'} | "
                f"{label if label is None else f'{label:.3f}'} | {study} | {numbers['runs']} | "
                f"{cell(gain)} | {cell(numbers['gain_peak'])} |"
            )
            if auroc is not None and gain.get("value") is not None:
                xs.append(auroc)
                ys.append(gain["value"])
                names.append(name)
                if gain.get("low") is not None:  # one seed: a marker without a bar
                    ax.errorbar(
                        auroc,
                        gain["value"],
                        yerr=[[gain["value"] - gain["low"]], [gain["high"] - gain["value"]]],
                        fmt=marker,
                        color="gray",
                        alpha=0.5,
                    )
        ax.scatter(xs, ys, marker=marker, label=study)
        gains = defaultdict(list)
        for run in outcomes["per_run"]:
            gains[run["reward"]].append(run["gain_end"])
        free = {x_name: x for x, x_name in zip(xs, names) if x_name != "ground_truth"}
        agreement = rank_agreement(free, gains)
        correlations.append(
            f"{study}: Spearman rho of AUROC and gain at the end over the {agreement['n']} "
            f"label-free rewards {agreement['rho']:+.2f} (one-sided permutation p "
            f"{agreement['p']:.4f}, ties kept; 95% interval over each reward's seeds "
            f"[{agreement['low']:+.2f}, {agreement['high']:+.2f}])"
        )
        for x, y, name in zip(xs, ys, names):
            ax.annotate(name, (x, y), xytext=(4, 2), textcoords="offset points", fontsize=7)
    ax.axhline(0.0, color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel("premise: AUROC of the reward's score (covo.study)")
    ax.set_ylabel("outcome: held-out accuracy gain at the end")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    print("\n" + "\n".join(correlations))
    if args.out:
        save_figure(fig, args.out)
        print(f"\nfigure: {args.out}")


if __name__ == "__main__":
    main()
