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
