"""Evaluation outputs: the per-run JSON file, the scalars (TensorBoard and `metrics.jsonl`)
and the Markdown table."""

from __future__ import annotations

import json
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from covo.infra.errors import DataError
from covo.metrics.loggers import JsonlLogger

RESULTS_FILE = "eval_results.json"
# fractions shown in percent; `items` is a count
COUNT_COLUMNS = ("items",)


def metric_order(name: str) -> tuple:
    """pass@k, then maj@k (each by k), then the rest alphabetically."""
    family, _, k = name.partition("@")
    rank = {"items": 0, "pass": 1, "maj": 2}.get(family, 3)
    return (rank, int(k) if k.isdigit() else 0, name)


def mean_row(totals: dict[str, dict[str, float]]) -> dict[str, float]:
    """Unweighted mean over benchmarks of each metric they report; `items` is summed."""
    keys = {key for row in totals.values() for key in row}
    out = {}
    for key in keys:
        values = [row[key] for row in totals.values() if key in row]
        out[key] = sum(values) if key in COUNT_COLUMNS else sum(values) / len(values)
    return out


def markdown_table(totals: dict[str, dict[str, float]]) -> str:
    """Rows = benchmarks (plus a mean row when there are several), columns = metrics, in %."""
    columns = sorted({key for row in totals.values() for key in row}, key=metric_order)
    rows = dict(totals)
    if len(totals) > 1:
        rows["mean"] = mean_row(totals)

    def cell(row: dict, key: str) -> str:
        if key not in row:
            return "-"
        return str(int(row[key])) if key in COUNT_COLUMNS else f"{100 * row[key]:.1f}"

    lines = [
        "| benchmark | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    lines += [
        f"| {name} | " + " | ".join(cell(row, key) for key in columns) + " |"
        for name, row in rows.items()
    ]
    return "\n".join(lines)


def write_json(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, ensure_ascii=False))


def write_scalars(totals: dict[str, dict[str, float]], out_dir: Path, step: int) -> None:
    """`eval/<benchmark>/<metric>` scalars, plus `eval/mean/<metric>` with several benchmarks,
    at x = the checkpoint's optimizer step: TensorBoard events in `out_dir/tensorboard` and one
    line of `out_dir/metrics.jsonl` (what `covo.report` reads whatever the logger)."""
    rows = dict(totals)
    if len(totals) > 1:
        rows["mean"] = mean_row(totals)
    scalars = {
        f"eval/{name}/{key}": value
        for name, row in rows.items()
        for key, value in row.items()
        if key not in COUNT_COLUMNS
    }
    with SummaryWriter(log_dir=str(out_dir / "tensorboard")) as writer:
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, global_step=step)
    JsonlLogger(out_dir).log_metrics(scalars, step=step)


def collect_totals(root: Path) -> dict[str, dict[str, float]]:
    """Totals of every results file below `root` (a multirun folder): one row per benchmark
    and job; a benchmark met twice is labelled with its job folder."""
    files = sorted(root.rglob(RESULTS_FILE))
    if not files:
        raise DataError(f"no {RESULTS_FILE} under {root}")
    found = [
        (name, path.parent.relative_to(root), row)
        for path in files
        for name, row in json.loads(path.read_text())["totals"].items()
    ]
    names = [name for name, _, _ in found]
    return {
        (name if names.count(name) == 1 else f"{name} ({job})"): row for name, job, row in found
    }
