"""REINFORCE++ and the group filter at their defaults and edges, with hand-computed numbers:
no KL and gamma 1 unless given, the discount and the cross-rank statistics passed through, and
groups of one response."""

from __future__ import annotations

import math

import torch

from covo.algorithms.advantages import filter_groups, masked_whiten, reinforce_pp, reinforce_returns

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


def test_the_values_keep_their_dtype_whatever_the_mask():
    assert reinforce_returns(REWARDS.double(), MASK).dtype == torch.float64
    assert masked_whiten(torch.ones(2, 3, dtype=torch.bfloat16), MASK).dtype == torch.bfloat16
