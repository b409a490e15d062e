"""Summaries of finished runs.

`python -m covo.report <train run dir>`: peak and final `val/accuracy` and the step of the
first collapse alarm, final and best value of every scalar in the run's TensorBoard events,
and PNG plots of reward, accuracy, KL, response length and the collapse signals in `plots/`.
`python -m covo.report --eval <dir>`: one Markdown table from every eval result below `dir`
(a multirun folder: `python eval.py -m benchmark=gsm8k,math500`).
`python -m covo.report --compare <dir>`: the training jobs of a multirun grouped by their
overrides without `seed`; per group the mean and 95% t interval over seeds of the final and
best `val/accuracy` and of each reward diagnostic (`diag/...`, its mean over the run's steps).
"""

from __future__ import annotations

import argparse
import math
import re
from collections import defaultdict
from pathlib import Path

# a bare Figure renders PNGs with Agg and never touches pyplot's global, display-bound state
from matplotlib.figure import Figure
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from covo.analysis.intervals import seed_interval
from covo.eval.results import collect_totals, markdown_table
from covo.infra.errors import DataError, exit_on_user_error
from covo.metrics.loggers import METRICS_FILE, read_jsonl_scalars

MAIN_TAGS = ("reward/mean", "diag/accuracy", "val/accuracy", "train/kl", "rollout/len_mean")
# a tag whose `/`- or `_`-separated parts include one of these is better when lower
LOWER_IS_BETTER = {"kl", "loss", "len", "time", "truncated"}
PLOTS = {
    "reward": re.compile(r"^reward/(?!num_)"),  # counts (num_answers ...) have their own scale
    "accuracy": re.compile(r"accuracy"),
    "kl": re.compile(r"(^|/)kl($|_)"),
    "length": re.compile(r"^rollout/len_"),
    # the collapse signals of comparable scale (length and answer counts have their own)
    "collapse": re.compile(
        r"^collapse/(alarm|top_answer_share|zero_var_frac|answer_entropy|token_entropy"
        r"|self_certainty|kl)$"
    ),
}

Series = list[tuple[int, float]]


def read_scalars(run_dir: Path) -> dict[str, Series]:
    """Every scalar tag below `run_dir` -> [(step, value)] sorted by step; at a step logged
    twice (a resumed run) the later value wins. Read from the run's `metrics.jsonl` (written
    whatever the logger), else from TensorBoard event files (runs from before that file)."""
    files = sorted(run_dir.rglob(METRICS_FILE))
    if files:
        scalars: dict[str, dict[int, float]] = {}
        for path in files:
            for tag, points in read_jsonl_scalars(path).items():
                scalars.setdefault(tag, {}).update(points)
        return {tag: sorted(points.items()) for tag, points in scalars.items()}
    event_dirs = sorted({p.parent for p in run_dir.rglob("events.out.tfevents.*")})
    if not event_dirs:
        raise DataError(f"no {METRICS_FILE} or TensorBoard event files under {run_dir}")
    by_step: dict[str, dict[int, float]] = {}
    for directory in event_dirs:
        events = EventAccumulator(str(directory), size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            points = by_step.setdefault(tag, {})
            for event in sorted(events.Scalars(tag), key=lambda e: e.wall_time):
                points[event.step] = event.value
    return {tag: sorted(points.items()) for tag, points in by_step.items()}


def lower_is_better(tag: str) -> bool:
    return any(part in LOWER_IS_BETTER for part in re.split(r"[/_]", tag))


def summarize(series: Series, lower: bool) -> dict[str, float]:
    """Final value and best value (max, or min when `lower`) with its step."""
    best_step, best = (min if lower else max)(series, key=lambda point: point[1])
    return {"final": series[-1][1], "best": best, "best_step": best_step, "steps": len(series)}


def summary_table(scalars: dict[str, Series]) -> str:
    """Markdown: the main tags first, then the rest alphabetically."""
    tags = [t for t in MAIN_TAGS if t in scalars] + sorted(set(scalars) - set(MAIN_TAGS))
    lines = ["| metric | final | best | best at step | points |", "|---|---:|---:|---:|---:|"]
    for tag in tags:
        lower = lower_is_better(tag)
        s = summarize(scalars[tag], lower)
        lines.append(
            f"| {tag} | {s['final']:.4g} | {s['best']:.4g} ({'min' if lower else 'max'}) "
            f"| {s['best_step']} | {s['steps']} |"
        )
    return "\n".join(lines)


def write_plots(scalars: dict[str, Series], out_dir: Path) -> list[Path]:
    """One PNG per plot group that has tags: every matching tag against its step."""
    written = []
    for name, pattern in PLOTS.items():
        tags = sorted(tag for tag in scalars if pattern.search(tag))
        if not tags:
            continue
        fig = Figure(figsize=(7, 4))
        ax = fig.subplots()
        for tag in tags:
            steps, values = zip(*scalars[tag])
            ax.plot(steps, values, label=tag, marker="." if len(steps) < 30 else None)
        ax.set_xlabel("step")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        written.append(path)
    return written


def accuracy_and_alarm(scalars: dict[str, Series]) -> list[str]:
    """Peak and final `val/accuracy`, and the first step of `collapse/alarm`: did the run
    rise, then fall, and did the collapse guard see it coming?"""
    lines = []
    accuracy = scalars.get("val/accuracy")
    if accuracy:
        peak_step, peak = max(accuracy, key=lambda point: point[1])  # the earliest peak
        final_step, final = accuracy[-1]
        lines.append(
            f"val/accuracy: peak {peak:.4g} at step {peak_step}, final {final:.4g} "
            f"at step {final_step}"
        )
    else:
        lines.append("val/accuracy: not logged")
    alarm = scalars.get("collapse/alarm")
    if alarm is None:
        lines.append("collapse alarm: not logged (no collapse guard)")
    else:
        first = next((step for step, value in alarm if value >= 0.5), None)
        lines.append(
            f"collapse alarm: first at step {first}"
            if first is not None
            else f"collapse alarm: none in {len(alarm)} steps"
        )
    return lines


def report_training(run_dir: Path) -> str:
    """The summary table of a training run; writes its plots into `<run_dir>/plots/`."""
    scalars = read_scalars(run_dir)
    plots = write_plots(scalars, run_dir / "plots")
    listing = "\n".join(f"plot: {path}" for path in plots)
    summary = "\n".join(accuracy_and_alarm(scalars))
    return f"{run_dir}\n{summary}\n{summary_table(scalars)}\n{listing}".rstrip()


def job_overrides(multirun_dir: Path) -> dict[Path, list[str]]:
    """Each Hydra job below `multirun_dir` (a folder with `.hydra/overrides.yaml`) -> its
    command-line overrides."""
    jobs = {
        path.parent.parent: [str(o) for o in OmegaConf.load(path)]
        for path in sorted(multirun_dir.rglob(".hydra/overrides.yaml"))
    }
    if not jobs:
        raise DataError(f"no Hydra jobs (.hydra/overrides.yaml) under {multirun_dir}")
    return jobs


def run_values(scalars: dict[str, Series]) -> dict[str, float]:
    """One run's numbers: final and best `val/accuracy`, the mean over steps of each `diag/`."""
    values = {}
    if "val/accuracy" in scalars:
        s = summarize(scalars["val/accuracy"], lower=False)
        values.update({"val/accuracy final": s["final"], "val/accuracy best": s["best"]})
    for tag in sorted(t for t in scalars if t.startswith("diag/")):
        values[f"{tag} (mean)"] = sum(v for _, v in scalars[tag]) / len(scalars[tag])
    return values


def seed_groups(multirun_dir: Path) -> tuple[dict[tuple, dict[str, list]], list[Path]]:
    """Runs grouped by their overrides without `seed` (a sorted tuple) -> metric -> one value
    per seed, `seeds` -> the seeds; jobs without logged scalars are returned apart."""
    groups: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    skipped = []
    for job, overrides in job_overrides(multirun_dir).items():
        if not any(job.rglob(METRICS_FILE)) and not any(job.rglob("events.out.tfevents.*")):
            skipped.append(job)
            continue
        seeds = [o.split("=", 1)[1] for o in overrides if o.startswith("seed=")]
        key = tuple(sorted(o for o in overrides if not o.startswith("seed=")))
        groups[key]["seeds"].append(seeds[0] if seeds else "default")
        for name, value in run_values(read_scalars(job)).items():
            groups[key][name].append(value)
    return groups, skipped


def seed_cell(values: list[float], seeds: int) -> str:
    """`mean [low, high]` (95% t interval over seeds); `(n=...)` when fewer runs than the
    group's seeds logged the metric."""
    if not values:
        return "-"
    e = seed_interval(values)
    text = f"{e.value:.4g}" if math.isnan(e.low) else f"{e.value:.4g} [{e.low:.4g}, {e.high:.4g}]"
    return text if len(values) == seeds else f"{text} (n={len(values)})"


def compare_table(groups: dict[tuple, dict[str, list]]) -> str:
    """Markdown: one row per metric, one column per group, headed by the overrides that
    differ between groups (the shared ones are listed above the table)."""
    shared = set.intersection(*(set(key) for key in groups))
    names = [" ".join(o for o in key if o not in shared) or "(all jobs)" for key in groups]
    metrics = sorted({m for g in groups.values() for m in g if m != "seeds"})
    metrics.sort(key=lambda m: not m.startswith("val/"))  # stable: val/ first, then diag/
    header = ["metric", *(f"{n} ({len(g['seeds'])} seeds)" for n, g in zip(names, groups.values()))]
    lines = [
        f"shared overrides: {' '.join(sorted(shared)) or '(none)'}",
        "",
        "| " + " | ".join(header) + " |",
        "|---" + "|---:" * len(groups) + "|",
    ]
    for metric in metrics:
        cells = [seed_cell(g.get(metric, []), len(g["seeds"])) for g in groups.values()]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    seeds = "; ".join(f"{n}: seeds {', '.join(g['seeds'])}" for n, g in zip(names, groups.values()))
    return "\n".join(lines) + f"\n\n{seeds}"


def report_compare(multirun_dir: Path) -> str:
    groups, skipped = seed_groups(multirun_dir)
    if not groups:
        raise DataError(f"no job with TensorBoard events under {multirun_dir}")
    notes = "".join(f"\nskipped (no TensorBoard events): {job}" for job in skipped)
    return f"{multirun_dir}\n{compare_table(dict(groups))}{notes}"


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m covo.report", description=__doc__.split("\n")[0]
    )
    parser.add_argument("run_dir", type=Path)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--eval", action="store_true", help="merge eval results below run_dir")
    which.add_argument(
        "--compare", action="store_true", help="seed intervals of a training multirun's groups"
    )
    args = parser.parse_args(argv)
    if not args.run_dir.is_dir():
        raise DataError(f"run directory not found: {args.run_dir}")
    if args.eval:
        print(markdown_table(collect_totals(args.run_dir)))
    elif args.compare:
        print(report_compare(args.run_dir))
    else:
        print(report_training(args.run_dir))


if __name__ == "__main__":
    main()
