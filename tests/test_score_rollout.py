"""`score_rollout`: every group of a rollout through the reward, the label only where the reward
needs it, the rewards prompt-major in float32, the scorer's token counts, and the kept keys and
values freed."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import covo.rewards.scoring
from covo.rewards.base import GroupReward, Withheld
from covo.rewards.scoring import score_rollout


class CountingScorer:
    """Stands in for the prefix-shared scorer: fixed token counts, the model it was given."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.tokens_processed, self.floor_tokens, self.reused_tokens = 7, 3, 2


class FakeRollout:
    """Two prompts' groups; records what `groups` was asked for."""

    def __init__(self):
        self.context_caches = ["kept keys and values"]
        self.asked = None

    def groups(self, truths, step, rank):
        self.asked = (truths, step, rank)
        return [SimpleNamespace(index=i, truth=t) for i, t in enumerate(truths)]


class Rewarding:
    """Rewards a group's response j with index * 10 + j (three responses), keeping the groups
    and scorers it was given."""

    def __init__(self, needs_labels: bool):
        self.needs_labels = needs_labels
        self.seen = []

    def __call__(self, group, scorer):
        self.seen.append((group, scorer))
        rewards = [group.index * 10.0 + j + 0.5 for j in range(3)]
        return GroupReward(rewards=rewards, answers=[None] * 3, clusters=[-1] * 3, scores=rewards)


@pytest.mark.parametrize("needs_labels", [True, False])
def test_score_rollout(monkeypatch, needs_labels):
    monkeypatch.setattr(covo.rewards.scoring, "PrefixSharedScorer", CountingScorer)
    reward, rollout, model, tokenizer = Rewarding(needs_labels), FakeRollout(), object(), object()
    scored = score_rollout(reward, model, tokenizer, rollout, ["4", None], step=5, rank=1)
    truths = ["4", None] if needs_labels else [Withheld("Rewarding")] * 2
    assert rollout.asked == (truths, 5, 1)
    assert [group.truth for group, _ in reward.seen] == truths
    (scorer,) = {id(s): s for _, s in reward.seen}.values()  # one scorer for the rollout
    assert scorer.model is model and scorer.tokenizer is tokenizer
    assert scored.rewards.dtype == torch.float32
    assert scored.rewards.tolist() == [0.5, 1.5, 2.5, 10.5, 11.5, 12.5]
    assert [r.rewards for r in scored.results] == [[0.5, 1.5, 2.5], [10.5, 11.5, 12.5]]
    assert scored.labels == ["4", None]
    assert scored.counts == {
        "perf/scoring_tokens": 7.0,
        "perf/scoring_floor_tokens": 3.0,
        "perf/scoring_reused_tokens": 2.0,
    }
    assert rollout.context_caches is None


def test_the_rewards_are_float32_whatever_the_default_dtype(monkeypatch):
    monkeypatch.setattr(covo.rewards.scoring, "PrefixSharedScorer", CountingScorer)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        scored = score_rollout(Rewarding(False), None, None, FakeRollout(), [None] * 2, 0, 0)
    finally:
        torch.set_default_dtype(previous)
    assert scored.rewards.dtype == torch.float32
