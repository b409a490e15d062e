"""Summaries of finished runs.

`python -m covo.report <train run dir>`: peak and final `val/accuracy` and the step of the
first collapse alarm, final and best value of every scalar in the run's TensorBoard events,
and PNG plots of reward, accuracy, KL, response length and the collapse signals in `plots/`.
`python -m covo.report --eval <dir>`: one Markdown table from every eval result below `dir`
(a multirun folder: `python eval.py -m benchmark=gsm8k,math500`).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

# a bare Figure renders PNGs with Agg and never touches pyplot's global, display-bound state
from matplotlib.figure import Figure
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from covo.errors import exit_on_user_error
from covo.eval.results import collect_totals, markdown_table

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
    twice (a resumed run) the later event wins."""
    event_dirs = sorted({p.parent for p in run_dir.rglob("events.out.tfevents.*")})
    if not event_dirs:
        raise FileNotFoundError(f"no TensorBoard event files under {run_dir}")
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


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m covo.report", description=__doc__.split("\n")[0]
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--eval", action="store_true", help="merge eval results below run_dir")
    args = parser.parse_args(argv)
    if not args.run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {args.run_dir}")
    print(
        markdown_table(collect_totals(args.run_dir)) if args.eval else report_training(args.run_dir)
    )


if __name__ == "__main__":
    main()
