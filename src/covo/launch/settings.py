"""Every setting checked before any model work: a bad value or a contradictory combination
ends the run with one line naming the key, the value and what is allowed.

Each group checks its own keys next to the code that uses them (the reward's constructor,
`covo.rollout.checks`, `covo.models.lora`, `covo.algorithms.updater.check_algorithm`,
`covo.optim.check_scheduler`); here are the entry points that call them, the keys of the run
configs themselves (and of the optimizer and trainer, whose constructors are not covo's), and
the rules that span groups.
"""

from __future__ import annotations

import importlib.util

from omegaconf import DictConfig

from covo.algorithms.updater import check_algorithm
from covo.answers import EXTRACTORS
from covo.data.datamodule import check_data
from covo.infra.checks import (
    BOOL,
    DTYPES,
    INT_GE1,
    Rule,
    above,
    apply_rules,
    apply_rules_where_set,
    at_least,
    between,
    choice,
    fail,
    instantiate,
    integer,
    one_of,
    optional,
)
from covo.infra.errors import SettingError
from covo.models.lora import MISSING, check_lora_settings, wants_lora
from covo.optim import check_scheduler
from covo.rewards.covo.scorer import SCORING_DTYPE_RULE
from covo.rollout.checks import check_rollout, check_sampling

SINGLE_DEVICE = "covo.infra.strategies.single_device"  # strategy=auto's

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
RUN_RULES: list[Rule] = [
    ("seed", integer, "an integer"),
    ("threads", optional(at_least(1, integer_only=True)), "null or an integer >= 1"),
]
TRAIN_RULES: list[Rule] = [
    *RUN_RULES,
    ("model.hold_graphs", *BOOL),
    ("module.scoring_dtype", *choice(None, *DTYPES)),
    ("module.reference_dtype", *choice(None, *DTYPES)),
    ("model.dtype", *choice(None, *DTYPES)),
    ("model.master_dtype", *choice(*DTYPES)),
    ("export_adapters", *BOOL),
    ("trainer.num_nodes", *INT_GE1),
    ("optimizer.lr", above(0.0), "a number > 0"),
    ("trainer.max_steps", *INT_GE1),
    ("trainer.devices", *INT_GE1),
    ("val_every_n_rollouts", *INT_GE1),
    ("module.samples_every_n_steps", *INT_GE1),
    ("module.plots_every_n_steps", *INT_GE1),
    ("module.max_grad_norm", above(0.0), "a number > 0"),
]
# torch's optimizers' knobs that only some options have (AdamW's weight_decay, SGD's momentum)
OPTIMIZER_RULES: list[Rule] = [
    ("weight_decay", at_least(0.0), "a number >= 0"),
    ("momentum", between(0.0, 1.0, high_open=True), "a number in [0, 1)"),
]
EVAL_RULES: list[Rule] = [
    *RUN_RULES,
    ("batch_size", *INT_GE1),
    ("max_samples", optional(at_least(1, integer_only=True)), "null or an integer >= 1"),
    ("dtype", one_of(None, "bfloat16", "float16"), "null, bfloat16 or float16"),
]
SCORE_RULES: list[Rule] = [
    *RUN_RULES,
    SCORING_DTYPE_RULE,
]


def check_train(cfg: DictConfig):
    """All of `train.yaml`'s settings, after `precision: auto` is resolved. Returns the reward,
    built (cheaply, no model) to check its arguments."""
    apply_rules(cfg, TRAIN_RULES)
    apply_rules_where_set(cfg.optimizer, OPTIMIZER_RULES, "optimizer.")
    if cfg.callbacks is not None and "model_checkpoint" in cfg.callbacks:
        checkpoint = cfg.callbacks.model_checkpoint
        apply_rules(checkpoint, [("every_n_steps", *INT_GE1)], "callbacks.model_checkpoint.")
    check_data(cfg.data)
    check_rollout(cfg.rollout)
    check_algorithm(cfg.algorithm)
    check_scheduler(cfg.scheduler)
    check_lora_settings(cfg.model.lora)
    reward = instantiate(cfg.reward)
    # the reward's own extractor by default: named after the reward's error
    apply_rules(cfg, [("module.val_extractor", *choice(*EXTRACTORS))])
    target = cfg.algorithm.advantage._target_
    if target in GROUP_BASELINES and cfg.rollout.num_samples < 2:
        fail(
            "rollout.num_samples",
            cfg.rollout.num_samples,
            f"an integer >= 2 for {target.rsplit('.', 1)[-1]} (its baseline is the group)",
        )
    check_precision(cfg)
    check_lora(cfg)
    check_processes(cfg)
    return reward


def check_processes(cfg: DictConfig) -> None:
    """`strategy=auto` runs one process: Lightning's single-device strategy would ignore more
    `trainer.devices` or `trainer.num_nodes` and train on one without a word."""
    if cfg.strategy.get("_target_") != SINGLE_DEVICE:
        return
    for key in ("devices", "num_nodes"):
        if cfg.trainer[key] != 1:
            fail(
                f"trainer.{key}",
                cfg.trainer[key],
                "1 with strategy=auto (one process); strategy=ddp or strategy=fsdp run several",
            )


def check_lora(cfg: DictConfig) -> None:
    """Adapters need peft installed; they share the policy's weights with the reference, and
    only a run with adapters can export them."""
    on = wants_lora(cfg.model.lora)
    if on and importlib.util.find_spec("peft") is None:
        raise SettingError(f"model.lora.r={cfg.model.lora.r}: {MISSING}")
    if on and cfg.module.reference_dtype is not None:
        fail(
            "module.reference_dtype",
            cfg.module.reference_dtype,
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
    check_sampling(cfg)
    check_lora_settings(cfg.model.lora)
    if not all(integer(k) and k >= 1 for k in cfg.k):
        fail("k", cfg.k, "a list of integers >= 1")
    ks = sorted({int(k) for k in cfg.k if k <= cfg.num_samples})
    if not ks:
        fail("k", cfg.k, f"at least one value <= num_samples={cfg.num_samples}")
    return ks


def check_score(cfg: DictConfig):
    """`score.yaml`'s settings; returns the reward, built (no model) to check its arguments."""
    apply_rules(cfg, SCORE_RULES)
    return instantiate(cfg.reward)
