"""Collapse detection from label-free signals: rules over a stream of per-step values.

Label-free rewards share a failure: accuracy rises, then falls as the policy collapses onto
confident, agreeing (often shorter) answers. Without labels that shows as saturation of the
signals: the answers of a group agree, token entropy falls far below where it started, the
policy drifts far from the reference. A step is *saturated* when at least `min_rules` of the
rules hold; the alarm goes up once `window` consecutive steps are saturated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

KINDS = ("above", "below", "drop", "rise")


@dataclass(frozen=True)
class Rule:
    """`signal` above / below `value`, or dropped / risen by more than `value` (a fraction) of
    its start, the mean of its first `baseline_steps` values."""

    signal: str
    kind: str
    value: float

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
    """`{signal: {kind: value}}` -> rules; ValueError naming the bad entry."""
    parsed = []
    for signal, spec in dict(rules).items():
        spec = dict(spec or {})
        if len(spec) != 1 or next(iter(spec)) not in KINDS:
            raise ValueError(
                f"callbacks.collapse_guard.rules.{signal} must be one of "
                f"{{{', '.join(f'{k}: x' for k in KINDS)}}}, got {spec}"
            )
        ((kind, value),) = spec.items()
        parsed.append(Rule(str(signal), kind, float(value)))
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

    def __init__(self, rules: dict, min_rules: int = 2, window: int = 3, baseline_steps: int = 3):
        self.rules = parse_rules(rules)
        if not 1 <= min_rules <= len(self.rules):
            raise ValueError(
                f"callbacks.collapse_guard.min_rules must be in [1, {len(self.rules)}], "
                f"got {min_rules}"
            )
        if window < 1 or baseline_steps < 1:
            raise ValueError(
                "callbacks.collapse_guard.window_rollouts and baseline_rollouts must be >= 1"
            )
        self.min_rules, self.window, self.baseline_steps = min_rules, window, baseline_steps
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
        self.saturated.append(len(met) >= self.min_rules)
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
