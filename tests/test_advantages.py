from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from covo.algorithms.advantages import (
    filter_groups,
    grpo,
    masked_whiten,
    reinforce_pp,
    reinforce_returns,
    rloo,
)
from covo.algorithms.losses import KL_ESTIMATORS

torch.set_num_threads(1)

ALGORITHM_DIR = Path(__file__).parents[1] / "conf" / "algorithm"

# Two responses of 3 and 2 tokens; the KL value on the padding slot must never count.
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
REWARDS = torch.tensor([1.0, -1.0])
TOKEN_KL = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0]])


@pytest.mark.parametrize(
    ("gamma", "expected"),
    [
        # token rewards with kl_coef 0.5: row 0 [-0.05, -0.1, -0.15 + 1] = [-0.05, -0.1, 0.85],
        # row 1 [-0.2, -0.25 - 1, pad] = [-0.2, -1.25, 0].
        # gamma 1: row 0 [-0.05 + 0.75, -0.1 + 0.85, 0.85]; row 1 [-0.2 - 1.25, -1.25, 0].
        (1.0, [[0.70, 0.75, 0.85], [-1.45, -1.25, 0.0]]),
        # gamma 0.5: row 0 [-0.05 + 0.5 * 0.325, -0.1 + 0.5 * 0.85, 0.85];
        # row 1 [-0.2 + 0.5 * -1.25, -1.25, 0].
        (0.5, [[0.1125, 0.325, 0.85], [-0.825, -1.25, 0.0]]),
    ],
)
def test_reinforce_returns_with_kl_and_discount(gamma, expected):
    returns = reinforce_returns(REWARDS, MASK, token_kl=TOKEN_KL, kl_coef=0.5, gamma=gamma)
    torch.testing.assert_close(returns, torch.tensor(expected))


def test_reinforce_returns_put_reward_on_last_real_token_under_left_padding():
    returns = reinforce_returns(torch.tensor([2.0]), torch.tensor([[0.0, 1.0, 1.0]]))
    torch.testing.assert_close(returns, torch.tensor([[0.0, 2.0, 2.0]]))


def test_reinforce_pp_whitens_the_returns():
    advantages = reinforce_pp(REWARDS, MASK, 2, token_kl=TOKEN_KL, kl_coef=0.5, gamma=1.0)
    # masked returns 0.70, 0.75, 0.85, -1.45, -1.25: mean -0.08
    mean = (0.70 + 0.75 + 0.85 - 1.45 - 1.25) / 5
    std = (sum((x - mean) ** 2 for x in [0.70, 0.75, 0.85, -1.45, -1.25]) / 5) ** 0.5
    expected = (torch.tensor([[0.70, 0.75, 0.85], [-1.45, -1.25, mean]]) - mean) / std
    torch.testing.assert_close(advantages, expected)


def test_masked_whiten_hand_values():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]])
    # masked 1..5: mean 3, population var (4 + 1 + 0 + 1 + 4) / 5 = 2
    expected = torch.tensor([[-2.0, -1.0, 0.0], [1.0, 2.0, 0.0]]) / 2**0.5
    whitened = masked_whiten(values, MASK)
    torch.testing.assert_close(whitened, expected)
    real = whitened[MASK.bool()]
    torch.testing.assert_close(real.mean(), torch.tensor(0.0))
    torch.testing.assert_close(real.std(unbiased=False), torch.tensor(1.0))


@pytest.mark.parametrize(
    "all_reduce",
    [lambda t: t.mul_(2), lambda t: t * 2],
    ids=["in_place", "returning"],
)
def test_masked_whiten_two_identical_ranks_match_one(all_reduce):
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]])
    torch.testing.assert_close(masked_whiten(values, MASK, all_reduce), masked_whiten(values, MASK))


def test_masked_whiten_across_ranks_equals_whitening_the_joint_batch():
    values_a = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]])
    values_b = torch.tensor([[10.0, -3.0, 7.0]])
    mask_b = torch.tensor([[1.0, 1.0, 0.0]])
    captured = []
    masked_whiten(values_b, mask_b, lambda t: captured.append(t.clone()))
    on_rank_a = masked_whiten(values_a, MASK, lambda t: t + captured[0])
    joint = masked_whiten(torch.cat([values_a, values_b]), torch.cat([MASK, mask_b]))
    torch.testing.assert_close(on_rank_a, joint[:2])
    assert not torch.allclose(on_rank_a, masked_whiten(values_a, MASK))


def test_grpo_group_normalised_with_unbiased_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    mask = torch.ones(8, 2)
    mask[1, 1] = 0.0
    advantages = grpo(rewards, mask, 4)
    # group 1: mean 0.5, unbiased var (4 * 0.25) / 3 = 1/3, so +-0.5 / sqrt(1/3) = +-0.866
    # group 2: all equal -> 0 / (0 + eps) = 0, no NaN
    a = 0.5 / (1 / 3) ** 0.5
    expected = torch.tensor([a, -a, -a, a, 0.0, 0.0, 0.0, 0.0])[:, None] * mask
    torch.testing.assert_close(advantages, expected, atol=1e-5, rtol=1e-5)
    assert not advantages.isnan().any()


def test_grpo_without_std_and_with_kl_in_reward():
    token_kl = torch.tensor([[0.5, 0.5], [1.0, 2.0]])
    advantages = grpo(
        torch.tensor([1.0, 0.0]),
        torch.ones(2, 2),
        2,
        scale_by_std=False,
        token_kl=token_kl,
        kl_coef=0.1,
    )
    # penalised rewards [1 - 0.1 * 1, 0 - 0.1 * 3] = [0.9, -0.3], mean 0.3 -> [0.6, -0.6]
    torch.testing.assert_close(advantages, torch.tensor([[0.6, 0.6], [-0.6, -0.6]]))


def test_rloo_leave_one_out():
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    advantages = rloo(torch.tensor([1.0, 0.0, 0.0]), mask, 3)
    # [1 - (0 + 0) / 2, 0 - (1 + 0) / 2, 0 - (1 + 0) / 2]
    torch.testing.assert_close(advantages, torch.tensor([[1.0, 1.0], [-0.5, 0.0], [-0.5, -0.5]]))


def test_rloo_with_kl_in_reward():
    token_kl = torch.tensor([[0.0], [0.0], [10.0]])
    advantages = rloo(
        torch.tensor([1.0, 0.0, 0.0]), torch.ones(3, 1), 3, token_kl=token_kl, kl_coef=0.1
    )
    # penalised [1, 0, -1]: [1 - (0 - 1) / 2, 0 - (1 - 1) / 2, -1 - (1 + 0) / 2]
    torch.testing.assert_close(advantages, torch.tensor([[1.5], [0.0], [-1.5]]))


@pytest.mark.parametrize("estimator", [grpo, rloo])
def test_group_estimators_reject_groups_of_one(estimator):
    with pytest.raises(ValueError, match="group_size"):
        estimator(torch.tensor([1.0, 0.0]), torch.ones(2, 1), 1)


@pytest.mark.parametrize(
    ("drop_all_zero", "drop_all_equal", "expected"),
    [
        # groups: [0, 0] all zero, [1, 1] all equal, [0.5, 0.5] all equal, [0, 1] mixed
        (True, False, [0, 0, 1, 1, 1, 1, 1, 1]),
        (False, True, [0, 0, 0, 0, 0, 0, 1, 1]),
        (False, False, [1, 1, 1, 1, 1, 1, 1, 1]),
    ],
)
def test_filter_groups(drop_all_zero, drop_all_equal, expected):
    rewards = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.5, 0.5, 0.0, 1.0])
    keep = filter_groups(rewards, 2, drop_all_zero, drop_all_equal)
    assert keep.dtype == torch.bool
    assert keep.tolist() == [bool(x) for x in expected]


@pytest.mark.parametrize("path", sorted(ALGORITHM_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_algorithm_configs_instantiate(path):
    cfg = OmegaConf.load(path)
    assert cfg.kl_estimator in KL_ESTIMATORS
    advantage = instantiate(cfg.advantage)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    advantages = advantage(
        rewards,
        torch.ones(4, 3),
        2,
        token_kl=torch.zeros(4, 3),
        kl_coef=cfg.kl_coef,
        all_reduce=None,
    )
    assert advantages.shape == (4, 3)
    # every estimator ranks the rewarded response of each group above its partner
    assert (advantages[0] > advantages[1]).all() and (advantages[3] > advantages[2]).all()
