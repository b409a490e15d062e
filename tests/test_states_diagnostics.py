"""Reward by number of states and the verdict shares, as training logs them."""

from __future__ import annotations

import math

import pytest
import torch

from covo.answers import AnswerEquivalence
from covo.metrics.states import (
    bucket_of,
    labelled_counts,
    pool,
    state_counts,
    state_metrics,
    states_table,
)
from covo.metrics.step import reward_metrics
from covo.rewards.base import GroupReward

EQ = AnswerEquivalence()
NAN = math.nan


def batch() -> tuple[list[GroupReward], list[str]]:
    """Two prompts; `num_states` is T of each scored response (NaN: not scored)."""
    results = [
        # {4: 0, 1} correct, passed; {5: 2} wrong, failed; response 3 has no answer
        GroupReward(
            rewards=[1.0, 1.0, 0.0, 0.0],
            answers=["4", "4", "5", None],
            clusters=[0, 0, 1, -1],
            scores=[0.9, 0.9, 0.2, -1.0],
            verdicts=[True, False],
            components={"num_states": [1.0, 3.0, 5.0, NAN]},
        ),
        # {7} wrong, passed; {8} correct, passed
        GroupReward(
            rewards=[0.5, 0.0],
            answers=["7", "8"],
            clusters=[0, 1],
            scores=[0.6, 0.6],
            verdicts=[True, True],
            components={"num_states": [1.0, 2.0]},
        ),
    ]
    return results, ["4", "8"]


def test_buckets_of_states():
    states = (1.0, 2.0, 3.0, 4.0, 15.0)
    assert [bucket_of(t) for t in states] == ["1", "2_3", "2_3", "4plus", "4plus"]
    assert bucket_of(NAN) is None


def test_training_logs_reward_by_states_and_the_verdict_shares():
    results, labels = batch()
    rewards = torch.tensor([r for res in results for r in res.rewards])
    metrics = reward_metrics(results, rewards, labels, EQ)
    # T = 1: rewards 1.0 and 0.5; T = 2-3: 1.0 (T = 3) and 0.0 (T = 2); T >= 4: 0.0
    assert metrics["diag/reward_states_1"] == pytest.approx(0.75)
    assert metrics["diag/reward_states_2_3"] == pytest.approx(0.5)
    assert metrics["diag/reward_states_4plus"] == 0.0
    assert metrics["diag/one_state_share"] == pytest.approx(2 / 5)  # the answerless one is out
    # correct {4}, {8} both passed; wrong {5} rejected, {7} passed
    assert metrics["diag/correct_pass_rate"] == 1.0
    assert metrics["diag/wrong_reject_rate"] == pytest.approx(1 / 2)
    assert metrics["diag/balanced_reward_accuracy"] == pytest.approx(3 / 4)
    # passed {4} (2 members), {7} (1), {8} (1): 2 of 3 correct, 2 of 3 singletons
    assert metrics["diag/pass_precision"] == pytest.approx(2 / 3)
    assert metrics["diag/singleton_pass_share"] == pytest.approx(2 / 3)


def test_rewards_without_states_log_none():
    results, labels = batch()
    for res in results:
        res.components = {}
    assert state_metrics(results) == {}
    rewards = torch.tensor([r for res in results for r in res.rewards])
    assert not any("states" in name for name in reward_metrics(results, rewards, labels, EQ))


def test_counts_and_table_with_correctness():
    results, labels = batch()
    counts = pool([labelled_counts(res, label, EQ) for res, label in zip(results, labels)])
    # [responses, reward sum, correct]: T = 1 "4" (right) and "7" (wrong); T = 2-3 "4", "8"
    assert counts == {"1": [2, 1.5, 1], "2_3": [2, 1.0, 2], "4plus": [1, 0.0, 0]}
    assert state_counts(results[0]) == {"1": [1, 1.0, 0], "2_3": [1, 1.0, 0], "4plus": [1, 0.0, 0]}
    assert states_table(counts, with_correct=True).splitlines() == [
        "| states | responses | share | mean reward | correct |",
        "|---|---:|---:|---:|---:|",
        "| 1 | 2 | 0.400 | 0.7500 | 0.500 |",
        "| 2-3 | 2 | 0.400 | 0.5000 | 1.000 |",
        "| 4+ | 1 | 0.200 | 0.0000 | 0.000 |",
    ]
    empty = {"1": [0, 0.0, 0], "2_3": [1, 0.25, 0], "4plus": [0, 0.0, 0]}
    assert states_table(empty, with_correct=False).splitlines()[2:] == [
        "| 1 | 0 | - | - |",
        "| 2-3 | 1 | 1.000 | 0.2500 |",
        "| 4+ | 0 | - | - |",
    ]
