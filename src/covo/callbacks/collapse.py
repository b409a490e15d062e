"""Collapse detection from label-free signals: rules over a stream of per-step values.

Label-free rewards share a failure: accuracy rises, then falls as the policy collapses onto
confident, agreeing (often shorter) answers. Without labels that shows as saturation of the
signals: the answers of a group agree, token entropy falls far below where it started, the
policy drifts far from the reference. A step is *saturated* when at least `min_rules` of the
rules hold, or one rule marked `alone` holds (a drift large enough to be a collapse by itself,
while the answers may still disagree); the alarm goes up once `window` consecutive steps are
saturated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

KINDS = ("above", "below", "drop", "rise", "slope_above", "slope_below", "accel_above")
TRENDS = ("slope_above", "slope_below", "accel_above")  # rules over the signal's recent values


@dataclass(frozen=True)
class Rule:
    """`signal` above / below `value`, or dropped / risen by more than `value` (a fraction) of
    its start, the mean of its first `baseline_rollouts` values; or a trend over its last `over`
    values: their least-squares slope per rollout at or above / at or below `value`
    (`slope_above`, `slope_below`), or that slope minus the slope of the `over` values before
    them at or above `value` (`accel_above`: the signal speeds up). `alone`: it saturates a step
    on its own instead of counting towards `min_rules`."""

    signal: str
    kind: str
    value: float
    alone: bool = False
    over: int = 5

    def measure(self, series: Sequence[float]) -> float:
        """The number the rule compares with `value`: the latest value, or the trend (NaN
        until the signal has enough values)."""
        if self.kind not in TRENDS:
            return series[-1]
        recent = list(series[-self.over :])
        if len(recent) < self.over:
            return math.nan
        if self.kind != "accel_above":
            return slope(recent)
        before = list(series[-2 * self.over : -self.over])
        return slope(recent) - slope(before) if len(before) == self.over else math.nan

    def holds(self, series: Sequence[float], start: float | None) -> bool:
        """Whether the rule holds on the signal's values so far (oldest first)."""
        current = self.measure(series)
        if math.isnan(current):
            return False
        if self.kind in ("above", "slope_above", "accel_above"):
            return current >= self.value
        if self.kind in ("below", "slope_below"):
            return current <= self.value
        if start is None:  # relative rules wait for the start value
            return False
        if self.kind == "drop":
            return current <= (1.0 - self.value) * start
        return current >= (1.0 + self.value) * start

    def describe(self, series: Sequence[float], start: float | None) -> str:
        current = self.measure(series)
        if self.kind in ("above", "below"):
            sign = ">=" if self.kind == "above" else "<="
            return f"{self.signal} {current:.3g} {sign} {self.value:g}"
        if self.kind in TRENDS:
            what = "acceleration" if self.kind == "accel_above" else "slope"
            sign = "<=" if self.kind == "slope_below" else ">="
            trend = f"{current:.3g}/rollout {sign} {self.value:g}"
            return f"{self.signal} {what} {trend} (last {self.over})"
        return f"{self.signal} {current:.3g} ({self.kind} > {self.value:.0%} from {start:.3g})"


def parse_rules(rules: dict) -> list[Rule]:
    """`{signal: {kind: value}}` -> rules; a signal may hold a list of such specs, a spec may add
    `alone: true`, and a trend spec `over: n` (n >= 2 rollouts, default 5); ValueError naming
    the bad entry."""
    parsed = []
    for signal, specs in dict(rules).items():
        for spec in specs if isinstance(specs, Sequence) else [specs]:
            spec = dict(spec or {})
            alone = spec.pop("alone", False)
            over = spec.pop("over", None)
            kind = next(iter(spec), None)
            window_ok = over is None or (kind in TRENDS and type(over) is int and over >= 2)
            if len(spec) != 1 or kind not in KINDS or not isinstance(alone, bool) or not window_ok:
                raise ValueError(
                    f"callbacks.collapse_guard.rules.{signal} must be one of "
                    f"{{{', '.join(f'{k}: x' for k in KINDS)}}} (optionally with alone: true; "
                    f"a slope or accel rule with over: n >= 2), or a list of them, got {specs}"
                )
            value = float(spec[kind])
            parsed.append(Rule(str(signal), kind, value, alone, 5 if over is None else over))
    return parsed


def slope(values: list[float]) -> float:
    """Least-squares slope per step of `values` (NaN for fewer than two)."""
    n = len(values)
    if n < 2:
        return math.nan
    mean_x, mean_y = (n - 1) / 2, math.fsum(values) / n
    num = math.fsum((x - mean_x) * (y - mean_y) for x, y in enumerate(values))
    return num / math.fsum((x - mean_x) ** 2 for x in range(n))


@dataclass
class Verdict:
    met: list[Rule]
    saturated: bool
    alarm: bool
    trends: dict[str, float]


class CollapseDetector:
    """Feed one step's signals at a time (`update`); keeps what a resumed run needs."""

    def __init__(
        self, rules: dict, min_rules: int = 2, window_rollouts: int = 3, baseline_rollouts: int = 3
    ):
        self.rules = parse_rules(rules)
        counted = sum(not rule.alone for rule in self.rules)
        if not 1 <= min_rules <= max(counted, 1):
            raise ValueError(
                f"callbacks.collapse_guard.min_rules must be in [1, {max(counted, 1)}], "
                f"got {min_rules}"
            )
        if window_rollouts < 1 or baseline_rollouts < 1:
            raise ValueError(
                "callbacks.collapse_guard.window_rollouts and baseline_rollouts must be >= 1"
            )
        self.min_rules = min_rules
        self.window, self.baseline_steps = window_rollouts, baseline_rollouts
        self.history: list[dict[str, float]] = []
        self.saturated: list[bool] = []

    def start(self, signal: str) -> float | None:
        """Mean of the signal's first `baseline_steps` values, once it has that many."""
        seen = [step[signal] for step in self.history if signal in step][: self.baseline_steps]
        return math.fsum(seen) / len(seen) if len(seen) == self.baseline_steps else None

    def series(self, signal: str) -> list[float]:
        """The signal's values so far, oldest first."""
        return [step[signal] for step in self.history if signal in step]

    def update(self, values: dict[str, float]) -> Verdict:
        values = {k: float(v) for k, v in values.items() if math.isfinite(float(v))}
        self.history.append(values)
        met = [
            rule
            for rule in self.rules
            if rule.signal in values
            and rule.holds(self.series(rule.signal), self.start(rule.signal))
        ]
        counted = sum(not rule.alone for rule in met)
        self.saturated.append(counted >= self.min_rules or any(rule.alone for rule in met))
        recent = self.saturated[-self.window :]
        alarm = len(recent) == self.window and all(recent)
        trends = {}
        for name in values:
            window = [step[name] for step in self.history[-self.window :] if name in step]
            if len(window) >= 2:
                trends[name] = slope(window)
        return Verdict(met, self.saturated[-1], alarm, trends)

    def state_dict(self) -> dict:
        return {"history": self.history, "saturated": self.saturated}

    def load_state_dict(self, state: dict) -> None:
        self.history = list(state["history"])
        self.saturated = list(state["saturated"])


KEEP, ALARM = "keep", "alarm"


class CollapseWatch:
    """The guard's decisions over a run's rollouts, whatever trainer runs them (covo's
    Lightning callback, the TRL callback): the rules (`CollapseDetector`) over the signals
    `signals` maps to metric names, which weights to keep and when to alarm.

    `observe` takes one rollout's metrics. It answers KEEP after an unsaturated rollout at most
    once every `window_rollouts` rollouts (with `save_pre_collapse`; the alarm's window is
    saturated, so weights kept before it always precede the window), ALARM the first time the
    alarm goes up, else None. The caller records the optimizer step of what it kept
    (`healthy_step`) and of the alarm (`alarm_step`).
    """

    def __init__(
        self,
        rules: dict,
        signals: dict[str, str],
        min_rules: int = 2,
        window_rollouts: int = 3,
        baseline_rollouts: int = 3,
        save_pre_collapse: bool = True,
    ):
        unknown = sorted({str(name) for name in rules} - set(signals))
        if unknown:
            raise ValueError(
                f"callbacks.collapse_guard.rules.{unknown[0]}: unknown signal; "
                f"known: {', '.join(signals)}"
            )
        self.signals = dict(signals)
        self.detector = CollapseDetector(rules, min_rules, window_rollouts, baseline_rollouts)
        self.save_pre_collapse = save_pre_collapse
        self.rollouts = 0  # rollouts seen
        self.healthy_rollout: int | None = None  # the rollout whose weights were kept
        self.healthy_step: int | None = None  # the optimizer step of the kept weights
        self.alarm_step: int | None = None

    def observe(self, metrics) -> tuple[dict[str, float], Verdict, str | None]:
        """A rollout's metrics (name -> number) -> its `collapse/...` values (each signal, its
        slope over the window as `<name>_trend`, `rules_met`, `alarm`), verdict and action."""
        rollout = self.rollouts
        self.rollouts += 1
        values = {name: float(metrics[src]) for name, src in self.signals.items() if src in metrics}
        verdict = self.detector.update(values)
        logged = {f"collapse/{name}": value for name, value in values.items()}
        logged |= {f"collapse/{name}_trend": value for name, value in verdict.trends.items()}
        logged["collapse/rules_met"] = float(len(verdict.met))
        logged["collapse/alarm"] = float(verdict.alarm)
        action = None
        if self.alarm_step is None and verdict.alarm:
            action = ALARM
        elif self.alarm_step is None and not verdict.saturated and self.save_pre_collapse:
            last = self.healthy_rollout
            if last is None or rollout - last >= self.detector.window:
                action, self.healthy_rollout = KEEP, rollout
        return logged, verdict, action

    def alarm_line(self, step: int, verdict: Verdict, kept: str, stopping: bool) -> str:
        """The warning: the step, each rule that held with its value, what was kept."""
        detector = self.detector
        held = "; ".join(
            rule.describe(detector.series(rule.signal), detector.start(rule.signal))
            for rule in verdict.met
        )
        return (
            f"collapse alarm at step {step}: {held}, for {detector.window} rollouts;"
            f" pre-collapse checkpoint: {kept}{'; stopping' if stopping else ''}"
        )

    def state_dict(self) -> dict:
        return {
            **self.detector.state_dict(),
            "alarm_step": self.alarm_step,
            "healthy_step": self.healthy_step,
            "rollouts": self.rollouts,
            "healthy_rollout": self.healthy_rollout,
        }

    def load_state_dict(self, state: dict) -> None:
        self.detector.load_state_dict(state)
        self.alarm_step = state["alarm_step"]
        self.healthy_step = state["healthy_step"]
        self.rollouts = state["rollouts"]
        self.healthy_rollout = state["healthy_rollout"]
