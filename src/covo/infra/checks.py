"""Tests of one setting's value and the one-line error naming its key, shared by every group's
own checks (`covo.rewards`, `covo.rollout.checks`, `covo.models.lora`, `covo.algorithms`...).

A group check reads its keys strictly: a key its config lacks is an error naming the key, so
renaming a YAML key cannot drop a check silently.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NoReturn

import hydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig, ListConfig, OmegaConf

from covo.infra.errors import SettingError

Test = Callable[[Any], bool]
Rule = tuple[str, Test, str]  # (key, test, what is allowed)


class BadSetting(SettingError):
    """`key=value: expected allowed`."""

    def __init__(self, key: str, value, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={show(value)}: expected {allowed}")


def number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def at_least(low: float, integer_only: bool = False) -> Test:
    kind = integer if integer_only else number
    return lambda v: kind(v) and v >= low


def above(low: float) -> Test:
    return lambda v: number(v) and v > low


def between(low: float, high: float, low_open=False, high_open=False) -> Test:
    def test(v) -> bool:
        if not number(v):
            return False
        return (v > low if low_open else v >= low) and (v < high if high_open else v <= high)

    return test


def names(v) -> bool:
    return (
        isinstance(v, ListConfig | list) and len(v) > 0 and all(isinstance(x, str) and x for x in v)
    )


def one_of(*choices) -> Test:
    return lambda v: v in choices


def choice(*options) -> tuple[Test, str]:
    """A rule's test and text for a value among `options` (a registry's keys, or literals):
    `a or b`, `one of a, b, c`."""
    shown = [show(option) for option in options]
    allowed = " or ".join(shown) if len(shown) == 2 else f"one of {', '.join(shown)}"
    return one_of(*options), allowed


def optional(test: Test) -> Test:
    return lambda v: v is None or test(v)


def is_bool(v) -> bool:
    return isinstance(v, bool)


INT_GE1 = (at_least(1, integer_only=True), "an integer >= 1")
BOOL = (is_bool, "true or false")
DTYPES = ("float32", "bfloat16", "float16")


def show(value) -> str:
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value)
    return "null" if value is None else str(value)


def fail(key: str, value, allowed: str) -> NoReturn:
    raise BadSetting(key, value, allowed)


def check(key: str, value, test: Test, allowed: str) -> None:
    if not test(value):
        fail(key, value, allowed)


def read(cfg: DictConfig, key: str, prefix: str = ""):
    """`cfg`'s value at the dotted `key`; a key it lacks is an error naming `prefix + key`."""
    missing = object()
    value = OmegaConf.select(cfg, key, default=missing)
    if value is missing:
        raise SettingError(f"{prefix}{key}: missing from the config")
    return value


def apply_rules(cfg: DictConfig, rules: list[Rule], prefix: str = "") -> None:
    """Every rule's key read strictly from `cfg`; errors name `prefix + key`."""
    for key, test, allowed in rules:
        check(f"{prefix}{key}", read(cfg, key, prefix), test, allowed)


def apply_rules_where_set(cfg: DictConfig, rules: list[Rule], prefix: str = "") -> None:
    """Rules of knobs that only some options of a group have (AdamW's `weight_decay`, the
    cosine schedule's `min_lr_ratio`): each checked where `cfg` sets its key."""
    apply_rules(cfg, [rule for rule in rules if rule[0] in cfg], prefix)


def instantiate(node: DictConfig):
    """`hydra.utils.instantiate(node)`; a value its constructor refuses (a `BadSetting`, which
    names the key from the config's root, e.g. `reward.threshold`) is that one line, not
    Hydra's wrapped error."""
    try:
        return hydra.utils.instantiate(node)
    except InstantiationException as err:
        if isinstance(err.__cause__, BadSetting):
            raise err.__cause__ from None
        raise
