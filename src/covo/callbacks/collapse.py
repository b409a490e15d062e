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

KINDS = ("above", "below", "drop", "rise")


@dataclass(frozen=True)
class Rule:
    """`signal` above / below `value`, or dropped / risen by more than `value` (a fraction) of
    its start, the mean of its first `baseline_rollouts` values; `alone`: it saturates a step on
    its own instead of counting towards `min_rules`."""

    signal: str
    kind: str
    value: float
    alone: bool = False

    def holds(self, current: float, start: float | None) -> bool:
        if self.kind == "above":
            return current >= self.value
        if self.kind == "below":
            return current <= self.value
        if start is None:  # relative rules wait for the start value
            return False
        if self.kind == "drop":
            return current <= (1.0 - self.value) * start
        return current >= (1.0 + self.value) * start

    def describe(self, current: float, start: float | None) -> str:
        if self.kind in ("above", "below"):
            sign = ">=" if self.kind == "above" else "<="
            return f"{self.signal} {current:.3g} {sign} {self.value:g}"
        return f"{self.signal} {current:.3g} ({self.kind} > {self.value:.0%} from {start:.3g})"


def parse_rules(rules: dict) -> list[Rule]:
    """`{signal: {kind: value}}` -> rules; a signal may hold a list of such specs, and a spec
    may add `alone: true`; ValueError naming the bad entry."""
    parsed = []
    for signal, specs in dict(rules).items():
        for spec in specs if isinstance(specs, Sequence) else [specs]:
            spec = dict(spec or {})
            alone = spec.pop("alone", False)
            if len(spec) != 1 or next(iter(spec)) not in KINDS or not isinstance(alone, bool):
                raise ValueError(
                    f"callbacks.collapse_guard.rules.{signal} must be one of "
                    f"{{{', '.join(f'{k}: x' for k in KINDS)}}} (optionally with alone: true), "
                    f"or a list of them, got {specs}"
                )
            ((kind, value),) = spec.items()
            parsed.append(Rule(str(signal), kind, float(value), alone))
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

    def update(self, values: dict[str, float]) -> Verdict:
        values = {k: float(v) for k, v in values.items() if math.isfinite(float(v))}
        self.history.append(values)
        met = [
            rule
            for rule in self.rules
            if rule.signal in values and rule.holds(values[rule.signal], self.start(rule.signal))
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
            rule.describe(detector.history[-1][rule.signal], detector.start(rule.signal))
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
