"""REINFORCE++ and the group filter at their defaults and edges, with hand-computed numbers:
no KL and gamma 1 unless given, the discount and the cross-rank statistics passed through, and
groups of one response."""

from __future__ import annotations

import math

import torch

from covo.algorithms.advantages import (
    filter_groups,
    grpo,
    masked_whiten,
    reinforce_pp,
    reinforce_returns,
    rloo,
)

torch.set_num_threads(1)

# two responses of 3 and 2 tokens; sequence rewards +1 and -1
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
REWARDS = torch.tensor([1.0, -1.0])
TOKEN_KL = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0]])


def whitened(rows: list[list[float]], mean: float, std: float) -> torch.Tensor:
    return torch.tensor(
        [
            [(x - mean) / std if m else 0.0 for x, m in zip(r, mr)]
            for r, mr in zip(rows, MASK.tolist())
        ]
    )


def test_reinforce_pp_defaults_to_no_kl_and_no_discount():
    # returns [1, 1, 1] and [-1, -1, pad]: mean 0.2, population variance 0.96
    expected = whitened([[1, 1, 1], [-1, -1, 0]], 0.2, math.sqrt(0.96))
    torch.testing.assert_close(reinforce_pp(REWARDS, MASK, 2), expected)
    # a KL tensor without a coefficient changes nothing
    torch.testing.assert_close(reinforce_pp(REWARDS, MASK, 2, token_kl=TOKEN_KL), expected)


def test_reinforce_pp_passes_the_discount_on():
    # gamma 0.5: returns [0.25, 0.5, 1] and [-0.5, -1, pad]: mean 0.05, variance 2.55 / 5
    expected = whitened([[0.25, 0.5, 1], [-0.5, -1, 0]], 0.05, math.sqrt(2.55 / 5))
    torch.testing.assert_close(reinforce_pp(REWARDS, MASK, 2, gamma=0.5), expected)


def test_reinforce_pp_whitens_over_every_rank():
    # another rank holds one response of returns [3, 3, 3]: its sum 9, sum of squares 27,
    # count 3 join this rank's 1, 5, 5: mean 10 / 8, variance 32 / 8 - (10 / 8)^2
    def all_reduce(stats):
        return stats + torch.tensor([9.0, 27.0, 3.0], dtype=stats.dtype)

    mean = 10 / 8
    expected = whitened([[1, 1, 1], [-1, -1, 0]], mean, math.sqrt(32 / 8 - mean**2))
    torch.testing.assert_close(reinforce_pp(REWARDS, MASK, 2, all_reduce=all_reduce), expected)


def test_filter_groups_of_one_response():
    # rollout.num_samples=1: each response is its own group
    keep = filter_groups(torch.tensor([0.0, 1.0, 0.0]), 1, drop_all_zero=True, drop_all_equal=False)
    assert keep.tolist() == [False, True, False]


def test_reinforce_returns_at_kl_coefficient_one_and_without_a_kl_tensor():
    # kl_coef 1: row 0 [-0.1, -0.2, -0.3 + 1] -> returns [0.4, 0.5, 0.7]; row 1
    # [-0.4, -0.5 - 1, pad] -> [-1.9, -1.5, 0]
    returns = reinforce_returns(REWARDS, MASK, token_kl=TOKEN_KL, kl_coef=1.0)
    torch.testing.assert_close(returns, torch.tensor([[0.4, 0.5, 0.7], [-1.9, -1.5, 0.0]]))
    # a coefficient without a KL tensor: the sequence rewards alone
    returns = reinforce_returns(REWARDS, MASK, kl_coef=0.5)
    torch.testing.assert_close(returns, torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, 0.0]]))
    # a KL tensor without a coefficient: no penalty (the default coefficient is 0)
    returns = reinforce_returns(REWARDS, MASK, token_kl=TOKEN_KL)
    torch.testing.assert_close(returns, torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, 0.0]]))


def test_the_values_keep_their_dtype_whatever_the_mask():
    assert reinforce_returns(REWARDS.double(), MASK).dtype == torch.float64
    assert masked_whiten(torch.ones(2, 3, dtype=torch.bfloat16), MASK).dtype == torch.bfloat16


def broadcast(values: list[float]) -> torch.Tensor:
    """Sequence values over MASK's tokens."""
    return torch.tensor(values)[:, None] * MASK


def test_group_baselines_stay_within_their_group():
    # two groups of two, one token each: RLOO's baseline is the other member of the group
    rewards, mask = torch.tensor([1.0, 0.0, 3.0, 1.0]), torch.ones(4, 1)
    torch.testing.assert_close(rloo(rewards, mask, 2), torch.tensor([[1.0], [-1.0], [2.0], [-2.0]]))


def test_grpo_adds_eps_to_the_group_std():
    # group [1, 0]: centred [0.5, -0.5], unbiased std sqrt(0.5); eps 1
    scale = 0.5 / (math.sqrt(0.5) + 1.0)
    torch.testing.assert_close(
        grpo(REWARDS.clamp(min=0), MASK, 2, eps=1.0), broadcast([scale, -scale])
    )


def test_group_advantages_subtract_the_kl_over_real_tokens_only():
    # kl_coef 1: rewards lose the KL summed over real tokens, 0.6 and 0.9 (not the padding's 9):
    # 0.4 and -1.9; RLOO: 0.4 - (-1.9) = 2.3 and its opposite
    advantages = rloo(REWARDS, MASK, 2, token_kl=TOKEN_KL, kl_coef=1.0)
    torch.testing.assert_close(advantages, broadcast([2.3, -2.3]))


def test_group_advantages_ignore_a_kl_tensor_without_a_coefficient_and_vice_versa():
    plain_rloo, plain_grpo = broadcast([2.0, -2.0]), broadcast([1 / (math.sqrt(2) + 1e-6)] * 2)
    plain_grpo[1] *= -1
    for kwargs in ({"token_kl": TOKEN_KL}, {"kl_coef": 0.5}):
        torch.testing.assert_close(rloo(REWARDS, MASK, 2, **kwargs), plain_rloo)
        torch.testing.assert_close(grpo(REWARDS, MASK, 2, **kwargs), plain_grpo)
        # a group of two whitens any penalty away: the mean baseline alone keeps it
        mean_only = grpo(REWARDS, MASK, 2, scale_by_std=False, **kwargs)
        torch.testing.assert_close(mean_only, broadcast([1.0, -1.0]))


def test_whitening_a_single_value_and_a_small_spread():
    torch.testing.assert_close(
        masked_whiten(torch.tensor([[3.0]]), torch.ones(1, 1)), torch.zeros(1, 1)
    )
    # values +-0.5: std 0.5 (below 1), so the whitened values are +-1
    torch.testing.assert_close(
        masked_whiten(torch.tensor([[0.5, -0.5]]), torch.ones(1, 2)), torch.tensor([[1.0, -1.0]])
    )


def test_group_advantages_keep_the_rewards_dtype():
    assert grpo(REWARDS.bfloat16(), MASK, 2).dtype == torch.bfloat16
    assert rloo(REWARDS.bfloat16(), MASK, 2).dtype == torch.bfloat16
