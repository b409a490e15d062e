"""A study's numbers as a small JSON file, and the headline table recomputed from it alone.

    python -m covo.analysis.verdict write logs/outcomes/<study> docs/results/<study>.json \\
        [--sharpening logs/sharpening/<lab>.json]
    python -m covo.analysis.verdict table docs/results/<study>.json \\
        [--brief] [--premise docs/results/<lab>_premise.json]

`write` reads every finished run of an outcome study (`runs/<reward>/seed_<s>/result.json`
present) and keeps its test-split evaluations (`heldout.jsonl` lines with `"split": "test"`)
and, for choosing a step, its validation curve:

    {"study", "split": "test", "setting": {...},
     "rewards": {"<reward>": {"<seed>": {"steps", "sampled_accuracy", "greedy_accuracy",
                 "maj_accuracy", "pass_accuracy", "per_problem_correct": [[...] per step],
                 "validation": {"steps", "sampled_accuracy"}}}},
     "sharpening": {"<T>": {"sampled_accuracy", ...}}}

`table` prints, per reward, from the test split: the gain at the end (last evaluation minus
step 0) with its t-interval over seeds and its two-stage bootstrap interval over seeds and
problems; the gain at the step chosen on validation; the greedy, maj@N and pass@N gains; the
paired difference against `random` with its t-interval, its paired t p-value and the Holm
adjustment over the primary comparisons (`setting.primary`, default `PRIMARY`); and whether
its final accuracy beats the untrained policy at its best temperature ("beyond sharpening":
the lower t bound above the best of the sharpening baseline). `--brief` keeps the columns the
README shows; `--premise` adds each reward's premise (its AUROC from a lab profile's JSON).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from covo.analysis.intervals import seed_interval
from covo.analysis.verdict_stats import hierarchical_bootstrap, holm, paired_t_p, peak_on_validation
from covo.infra.errors import DataError, exit_on_user_error

CURVES = ("sampled_accuracy", "greedy_accuracy", "maj_accuracy", "pass_accuracy")
BASELINE = "random"
# the comparisons against `random` the Holm adjustment covers (docs/outcomes.md states them)
PRIMARY = ("ground_truth", "majority", "covo", "covo_paper", "seq_logprob")


def read_heldout(path: Path) -> list[dict]:
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: not JSON ({err.msg})") from None
    return records


def split_curves(records: list[dict]) -> dict[str, dict]:
    """Per split (a record without one is validation), the curves by step; a step evaluated
    twice (a resumed run) keeps its last record."""
    by_split: dict[str, dict[int, dict]] = {}
    for record in records:
        by_split.setdefault(record.get("split", "validation"), {})[record["step"]] = record
    out = {}
    for split, by_step in by_split.items():
        steps = sorted(by_step)
        curve = {"steps": steps}
        for key in (*CURVES, "per_problem_correct"):
            if all(key in by_step[s] for s in steps):
                curve[key] = [by_step[s][key] for s in steps]
        out[split] = curve
    return out


def collect_results(study_dir: Path, name: str, setting: dict, sharpening: dict | None) -> dict:
    """The results JSON of an outcome study's finished runs (those with a test split)."""
    if not (study_dir / "runs").is_dir():
        raise DataError(f"{study_dir}: no runs/ folder (not an outcome study)")
    runs = sorted((study_dir / "runs").glob("*/seed_*/result.json"))
    rewards: dict[str, dict] = {}
    sizes = set()
    for result in runs:
        directory = result.parent
        records = read_heldout(directory / "heldout.jsonl")
        curves = split_curves(records)
        if "test" not in curves:
            continue
        sizes |= {(r["num_samples"], r["problems"]) for r in records if r.get("split") == "test"}
        seed = directory.name.removeprefix("seed_")
        entry = dict(curves["test"])
        if "validation" in curves:
            validation = curves["validation"]
            entry["validation"] = {k: validation[k] for k in ("steps", "sampled_accuracy")}
        rewards.setdefault(directory.parent.name, {})[seed] = entry
    if not rewards:
        raise DataError(f"{study_dir}: no finished run with test-split evaluations")
    if len(sizes) != 1:
        raise DataError(f"{study_dir}: runs differ in (samples, problems) on test: {sorted(sizes)}")
    ((num_samples, problems),) = sizes
    setting = {"num_samples": num_samples, "problems": problems} | setting
    out = {"study": name, "split": "test", "setting": setting, "rewards": rewards}
    return out | ({"sharpening": sharpening} if sharpening else {})


def interval(values) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"value": None, "low": None, "high": None, "n": 0}
    return seed_interval(values).as_dict() | {"n": len(values)}


def problem_gains(run: dict, num_samples: int) -> np.ndarray:
    """Per problem: correct share at the last evaluation minus at step 0."""
    counts = np.asarray(run["per_problem_correct"], float)
    return (counts[-1] - counts[0]) / num_samples


def reward_numbers(runs: dict, num_samples: int) -> dict:
    """Per seed and over seeds: the end gains, the gain at the validation-chosen step."""
    seeds = sorted(runs, key=int)
    per_seed = {
        f"{key.removesuffix('_accuracy')}_gain": [
            runs[s][key][-1] - runs[s][key][0] if key in runs[s] else None for s in seeds
        ]
        for key in CURVES
    }
    per_seed["final"] = [runs[s]["sampled_accuracy"][-1] for s in seeds]
    per_seed["peak_on_validation"] = [
        peak_on_validation(runs[s]["validation"], runs[s])["gain"]
        if "validation" in runs[s]
        else None
        for s in seeds
    ]
    out = {"seeds": seeds, "per_seed": per_seed}
    out |= {key: interval(values) for key, values in per_seed.items()}
    if all("per_problem_correct" in runs[s] for s in seeds):
        gains = np.stack([problem_gains(runs[s], num_samples) for s in seeds])
        out["sampled_gain_bootstrap"] = hierarchical_bootstrap(gains).as_dict()
    return out


def against_baseline(results: dict, primary: list[str], num_samples: int) -> dict:
    """Paired by seed: each reward's end gain minus the baseline's, t-interval, paired-t p,
    Holm over the primary comparisons, and the paired two-stage bootstrap."""
    base_runs = results["rewards"][BASELINE]
    out = {}
    for reward, runs in results["rewards"].items():
        if reward == BASELINE:
            continue
        seeds = sorted(set(runs) & set(base_runs), key=int)
        diffs = [
            runs[s]["sampled_accuracy"][-1]
            - runs[s]["sampled_accuracy"][0]
            - (base_runs[s]["sampled_accuracy"][-1] - base_runs[s]["sampled_accuracy"][0])
            for s in seeds
        ]
        cell = interval(diffs) | {"per_seed": diffs, "p": paired_t_p(diffs)}
        if seeds and all("per_problem_correct" in r[s] for r in (runs, base_runs) for s in seeds):
            mine = np.stack([problem_gains(runs[s], num_samples) for s in seeds])
            theirs = np.stack([problem_gains(base_runs[s], num_samples) for s in seeds])
            cell["bootstrap"] = hierarchical_bootstrap(mine, baseline=theirs).as_dict()
        out[reward] = cell
    family = [r for r in primary if r in out]
    for reward, adjusted in zip(family, holm([out[r]["p"] for r in family])):
        out[reward]["p_holm"] = adjusted
    return out


def verdict(results: dict) -> dict:
    """Every number of the headline table from a results JSON."""
    setting = results.get("setting", {})
    num_samples = setting.get("num_samples")
    if num_samples is None:
        raise DataError("results: setting.num_samples is missing (samples per problem)")
    numbers = {r: reward_numbers(runs, num_samples) for r, runs in results["rewards"].items()}
    primary = list(setting.get("primary", PRIMARY))
    paired = (
        against_baseline(results, primary, num_samples) if BASELINE in results["rewards"] else {}
    )
    sharpening = results.get("sharpening", {})
    best = max(sharpening.items(), key=lambda kv: kv[1]["sampled_accuracy"], default=None)
    for n in numbers.values():
        low = n["final"]["low"]
        n["beyond_sharpening"] = (
            None if best is None or low is None else low > best[1]["sampled_accuracy"]
        )
    return {
        "numbers": numbers,
        "paired": paired,
        "primary": primary,
        "sharpening_best": None if best is None else {"temperature": best[0], **best[1]},
    }


def fmt(c: dict | None, sign: str = "+") -> str:
    if not c or c.get("value") is None:
        return "-"
    text = f"{c['value']:{sign}.3f}"
    return text if c.get("low") is None else f"{text} [{c['low']:{sign}.3f}, {c['high']:{sign}.3f}]"


BEYOND = {True: "yes", False: "no", None: "-"}  # a gain beyond sharpening, by the table's flag


def p_text(p: float) -> str:
    return "< 0.001" if p < 0.0005 else f"{p:.3f}"


def p_cell(diff: dict | None, adjusted_only: bool) -> str:
    """The paired t-test's p and its Holm adjustment (`adjusted_only`: the adjusted one alone);
    a comparison outside the primary family shows its own p, marked."""
    if diff is None or diff["p"] != diff["p"]:
        return "-"
    if "p_holm" not in diff:
        return f"{p_text(diff['p'])} (not primary)"
    holm = p_text(diff["p_holm"])
    return holm if adjusted_only else f"{p_text(diff['p'])} ({holm})"


def markdown(results: dict, table: dict) -> str:
    head = [
        "reward", "seeds", "gain at the end (t)", "gain at the end (seeds x problems)",
        "gain at the step chosen on validation", "greedy gain", "maj gain", "pass gain",
        f"- {BASELINE} (paired, t)", f"- {BASELINE} (seeds x problems)", "p (Holm)",
        "final accuracy", "beyond sharpening",
    ]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for reward, n in table["numbers"].items():
        diff = table["paired"].get(reward)
        p = p_cell(diff, adjusted_only=False)
        beyond = BEYOND[n["beyond_sharpening"]]
        row = [
            reward, str(len(n["seeds"])), fmt(n["sampled_gain"]),
            fmt(n.get("sampled_gain_bootstrap")), fmt(n["peak_on_validation"]),
            fmt(n["greedy_gain"]), fmt(n["maj_gain"]), fmt(n["pass_gain"]),
            fmt(diff), fmt(diff.get("bootstrap") if diff else None), p, fmt(n["final"], ""),
            beyond,
        ]  # fmt: skip
        lines.append("| " + " | ".join(row) + " |")
    best = table["sharpening_best"]
    if best is not None:
        temps = ", ".join(
            f"T = {t}: {v['sampled_accuracy']:.3f}" for t, v in results["sharpening"].items()
        )
        lines.append(
            f"\nsharpening baseline (the untrained policy, same sampler and test problems): "
            f"{temps}; best {best['sampled_accuracy']:.3f} at T = {best['temperature']}"
        )
    return "\n".join(lines)


def brief(table: dict, premise: dict | None = None) -> str:
    """The README's table: premise (AUROC, from a profile JSON), end gain on test, greedy gain,
    the paired difference against random with its Holm-adjusted p, beyond sharpening."""
    head = ["reward", "premise (AUROC)", "seeds", "gain at the end", "greedy gain"]
    head += [f"- {BASELINE} (paired)", "p (Holm)", "beyond sharpening"]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    order = sorted(table["numbers"], key=lambda r: -(table["numbers"][r]["sampled_gain"]["value"]))
    for reward in order:
        n, diff = table["numbers"][reward], table["paired"].get(reward)
        auroc = ((premise or {}).get("rewards", {}).get(reward) or {}).get("auroc")
        p = p_cell(diff, adjusted_only=True)
        row = [f"`{reward}`", "-" if auroc is None else f"{auroc['value']:.3f}"]
        row += [str(len(n["seeds"])), fmt(n["sampled_gain"]), fmt(n["greedy_gain"]), fmt(diff), p]
        row.append(BEYOND[n["beyond_sharpening"]])
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser("write", help="a study's run folders -> results JSON")
    write.add_argument("study_dir", type=Path)
    write.add_argument("out", type=Path)
    write.add_argument("--name", default=None, help="the study's name (default: the folder's)")
    write.add_argument("--sharpening", type=Path, default=None)
    write.add_argument("--setting", type=Path, default=None, help="a JSON of the setting")
    table = commands.add_parser("table", help="the headline table from a results JSON")
    table.add_argument("results", type=Path)
    table.add_argument("--brief", action="store_true", help="the README's columns")
    table.add_argument("--premise", type=Path, default=None, help="a lab profile's JSON")
    args = parser.parse_args(argv)
    if args.command == "write":
        for path in (args.sharpening, args.setting):
            if path is not None and not path.is_file():
                raise DataError(f"{path}: no such file")
        setting = json.loads(args.setting.read_text()) if args.setting else {}
        sharpening = json.loads(args.sharpening.read_text()) if args.sharpening else None
        name = args.name or args.study_dir.name
        results = collect_results(args.study_dir, name, setting, sharpening)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, separators=(",", ":")))
        print(f"{args.out}: {sum(len(r) for r in results['rewards'].values())} runs")
        return
    for path in (args.results, args.premise):
        if path is not None and not path.is_file():
            raise DataError(f"{path}: no such file")
    results = json.loads(args.results.read_text())
    premise = json.loads(args.premise.read_text()) if args.premise else None
    if args.brief or premise is not None:
        print(brief(verdict(results), premise))
    else:
        print(markdown(results, verdict(results)))


if __name__ == "__main__":
    main()
