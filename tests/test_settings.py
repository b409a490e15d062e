"""Every setting is checked before any model work: one line naming key, value and range."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from conftest import ROOT, compose_config
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from omegaconf import OmegaConf, open_dict

from covo.infra.checks import BadSetting
from covo.infra.errors import SettingError
from covo.launch.settings import (
    EVAL_RULES,
    SCORE_RULES,
    TRAIN_RULES,
    check_eval,
    check_score,
    check_train,
)
from covo.launch.train import build, resolve_auto
from covo.rewards.covo.reward import CoVoReward
from covo.rewards.majority import MajorityReward


def train_cfg(tmp_path, *overrides):
    model = (
        [] if any(o.startswith(("model=", "experiment=")) for o in overrides) else ["model=tiny"]
    )
    cfg = compose_config("train", [*model, *overrides], tmp_path)
    resolve_auto(cfg)
    return cfg


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("rollout.temperature=-1", "rollout.temperature=-1: expected a number >= 0 (0 = greedy)"),
        (
            "rollout.temperature=0",
            "rollout.temperature=0: expected a number > 0 with rollout.num_samples=4"
            " (greedy decoding gives one response)",
        ),
        ("rollout.top_p=1.5", "rollout.top_p=1.5: expected a number in (0, 1]"),
        ("rollout.top_p=0", "rollout.top_p=0: expected a number in (0, 1]"),
        ("rollout.num_samples=0", "rollout.num_samples=0: expected an integer >= 1"),
        ("rollout.max_new_tokens=0", "rollout.max_new_tokens=0: expected an integer >= 1"),
        ("optimizer.lr=0", "optimizer.lr=0: expected a number > 0"),
        ("algorithm.clip_eps=-0.1", "algorithm.clip_eps=-0.1: expected a number > 0"),
        ("algorithm.micro_batch_size=0", "algorithm.micro_batch_size=0: expected an integer >= 1"),
        ("algorithm.ppo_epochs=0", "algorithm.ppo_epochs=0: expected an integer >= 1"),
        (
            "algorithm.mini_batch_size=2",  # micro is 4
            "algorithm.micro_batch_size=4: expected at most algorithm.mini_batch_size=2",
        ),
        ("algorithm.kl_estimator=k4", "algorithm.kl_estimator=k4: expected k1, k2 or k3"),
        (
            "algorithm.kl_in_reward=false",  # reinforce_pp's estimator is k1
            "algorithm.kl_estimator=k1: expected k2 or k3 with algorithm.kl_in_reward=false",
        ),
        ("reward.max_steps=0", "reward.max_steps=0: expected an integer >= 1"),
        ("reward.threshold=nan", "reward.threshold=nan: expected a number in [-1, 1]"),
        ("reward.threshold=1.5", "reward.threshold=1.5: expected a number in [-1, 1]"),
        ("reward.mode=soft", "reward.mode=soft: expected binary or continuous"),
        ("trainer.max_steps=0", "trainer.max_steps=0: expected an integer >= 1"),
        ("scheduler.warmup_ratio=1.0", "scheduler.warmup_ratio=1.0: expected a number in [0, 1)"),
        ("data.batch_size=0", "data.batch_size=0: expected an integer >= 1"),
        ("module.max_grad_norm=0", "module.max_grad_norm=0: expected a number > 0"),
        ("rollout.top_p=abc", "rollout.top_p=abc: expected a number in (0, 1]"),
        (
            "model.dtype=bfloat16",  # with trainer.precision=32-true
            "trainer.precision=32-true: expected a precision computing in model.dtype=bfloat16",
        ),
        (
            "trainer.precision=bf16-true",
            "trainer.precision=bf16-true: expected bf16-mixed or 16-mixed (fp32 master weights)",
        ),
    ],
)
def test_bad_train_settings_name_key_value_and_range(tmp_path, override, message):
    overrides = [override]
    if override.startswith("model.dtype"):
        overrides = ["model=hf", "model.name_or_path=x", override, "trainer.precision=32-true"]
    with pytest.raises(ValueError) as err:
        check_train(train_cfg(tmp_path, *overrides))
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("reward.min_states=0", "reward.min_states=0: expected an integer >= 1"),
        ("reward.min_states=1.5", "reward.min_states=1.5: expected an integer >= 1"),
        ("reward.short_penalty=abc", "reward.short_penalty=abc: expected null or a number"),
        ("reward.select=top2", "reward.select=top2: expected threshold or top1"),
    ],
)
def test_bad_cluster_guards_name_key_value_and_range(tmp_path, override, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        check_train(train_cfg(tmp_path, "reward=covo_guarded", override))
    score_cfg = compose_config("score", ["model=tiny", "input=a", "output=b", override], tmp_path)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        check_score(score_cfg)


def test_group_baselines_need_two_samples(tmp_path):
    with pytest.raises(ValueError, match=r"rollout.num_samples=1: expected an integer >= 2 for"):
        check_train(train_cfg(tmp_path, "algorithm=grpo", "rollout.num_samples=1"))


def test_good_settings_and_explicit_opt_ins_pass(tmp_path):
    check_train(train_cfg(tmp_path))
    check_train(train_cfg(tmp_path, "rollout.temperature=0", "rollout.num_samples=1"))
    check_train(train_cfg(tmp_path, "algorithm.kl_in_reward=false", "algorithm.kl_estimator=k3"))
    # low-precision weights on purpose
    check_train(
        train_cfg(
            tmp_path,
            "model=hf",
            "model.name_or_path=x",
            "model.master_dtype=bfloat16",
            "trainer.precision=bf16-true",
        )
    )


def test_model_dtype_sets_the_precision_and_the_rollout_dtype(tmp_path):
    cfg = train_cfg(tmp_path, "model=hf", "model.name_or_path=x", "model.dtype=bfloat16")
    assert cfg.trainer.precision == "bf16-mixed"
    assert cfg.rollout.dtype == "bfloat16"
    cfg = train_cfg(tmp_path, "model=hf", "model.name_or_path=x", "model.dtype=float32")
    assert cfg.trainer.precision == "32-true"
    assert cfg.rollout.dtype is None


def test_released_recipe_trains_fp32_master_weights_with_bf16_compute(tmp_path):
    cfg = train_cfg(
        tmp_path,
        "experiment=covo_released_qwen7b",
        "model.name_or_path=x",
        "data.train.path=x.jsonl",
    )
    check_train(cfg)
    assert cfg.model.master_dtype == "float32"
    assert cfg.model.dtype == "bfloat16"
    assert cfg.trainer.precision == "bf16-mixed"
    assert cfg.strategy._target_ == "covo.infra.strategies.fsdp"


def test_eval_and_score_settings(tmp_path):
    eval_cfg = compose_config("eval", ["model=tiny", "top_p=0"], tmp_path)
    with pytest.raises(ValueError, match=r"^top_p=0: expected a number in \(0, 1\]$"):
        check_eval(eval_cfg)
    eval_cfg = compose_config("eval", ["model=tiny", "k=[0,1]"], tmp_path)
    with pytest.raises(ValueError, match=r"^k=\[0, 1\]: expected a list of integers >= 1$"):
        check_eval(eval_cfg)
    score_cfg = compose_config("score", ["model=tiny", "input=a", "output=b"], tmp_path)
    check_score(score_cfg)
    score_cfg = compose_config(
        "score", ["model=tiny", "input=a", "output=b", "reward.max_steps=0"], tmp_path
    )
    with pytest.raises(ValueError, match=r"^reward.max_steps=0: expected an integer >= 1$"):
        check_score(score_cfg)


def test_every_scoring_command_refuses_a_scoring_dtype_with_one_rule(tmp_path):
    """score, study and the TRL integration share the scorer's dtypes: fp16 is none of them."""
    from covo.analysis.study import check as check_study
    from covo.integrations.trl import integration_config

    line = r"^scoring_dtype=float16: expected one of null, float32, bfloat16$"
    score_cfg = compose_config(
        "score", ["model=tiny", "input=a", "output=b", "scoring_dtype=float16"], tmp_path
    )
    with pytest.raises(SettingError, match=line):
        check_score(score_cfg)
    study_cfg = compose_config("study", ["model=tiny", "scoring_dtype=float16"], tmp_path)
    with pytest.raises(SettingError, match=line):
        check_study(study_cfg)
    with pytest.raises(SettingError, match=line):
        integration_config("covo", ["scoring_dtype=float16"])
    for dtype in ("null", "bfloat16"):
        integration_config("covo", [f"scoring_dtype={dtype}"])


def test_the_command_line_prints_one_line_and_exits_2_before_loading(tmp_path):
    proc = subprocess.run(
        [sys.executable, "train.py", "rollout.top_p=1.5", f"paths.log_dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: rollout.top_p=1.5: expected a number in (0, 1]"
    assert "Traceback" not in proc.stderr + proc.stdout


def config_keys(node, prefix: str = "") -> set[str]:
    """Every dotted key of a config (a plain container), interior nodes included."""
    keys = set()
    for key, value in node.items():
        keys.add(f"{prefix}{key}")
        if isinstance(value, dict):
            keys |= config_keys(value, f"{prefix}{key}.")
    return keys


def option_keys(name: str, groups: tuple[str, ...]) -> set[str]:
    """The keys of `name`.yaml composed with its defaults and with every option of `groups`
    (a rule may name a knob only some options have: the reward's `threshold`)."""
    overrides = [[]] + [
        [f"{group}={option.stem}"]
        for group in groups
        for option in sorted((ROOT / "conf" / group).glob("*.yaml"))
    ]
    keys = set()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        for override in overrides:
            cfg = compose(name, overrides=override)
            keys |= config_keys(OmegaConf.to_container(cfg, resolve=False))
    return keys


@pytest.mark.parametrize(
    ("name", "rules", "groups"),
    [
        ("train", TRAIN_RULES, ("reward", "algorithm", "optimizer", "scheduler", "model", "data")),
        ("eval", EVAL_RULES, ("model",)),
        ("score", SCORE_RULES, ("reward",)),
    ],
)
def test_every_rule_names_a_key_every_config_has(name, rules, groups):
    """The rules of `covo.launch.settings` read their keys strictly: each is in the composed
    config whatever option of a group is picked."""
    keys = option_keys(name, groups)
    assert [key for key, _, _ in rules if key not in keys] == []


@pytest.mark.parametrize(
    ("reward", "message"),
    [
        (lambda: CoVoReward(threshold=2), "reward.threshold=2: expected a number in [-1, 1]"),
        (
            lambda: CoVoReward(curiosity={"form": "other", "weight": 0.1}),
            "reward.curiosity.form=other: expected released or paper",
        ),
        (
            lambda: MajorityReward(extractor="first_word"),
            "reward.extractor=first_word: expected one of ",
        ),
        (lambda: MajorityReward(timeout_s=0), "reward.timeout_s=0: expected a number > 0"),
    ],
)
def test_a_reward_built_directly_refuses_its_bad_arguments(reward, message):
    with pytest.raises(BadSetting) as err:
        reward()
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_the_reward_group_names_the_full_key(tmp_path):
    with pytest.raises(
        SettingError, match=r"^reward\.threshold=2: expected a number in \[-1, 1\]$"
    ):
        check_train(train_cfg(tmp_path, "reward.threshold=2"))
    with pytest.raises(SettingError, match=r"^reward\.extractor=first_word: expected one of "):
        check_train(train_cfg(tmp_path, "reward=majority", "reward.extractor=first_word"))


@pytest.mark.parametrize(
    ("key", "named"),
    [
        ("rollout.top_p", "rollout.top_p"),
        ("rollout.engine.cache", "rollout.engine.cache"),
        ("algorithm.clip_eps", "algorithm.clip_eps"),
        ("scheduler.warmup_ratio", "scheduler.warmup_ratio"),
        ("model.lora.alpha", "model.lora.alpha"),
        ("data.batch_size", "data.batch_size"),
    ],
)
def test_a_key_a_group_check_reads_cannot_go_missing(tmp_path, key, named):
    cfg = train_cfg(tmp_path)
    parent, leaf = key.rsplit(".", 1)
    node = OmegaConf.select(cfg, parent)
    with open_dict(node):
        node.pop(leaf)
    with pytest.raises(SettingError, match=f"^{re.escape(named)}: missing from the config$"):
        check_train(cfg)


def test_a_bad_reward_value_fails_before_the_model_loads(tmp_path, monkeypatch):
    def no_model(**kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("covo.models.loading.build_tiny", no_model)
    with pytest.raises(InstantiationException, match="the model was loaded"):
        build(train_cfg(tmp_path))  # the loader is the patched one
    with pytest.raises(SettingError, match=r"^reward\.mode=soft: expected binary or continuous$"):
        build(train_cfg(tmp_path, "reward.mode=soft"))
