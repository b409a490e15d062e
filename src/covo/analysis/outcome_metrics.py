"""The numbers of an outcome study, from each run's held-out curve and its first collapse alarm.

A run is `{"reward", "seed", "curve": [{"step", "sampled_accuracy", "greedy_accuracy",
"maj_accuracy"}, ...], "alarm_step": int | None}`, steps in optimizer steps, the first point
the base model (step 0). Gains are differences from that base; a *fall* is the first evaluation
where sampled accuracy is `fall` or more below its running peak (the peak of the evaluations
up to it). Intervals are Student-t over seeds (`covo.analysis.intervals.seed_interval`); paired
differences take, per seed, one reward's number minus the baseline's.
"""

from __future__ import annotations

import math
from collections import defaultdict

from covo.analysis.intervals import seed_interval
from covo.callbacks.collapse import CollapseDetector

ACCURACIES = ("sampled_accuracy", "greedy_accuracy", "maj_accuracy")
# the per-run numbers that get an interval over seeds
SUMMARISED = (
    "base",
    "final",
    "gain_end",
    "gain_peak",
    "peak_step",
    "greedy_gain_end",
    "maj_gain_end",
    "alarm_step",
    "fall_step",
    "lead",
)
PAIRED = ("gain_end", "gain_peak")
# what the collapse guard did in a run: alarm at or before the fall, after it, no alarm before
# a fall that came, an alarm in a run that never fell, neither
GUARD_OUTCOMES = ("caught", "late", "missed", "false_alarm", "quiet")
EPS = 1e-9  # accuracies are shares of whole counts: a fall of exactly `fall` counts


def fall_step(curve: list[dict], fall: float) -> int | None:
    """First step whose sampled accuracy is `fall` or more below the peak so far."""
    peak = -math.inf
    for point in curve:
        value = point["sampled_accuracy"]
        peak = max(peak, value)
        if value <= peak - fall + EPS:
            return point["step"]
    return None


def guard_outcome(alarm: int | None, fell: int | None) -> str:
    if fell is None:
        return "quiet" if alarm is None else "false_alarm"
    if alarm is None:
        return "missed"
    return "caught" if alarm <= fell else "late"


def run_numbers(run: dict, fall: float) -> dict:
    """Base, final, gains (end and peak), the peak's step, the fall and the guard's verdict."""
    curve = sorted(run["curve"], key=lambda point: point["step"])
    if not curve or curve[0]["step"] != 0:
        raise ValueError(f"{run['reward']} seed {run['seed']}: no held-out evaluation at step 0")
    sampled = [point["sampled_accuracy"] for point in curve]
    base, peak = sampled[0], max(sampled)
    fell, alarm = fall_step(curve, fall), run["alarm_step"]
    outcome = guard_outcome(alarm, fell)
    return {
        "reward": run["reward"],
        "seed": run["seed"],
        "base": base,
        "final": sampled[-1],
        "gain_end": sampled[-1] - base,
        "gain_peak": peak - base,
        "peak_step": curve[sampled.index(peak)]["step"],  # the first step at the peak
        "greedy_gain_end": curve[-1]["greedy_accuracy"] - curve[0]["greedy_accuracy"],
        "maj_gain_end": curve[-1]["maj_accuracy"] - curve[0]["maj_accuracy"],
        "last_step": curve[-1]["step"],
        "alarm_step": alarm,
        "fall_step": fell,
        "lead": fell - alarm if outcome == "caught" else None,
        "guard": outcome,
    }


def interval(values: list[float], confidence: float) -> dict:
    """Mean, t-interval bounds (None with one value) and the number of runs."""
    if not values:
        return {"value": None, "low": None, "high": None, "n": 0}
    return {**seed_interval(values, confidence).as_dict(), "n": len(values)}


def curve_bands(runs: list[dict], confidence: float) -> dict:
    """Per step evaluated in every run: mean sampled accuracy and its t-interval."""
    steps = sorted(set.intersection(*({p["step"] for p in r["curve"]} for r in runs)))
    bands = {"steps": steps, "value": [], "low": [], "high": []}
    for step in steps:
        values = [p["sampled_accuracy"] for r in runs for p in r["curve"] if p["step"] == step]
        cell = interval(values, confidence)
        for key in ("value", "low", "high"):
            bands[key].append(cell[key])
    return bands


def paired(per_run: list[dict], reward: str, baseline: str, confidence: float) -> dict:
    """Per seed that both rewards ran: reward's gain minus baseline's, with its interval."""
    by_seed = {(n["reward"], n["seed"]): n for n in per_run}
    seeds = sorted(s for r, s in by_seed if r == reward and (baseline, s) in by_seed)
    out = {"seeds": seeds}
    for key in PAIRED:
        diffs = [by_seed[reward, s][key] - by_seed[baseline, s][key] for s in seeds]
        out[key] = {**interval(diffs, confidence), "per_seed": diffs}
    return out


def aggregate(
    runs: list[dict], rewards: list[str], baselines: list[str], fall: float, confidence: float
) -> dict:
    """Every number of the study: per run, per reward (intervals over seeds, guard counts,
    the learning-curve band) and paired differences against each baseline among `rewards`."""
    per_run = [run_numbers(run, fall) for run in runs]
    grouped = defaultdict(list)
    for run, numbers in zip(runs, per_run):
        grouped[run["reward"]].append((run, numbers))
    summary = {}
    for reward in rewards:
        members = grouped.get(reward, [])
        if not members:
            summary[reward] = {"runs": 0}
            continue
        numbers = [n for _, n in members]
        cells = {
            key: interval([n[key] for n in numbers if n[key] is not None], confidence)
            for key in SUMMARISED
        }
        guard = {o: sum(n["guard"] == o for n in numbers) for o in GUARD_OUTCOMES}
        summary[reward] = {
            "runs": len(members),
            "seeds": [n["seed"] for n in numbers],
            **cells,
            "guard": guard,
            "alarmed": sum(n["alarm_step"] is not None for n in numbers),
            "curve": curve_bands([r for r, _ in members], confidence),
        }
    differences = {
        baseline: {
            reward: paired(per_run, reward, baseline, confidence)
            for reward in rewards
            if reward != baseline and grouped.get(reward)
        }
        for baseline in baselines
        if baseline in rewards and grouped.get(baseline)
    }
    return {"per_run": per_run, "rewards": summary, "paired": differences}


def replay_alarm(signals: dict, guard: dict) -> int | None:
    """The first alarm a detector with settings `guard` (`rules`, `min_rules`, `window_rollouts`,
    `baseline_rollouts`) raises on a run's logged collapse signals, fed one rollout at a time as
    the callback fed them; in optimizer steps (`signals["step"]`: [rollout, step] pairs)."""
    detector = CollapseDetector(**guard)
    series = {
        name: dict(map(tuple, points))
        for name, points in signals.items()
        if name not in ("step", "alarm", "rules_met")
    }
    for batch, step in signals["step"]:
        values = {name: points[batch] for name, points in series.items() if batch in points}
        if detector.update(values).alarm:
            return step
    return None


def replayed_guards(
    runs: list[dict], guards: dict, rewards: list[str], fall: float, confidence: float
) -> dict:
    """Per guard in `guards` (name -> detector settings): each run's replayed alarm and its
    verdict against the fall, and per reward the verdict counts and the lead interval."""
    out = {}
    for name, guard in guards.items():
        per_run = [
            run_numbers({**run, "alarm_step": replay_alarm(run["signals"], guard)}, fall)
            for run in runs
        ]
        out[name] = {
            "guard": guard,
            "per_run": [
                {k: n[k] for k in ("reward", "seed", "alarm_step", "fall_step", "lead", "guard")}
                for n in per_run
            ],
            "rewards": {},
        }
        for reward in rewards:
            numbers = [n for n in per_run if n["reward"] == reward]
            out[name]["rewards"][reward] = {
                "runs": len(numbers),
                "alarmed": sum(n["alarm_step"] is not None for n in numbers),
                "guard": {o: sum(n["guard"] == o for n in numbers) for o in GUARD_OUTCOMES},
                "lead": interval([n["lead"] for n in numbers if n["lead"] is not None], confidence),
                "alarm_step": interval(
                    [n["alarm_step"] for n in numbers if n["alarm_step"] is not None], confidence
                ),
            }
    return out


def cell(c: dict, digits: int = 3, runs: int | None = None) -> str:
    """`mean [low, high]`; `(n=k)` when fewer than `runs` runs have the number."""
    if c.get("value") is None:
        return "-"
    f = f"{{:.{digits}f}}"
    text = f.format(c["value"])
    if c["low"] is not None:
        text += f" [{f.format(c['low'])}, {f.format(c['high'])}]"
    return text if runs is None or c["n"] == runs else f"{text} (n={c['n']})"


def markdown(results: dict, baselines: list[str]) -> str:
    """The outcome table, the guard table, and per-run guard lines."""
    rewards, diffs = results["rewards"], results["paired"]
    against = [b for b in baselines if b in diffs]
    head = ["reward", "runs", "base acc", "gain end", "gain peak", "peak step", "fall step"]
    head += ["alarm step"]
    head += [f"gain end - {b}" for b in against]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for name, s in rewards.items():
        if not s["runs"]:
            lines.append(f"| {name} | 0 |" + " - |" * (len(head) - 2))
            continue
        row = [name, str(s["runs"]), cell(s["base"]), cell(s["gain_end"]), cell(s["gain_peak"])]
        row += [cell(s["peak_step"], 1), cell(s["fall_step"], 1, s["runs"])]
        row += [cell(s["alarm_step"], 1, s["runs"])]
        row += [cell(diffs[b][name]["gain_end"]) if name in diffs[b] else "-" for b in against]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n\n" + guard_markdown(rewards)


def guard_markdown(rewards: dict) -> str:
    """Per reward: runs with an alarm, runs that fell, caught (alarm at or before the fall),
    lead, missed, late, false alarms (an alarm in a run that never fell)."""
    lines = [
        "| reward | runs | alarmed | fell | alarm before the fall | lead (steps) | missed | late"
        " | false alarms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in rewards.items():
        if not s["runs"]:
            continue
        g = s["guard"]
        fell = g["caught"] + g["late"] + g["missed"]
        lines.append(
            f"| {name} | {s['runs']} | {s['alarmed']} | {fell} | {g['caught']} "
            f"| {cell(s['lead'], 1)} | {g['missed']} | {g['late']} | {g['false_alarm']} |"
        )
    return "\n".join(lines)
