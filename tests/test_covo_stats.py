from __future__ import annotations

import math

import pytest
import torch

from covo.rewards.covo.stats import (
    AGGREGATIONS,
    CURIOSITY_FORMS,
    aggregate_consistency,
    aggregate_linear,
    aggregate_vector,
    aggregate_volatility,
    consistency,
    curiosity_paper,
    curiosity_released,
    distance_ratios,
    released_bonus,
    volatility,
)

torch.set_num_threads(1)


def test_distance_ratios_against_the_nearest_other_answer():
    D = torch.tensor(
        [
            [3.0, 1.5, 6.0],  # own 1.5 / min(3, 6) = 0.5
            [2.0, 4.0, 8.0],  # 4 / 2 = 2
            [2.0, 2.0, 5.0],  # tie with answer 0 -> exactly 1
            [0.0, 0.0, 0.0],  # all zero: a tie, not 0/0
        ]
    )
    assert distance_ratios(D, own=1).tolist() == [0.5, 2.0, 1.0, 1.0]


def test_distance_ratio_with_zero_other_distance_deviates():
    assert distance_ratios(torch.tensor([[1.0, 0.0]]), own=0).item() == math.inf


def test_consistency_ties_knob():
    r = torch.tensor([0.5, 1.0, 2.0, 0.9])
    assert consistency(r) == pytest.approx(2 / 4)  # 0.5, 0.9 < 1
    assert consistency(r, ties_consistent=True) == pytest.approx(3 / 4)  # + the tie 1.0


def test_volatility_index_knob():
    r = torch.tensor([2.0, 0.5, 1.5, 0.5, 1.0])  # last r > 1 at m = 2 (the tie at 4 is not > 1)
    assert volatility(r) == pytest.approx(3 / 5)  # (m + 1) / T
    assert volatility(r, "paper") == pytest.approx(2 / 5)  # m / T


def test_no_deviation_gives_zero_volatility():
    r = torch.tensor([0.3, 1.0, 0.7])
    assert volatility(r) == 0.0
    assert volatility(r, "paper") == 0.0


def test_last_state_deviation():
    r = torch.tensor([0.5, 0.5, 0.5, 1.2])  # m = T - 1 = 3
    assert volatility(r) == 1.0  # 4 / 4
    assert volatility(r, "paper") == pytest.approx(3 / 4)
    assert consistency(r) == pytest.approx(3 / 4)


def test_single_state_trajectory():
    assert consistency(torch.tensor([0.8])) == 1.0
    assert volatility(torch.tensor([0.8])) == 0.0
    assert consistency(torch.tensor([1.0])) == 0.0
    assert consistency(torch.tensor([1.0]), ties_consistent=True) == 1.0
    assert volatility(torch.tensor([1.3])) == 1.0  # (0 + 1) / 1
    assert volatility(torch.tensor([1.3]), "paper") == 0.0  # 0 / 1


def test_aggregations_on_hand_numbers():
    cons, vols = [1.0, 0.5], [0.0, 1.0]
    assert aggregate_linear(cons, vols) == pytest.approx(0.75 - 0.5)
    assert aggregate_consistency(cons, vols) == pytest.approx(0.75)
    assert aggregate_volatility(cons, vols) == pytest.approx(0.5)  # mean(1, 0)
    # x = (1 * cos 0 + 0.5 * cos 1) / 2 = 0.635076, y = (0 + 0.5 * sin 1) / 2 = 0.210368
    # |(x, y)| = sqrt(0.403321 + 0.044255) = 0.669011
    assert aggregate_vector(cons, vols) == pytest.approx(0.669011, abs=1e-6)
    assert set(AGGREGATIONS) == {"linear", "vector", "consistency", "volatility"}


def test_vector_aggregation_equals_mean_con_when_all_volatilities_agree():
    # all vectors point the same way: the mean's length is the mean of the lengths
    assert aggregate_vector([0.2, 0.6], [0.4, 0.4]) == pytest.approx(0.4)


def test_vector_aggregation_bounds_on_random_inputs():
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        g = int(torch.randint(1, 9, (1,), generator=gen))
        cons = torch.rand(g, generator=gen).tolist()
        vols = torch.rand(g, generator=gen).tolist()
        mean_con = sum(cons) / g
        riv = aggregate_vector(cons, vols)
        assert math.cos(0.5) * mean_con - 1e-12 <= riv <= mean_con + 1e-12


def test_vector_lower_bound_is_cos_half_and_reached():
    # Con 1, Vol split between 0 and 1: |((1 + cos 1) / 2, sin 1 / 2)| = cos(0.5) = 0.877583,
    # so the tight bound is cos(0.5) (the spec's rounded 0.878 is slightly above it).
    assert aggregate_vector([1.0, 1.0], [0.0, 1.0]) == pytest.approx(math.cos(0.5))


def test_curiosity_paper_on_hand_numbers():
    # step [1, 1]: P uniform, KL 0 -> c = 1
    # step [3, 1]: P = (0.75, 0.25), KL = 0.75 ln 0.75 + 0.25 ln 0.25 + ln 2 = 0.130812,
    #   c = 2 - ln(1.130812) = 1.877064
    steps = [torch.tensor([1.0, 1.0]), torch.tensor([3.0, 1.0])]
    assert curiosity_paper(steps) == pytest.approx((1 + 1.877064) / 2, abs=1e-6)


def test_curiosity_paper_zero_nlls_and_single_tokens():
    # [0, 0, 2]: P = (0, 0, 1), KL = 0 log 0 + 0 + 1 ln 1 + ln 3 = 1.098612,
    #   c = 2/3 - ln(2.098612) = -0.074610
    assert curiosity_paper([torch.tensor([0.0, 0.0, 2.0])]) == pytest.approx(-0.074610, abs=1e-6)
    assert curiosity_paper([torch.tensor([2.0])]) == pytest.approx(2.0)  # single token: KL 0
    assert curiosity_paper([torch.tensor([0.0, 0.0])]) == 0.0  # all certain: P = U, KL 0


def test_curiosity_of_a_confident_step():
    # [0.6, 0.2] sums to less than 1 and still has P = (0.75, 0.25), KL 0.130812:
    #   paper c = 0.4 - ln(1.130812) = 0.277064; released e^0.4 - ln(0.130812^(1/3) + 1) = 1.081284
    step = [torch.tensor([0.6, 0.2])]
    assert curiosity_paper(step) == pytest.approx(0.277064, abs=1e-6)
    assert curiosity_released(step) == pytest.approx(1.081284, abs=1e-6)


def test_curiosity_released_on_hand_numbers():
    # [1, 1]: e^1 - ln(0 + 1) = 2.718282
    # [3, 1]: e^2 - ln(0.130812^(1/3) + 1) = 7.389056 - ln(1.507617) = 6.978516
    steps = [torch.tensor([1.0, 1.0]), torch.tensor([3.0, 1.0])]
    assert curiosity_released(steps) == pytest.approx((2.718282 + 6.978516) / 2, abs=1e-6)
    # [0, 0, 2]: e^(2/3) - ln(ln(3)^(1/3) + 1) = 1.947734 - 0.708945 = 1.238789
    assert curiosity_released([torch.tensor([0.0, 0.0, 2.0])]) == pytest.approx(1.238789, abs=1e-6)
    assert curiosity_released([torch.tensor([0.5])]) == pytest.approx(math.exp(0.5))


def test_curiosity_forms_and_released_bonus():
    assert released_bonus(2.01) == 0.4
    assert released_bonus(2.0) == 0.0
    steps = [torch.tensor([3.0, 1.0])]
    released = CURIOSITY_FORMS["released"]
    assert released.bonus(released.value(steps)) == 0.4  # 6.98 > 2
    paper = CURIOSITY_FORMS["paper"]
    assert paper.bonus(paper.value(steps)) == pytest.approx(1.877064, abs=1e-6)
