"""Every setting checked before any model work: a bad value or a contradictory combination
ends the run with one line naming the key, the value and what is allowed.

Rules are (key, test, what is allowed); a key a config does not have is skipped, so the same
reward rules serve every reward config that has the knob.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from covo.algorithms.losses import LOSS_AGGREGATIONS
from covo.answers import EXTRACTORS
from covo.infra.errors import SettingError
from covo.models.lora import MISSING, wants_lora

Rule = tuple[str, Callable[[Any], bool], str]
DTYPES = ("float32", "bfloat16", "float16")
# the compute dtype each Lightning precision runs in
PRECISION_COMPUTE = {
    "32-true": "float32",
    "32": "float32",
    "bf16-mixed": "bfloat16",
    "bf16-true": "bfloat16",
    "16-mixed": "float16",
    "16-true": "float16",
}
LOW_PRECISION_WEIGHTS = ("bf16-true", "16-true")
GROUP_BASELINES = ("covo.algorithms.advantages.grpo", "covo.algorithms.advantages.rloo")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def at_least(low: float, integer: bool = False) -> Callable[[Any], bool]:
    kind = _integer if integer else _number
    return lambda v: kind(v) and v >= low


def above(low: float) -> Callable[[Any], bool]:
    return lambda v: _number(v) and v > low


def between(low: float, high: float, low_open=False, high_open=False) -> Callable[[Any], bool]:
    def test(v) -> bool:
        if not _number(v):
            return False
        return (v > low if low_open else v >= low) and (v < high if high_open else v <= high)

    return test


def names(v) -> bool:
    return (
        isinstance(v, ListConfig | list) and len(v) > 0 and all(isinstance(x, str) and x for x in v)
    )


def one_of(*choices) -> Callable[[Any], bool]:
    return lambda v: v in choices


def optional(test: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or test(v)


INT_GE1 = (at_least(1, integer=True), "an integer >= 1")
BOOL = (lambda v: isinstance(v, bool), "true or false")
SAMPLING_RULES: list[Rule] = [
    ("num_samples", *INT_GE1),
    ("max_new_tokens", *INT_GE1),
    ("temperature", at_least(0.0), "a number >= 0 (0 = greedy)"),
    ("top_p", between(0.0, 1.0, low_open=True), "a number in (0, 1]"),
]
EXTRACTOR = (one_of(*EXTRACTORS), f"one of {', '.join(EXTRACTORS)}")
REWARD_RULES: list[Rule] = [
    ("extractor", *EXTRACTOR),
    ("max_steps", *INT_GE1),
    # cluster values: RiV, Con and 1 - Vol lie in [0, 1], RiL in [-1, 1]
    ("threshold", between(-1.0, 1.0), "a number in [-1, 1]"),
    ("timeout_s", above(0.0), "a number > 0"),
    ("mode", one_of("binary", "continuous"), "binary or continuous"),
    (
        "aggregation",
        one_of("vector", "linear", "consistency", "volatility"),
        "vector, linear, consistency or volatility",
    ),
    ("distance_tokens", one_of("answer", "template_and_answer"), "answer or template_and_answer"),
    ("colon_merge", one_of("pairs", "chains"), "pairs or chains"),
    ("volatility_index", one_of("released", "paper"), "released or paper"),
    ("curiosity.form", one_of("released", "paper"), "released or paper"),
    ("curiosity.weight", at_least(0.0), "a number >= 0"),
    ("min_states", *INT_GE1),
    ("short_penalty", optional(_number), "null or a number"),
    ("select", one_of("threshold", "top1"), "threshold or top1"),
]
LORA_RULES: list[Rule] = [
    ("model.lora.r", at_least(0, integer=True), "an integer >= 0 (0 = no adapters)"),
    ("model.lora.alpha", above(0.0), "a number > 0"),
    ("model.lora.dropout", between(0.0, 1.0, high_open=True), "a number in [0, 1)"),
    (
        "model.lora.target_modules",
        lambda v: v == "all-linear" or names(v),
        "all-linear or a list of module names",
    ),
]
TRAIN_RULES: list[Rule] = [
    ("seed", _integer, "an integer"),
    ("threads", optional(at_least(1, integer=True)), "null or an integer >= 1"),
    *[(f"rollout.{key}", test, allowed) for key, test, allowed in SAMPLING_RULES],
    ("rollout.stats_chunk", *INT_GE1),
    ("rollout.one_pass", *BOOL),
    ("model.hold_graphs", *BOOL),
    ("algorithm.mask_truncated", *BOOL),
    (
        "algorithm.loss_agg",
        one_of(*LOSS_AGGREGATIONS),
        f"one of {', '.join(LOSS_AGGREGATIONS)}",
    ),
    ("algorithm.max_idle_rollouts", optional(at_least(1, integer=True)), "null or an integer >= 1"),
    ("rollout.engine.cache", one_of("dynamic", "static"), "dynamic or static"),
    ("rollout.engine.compile", *BOOL),
    ("rollout.dtype", one_of(None, "auto", *DTYPES), f"null, auto or one of {DTYPES}"),
    ("scoring_dtype", one_of(None, *DTYPES), f"null or one of {DTYPES}"),
    ("reference_dtype", one_of(None, *DTYPES), f"null or one of {DTYPES}"),
    ("model.dtype", one_of(None, *DTYPES), f"null or one of {DTYPES}"),
    ("model.master_dtype", one_of(*DTYPES), f"one of {DTYPES}"),
    *LORA_RULES,
    ("export_adapters", one_of(True, False), "true or false"),
    ("trainer.num_nodes", *INT_GE1),
    ("optimizer.lr", above(0.0), "a number > 0"),
    ("optimizer.weight_decay", at_least(0.0), "a number >= 0"),
    ("optimizer.momentum", between(0.0, 1.0, high_open=True), "a number in [0, 1)"),
    ("scheduler.warmup_ratio", between(0.0, 1.0, high_open=True), "a number in [0, 1)"),
    ("scheduler.min_lr_ratio", between(0.0, 1.0), "a number in [0, 1]"),
    ("algorithm.clip_eps", above(0.0), "a number > 0"),
    ("algorithm.kl_coef", at_least(0.0), "a number >= 0"),
    ("algorithm.kl_estimator", one_of("k1", "k2", "k3"), "k1, k2 or k3"),
    ("algorithm.ppo_epochs", *INT_GE1),
    ("algorithm.micro_batch_size", *INT_GE1),
    ("algorithm.mini_batch_size", optional(at_least(1, integer=True)), "null or an integer >= 1"),
    ("algorithm.advantage.gamma", between(0.0, 1.0, low_open=True), "a number in (0, 1]"),
    ("algorithm.advantage.eps", above(0.0), "a number > 0"),
    ("trainer.max_steps", *INT_GE1),
    ("trainer.devices", *INT_GE1),
    ("data.batch_size", *INT_GE1),
    ("data.val_batch_size", *INT_GE1),
    ("data.val_size", at_least(0, integer=True), "an integer >= 0"),
    ("val_every_n_rollouts", *INT_GE1),
    ("samples_every_n_steps", *INT_GE1),
    ("plots_every_n_steps", *INT_GE1),
    ("callbacks.model_checkpoint.every_n_steps", *INT_GE1),
    ("max_grad_norm", above(0.0), "a number > 0"),
    *[(f"reward.{key}", test, allowed) for key, test, allowed in REWARD_RULES],
    ("val_extractor", *EXTRACTOR),
]
EVAL_RULES: list[Rule] = [
    ("seed", _integer, "an integer"),
    ("threads", optional(at_least(1, integer=True)), "null or an integer >= 1"),
    *SAMPLING_RULES,
    ("batch_size", *INT_GE1),
    ("max_samples", optional(at_least(1, integer=True)), "null or an integer >= 1"),
    ("dtype", one_of(None, "bfloat16", "float16"), "null, bfloat16 or float16"),
    *LORA_RULES,
]
SCORE_RULES: list[Rule] = [
    ("seed", _integer, "an integer"),
    ("threads", optional(at_least(1, integer=True)), "null or an integer >= 1"),
    ("scoring_dtype", one_of(None, "float32", "bfloat16"), "null, float32 or bfloat16"),
    *[(f"reward.{key}", test, allowed) for key, test, allowed in REWARD_RULES],
]


def fail(key: str, value, allowed: str) -> None:
    raise SettingError(f"{key}={_show(value)}: expected {allowed}")


def _show(value) -> str:
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value)
    return "null" if value is None else str(value)


def apply_rules(cfg: DictConfig, rules: list[Rule]) -> None:
    missing = object()
    for key, test, allowed in rules:
        value = OmegaConf.select(cfg, key, default=missing)
        if value is not missing and not test(value):
            fail(key, value, allowed)


def check_greedy(cfg: DictConfig, prefix: str = "") -> None:
    temperature = OmegaConf.select(cfg, f"{prefix}temperature")
    n = OmegaConf.select(cfg, f"{prefix}num_samples")
    if temperature == 0 and n > 1:
        fail(
            f"{prefix}temperature",
            temperature,
            f"a number > 0 with {prefix}num_samples={n} (greedy decoding gives one response)",
        )


def check_train(cfg: DictConfig) -> None:
    """All of `train.yaml`'s settings, after `precision: auto` is resolved."""
    apply_rules(cfg, TRAIN_RULES)
    check_greedy(cfg, "rollout.")
    algo = cfg.algorithm
    if algo.mini_batch_size is not None and algo.micro_batch_size > algo.mini_batch_size:
        fail(
            "algorithm.micro_batch_size",
            algo.micro_batch_size,
            f"at most algorithm.mini_batch_size={algo.mini_batch_size}",
        )
    if not algo.kl_in_reward and algo.kl_estimator == "k1" and algo.kl_coef > 0:
        fail(
            "algorithm.kl_estimator",
            "k1",
            "k2 or k3 with algorithm.kl_in_reward=false (k1 in the loss has zero expected"
            " gradient: it regularises nothing)",
        )
    target = cfg.algorithm.advantage._target_
    if target in GROUP_BASELINES and cfg.rollout.num_samples < 2:
        fail(
            "rollout.num_samples",
            cfg.rollout.num_samples,
            f"an integer >= 2 for {target.rsplit('.', 1)[-1]} (its baseline is the group)",
        )
    check_precision(cfg)
    check_lora(cfg)


def check_lora(cfg: DictConfig) -> None:
    """Adapters need peft installed; they share the policy's weights with the reference, and
    only a run with adapters can export them."""
    on = wants_lora(cfg.model.lora)
    if on and importlib.util.find_spec("peft") is None:
        raise SettingError(f"model.lora.r={cfg.model.lora.r}: {MISSING}")
    if on and cfg.reference_dtype is not None:
        fail(
            "reference_dtype",
            cfg.reference_dtype,
            "null with model.lora (the reference is the policy's own weights, adapters off)",
        )
    if not on and cfg.export_adapters:
        fail("export_adapters", "true", "false without model.lora.r > 0 (no adapters to write)")


def check_precision(cfg: DictConfig) -> None:
    """`model.dtype` (compute) must agree with `trainer.precision`; a precision that would hand
    the optimizer low-precision weights needs `model.master_dtype` set to that dtype."""
    precision = str(cfg.trainer.precision)
    if precision not in PRECISION_COMPUTE:
        fail("trainer.precision", precision, f"auto or one of {list(PRECISION_COMPUTE)}")
    compute = cfg.model.dtype
    if compute is not None and PRECISION_COMPUTE[precision] != compute:
        fail(
            "trainer.precision",
            precision,
            f"a precision computing in model.dtype={compute} (or auto)",
        )
    master = cfg.model.master_dtype
    if precision in LOW_PRECISION_WEIGHTS and master == "float32":
        fail(
            "trainer.precision",
            precision,
            "bf16-mixed or 16-mixed (fp32 master weights); a *-true precision makes the"
            " optimizer update low-precision weights: set model.master_dtype to opt in",
        )


def check_eval(cfg: DictConfig) -> list[int]:
    """`eval.yaml`'s settings; returns the k values of pass@k/maj@k that fit `num_samples`."""
    apply_rules(cfg, EVAL_RULES)
    check_greedy(cfg)
    if not all(_integer(k) and k >= 1 for k in cfg.k):
        fail("k", cfg.k, "a list of integers >= 1")
    ks = sorted({int(k) for k in cfg.k if k <= cfg.num_samples})
    if not ks:
        fail("k", cfg.k, f"at least one value <= num_samples={cfg.num_samples}")
    return ks


def check_score(cfg: DictConfig) -> None:
    apply_rules(cfg, SCORE_RULES)
