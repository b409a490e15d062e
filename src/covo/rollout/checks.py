"""The sampling settings every rollout reads (train's `rollout.*`, eval's top-level keys) and
the training rollout's own (statistics pass, engine, replica dtype), checked before any model
work; each key is read strictly (`covo.infra.checks`)."""

from __future__ import annotations

from omegaconf import DictConfig

from covo.infra.checks import (
    BOOL,
    DTYPES,
    INT_GE1,
    Rule,
    apply_rules,
    at_least,
    between,
    choice,
    fail,
)

SAMPLING_RULES: list[Rule] = [
    ("num_samples", *INT_GE1),
    ("max_new_tokens", *INT_GE1),
    ("temperature", at_least(0.0), "a number >= 0 (0 = greedy)"),
    ("top_p", between(0.0, 1.0, low_open=True), "a number in (0, 1]"),
]
ROLLOUT_RULES: list[Rule] = [
    ("stats_chunk", *INT_GE1),
    ("one_pass", *BOOL),
    ("engine.cache", *choice("dynamic", "static")),
    ("engine.compile", *BOOL),
    ("dtype", *choice(None, "auto", *DTYPES)),
]


def check_sampling(cfg: DictConfig, prefix: str = "") -> None:
    """`num_samples`, `max_new_tokens`, `temperature`, `top_p` of `cfg` (keys named from the
    root with `prefix`); greedy decoding (temperature 0) gives one response per prompt."""
    apply_rules(cfg, SAMPLING_RULES, prefix)
    if cfg.temperature == 0 and cfg.num_samples > 1:
        fail(
            f"{prefix}temperature",
            cfg.temperature,
            f"a number > 0 with {prefix}num_samples={cfg.num_samples}"
            " (greedy decoding gives one response)",
        )


def check_rollout(rollout: DictConfig, prefix: str = "rollout.") -> None:
    """The training rollout's settings: sampling, the statistics pass, the engine, the dtype."""
    check_sampling(rollout, prefix)
    apply_rules(rollout, ROLLOUT_RULES, prefix)
