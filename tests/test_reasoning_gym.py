"""`data=reasoning_gym`: seeded procedural problems whose answers the ground-truth reward takes."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import compose_config
from hydra.utils import instantiate

from covo.rewards.base import Group

pytest.importorskip("reasoning_gym", reason="needs the gym extra")

from covo.data.reasoning_gym import datamodule, generate  # noqa: E402


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rg")
    return compose_config("train", ["model=tiny", "data=reasoning_gym", "reward=ground_truth"], tmp)


def group_of(texts: list[str], label: str) -> Group:
    empty = [torch.zeros(1) for _ in texts]
    return Group([0], [[1] for _ in texts], texts, empty, empty, empty, label)


def test_default_tasks_answers_are_accepted_by_the_ground_truth_reward(cfg):
    reward = instantiate(cfg.reward)
    items = generate(list(cfg.data.tasks), 80, seed=3, task_config=cfg.data.task_config)
    for item in items:
        answer = item["answer"]
        wrong = str(int(answer) + 1)  # every default task answers with an integer
        texts = [f"Work.\nSo \\boxed{{{answer}}}", f"So it is {answer}.", f"\\boxed{{{wrong}}}"]
        assert reward(group_of(texts, answer), None).rewards == [1.0, 1.0, 0.0], item


def test_items_are_seeded_and_shared_out_over_the_tasks():
    tasks = ["chain_sum", "simple_equations", "basic_arithmetic", "leg_counting"]
    items = generate(tasks, 10, seed=1)
    assert items == generate(tasks, 10, seed=1)
    assert items != generate(tasks, 10, seed=2)
    # 10 = 3 + 3 + 2 + 2, task by task, each task seeded on its own
    for task, (a, b) in zip(tasks, [(0, 3), (3, 6), (6, 8), (8, 10)]):
        assert items[a:b] == generate([task], b - a, seed=1), task
    assert all(i["problem"].startswith("State the final answer") for i in items[:3])
    assert generate(tasks, 10, seed=1, split="val") != items


def test_data_module_from_the_config(cfg):
    dm = instantiate(cfg.data)
    assert len(dm.train_items) == cfg.data.size == 2000
    assert 0 < len(dm.val_items) <= cfg.data.val_size
    train = {item["problem"] for item in dm.train_items}
    assert not train & {item["problem"] for item in dm.val_items}
    assert dm.train_items[0]["prompt"].startswith("Question: Calculate ")
    dm.setup("fit")  # no benchmark item among them


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tasks": ["no_such_task"]}, "unknown reasoning-gym task 'no_such_task'"),
        ({"tasks": []}, "data.tasks is empty"),
        ({"tasks": ["chain_sum"], "task_config": {"chain_sum": {"digits": 2}}}, "chain_sum"),
        ({"tasks": ["chain_sum", "gcd"], "val_size": 1}, "data.val_size=1"),
    ],
)
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        datamodule(**{"size": 4, **kwargs})


def test_gsm_symbolic_is_flagged_as_gsm8k_in_other_words(caplog):
    with caplog.at_level(logging.WARNING):
        generate(["gsm_symbolic", "chain_sum"], 4, seed=0)
    assert "gsm_symbolic rewrites GSM8K test questions" in caplog.text
