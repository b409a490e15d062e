"""The verdict's statistics against hand computations and independent implementations."""

import numpy as np
import pytest
from scipy import stats

from covo.analysis.verdict_stats import (
    hierarchical_bootstrap,
    holm,
    paired_t_p,
    peak_on_validation,
    permutation_p,
    rank_agreement,
    two_stage_means,
)


def test_holm_matches_hand_computation():
    # sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> kept at 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # capped at 1, and a larger p never gets a smaller adjusted p than a smaller one
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])
    assert holm([0.2, 0.01, 0.02]) == pytest.approx([0.2, 0.03, 0.04])


def test_paired_t_p_is_the_two_sided_t_test_by_hand():
    d = [0.5, 0.375, 0.25]  # mean 0.375, sd 0.125
    t = 0.375 / (0.125 / np.sqrt(3))
    assert paired_t_p(d) == pytest.approx(2 * stats.t.sf(t, 2))
    assert paired_t_p([0.1]) != paired_t_p([0.1])  # NaN with one seed


def test_two_stage_bootstrap_variance_matches_the_analytic_one():
    # Var(T) = [ mean_s (xbar_s - xbar)^2 + mean_s sigma_s^2 / M ] / S, sigma_s^2 with 1/M
    x = np.array(
        [[0.0, 0.5, 1.0, 0.5, 0.0, 1.0], [1.0, 1.0, 0.5, 1.0, 1.0, 0.5],
         [0.0, 0.0, 0.0, 0.5, 0.0, 0.0], [0.5, 1.0, 0.0, 0.5, 1.0, 0.5]]
    )  # fmt: skip
    num_seeds, num_problems = x.shape
    between = ((x.mean(1) - x.mean()) ** 2).mean()
    within = x.var(axis=1).mean() / num_problems
    analytic = (between + within) / num_seeds
    means = two_stage_means(x, 40_000, seed=1)
    assert means.mean() == pytest.approx(x.mean(), abs=0.005)
    assert means.var() == pytest.approx(analytic, rel=0.03)
    # a bootstrap over problems alone (seeds kept) would miss the seeds' part of it
    assert between / num_seeds > 0.5 * analytic


def test_two_stage_bootstrap_sees_seeds_when_problems_agree():
    # within a seed every problem is alike; seeds differ: means of 2 seeds drawn from {0, 1}
    # are 0, 0.5, 1 with chances 1/4, 1/2, 1/4: the 95% interval is [0, 1]
    x = [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]
    e = hierarchical_bootstrap(x, resamples=4000)
    assert (e.value, e.low, e.high) == (0.5, 0.0, 1.0)


def test_paired_two_stage_bootstrap_removes_what_both_share():
    seed_effect = np.array([[0.0] * 4, [0.5] * 4, [1.0] * 4])
    mine = seed_effect + 0.25
    e = hierarchical_bootstrap(mine, baseline=seed_effect)
    assert (e.value, e.low, e.high) == pytest.approx((0.25, 0.25, 0.25))
    with pytest.raises(ValueError, match="one shape"):
        hierarchical_bootstrap(mine, baseline=seed_effect[:2])


def test_peak_is_chosen_on_validation_and_read_on_test():
    validation = {"steps": [0, 10, 20, 30], "sampled_accuracy": [0.40, 0.45, 0.50, 0.47]}
    test = {"steps": [0, 10, 20, 30], "sampled_accuracy": [0.41, 0.44, 0.43, 0.49]}
    # validation peaks at step 20; the test's own max (step 30, +0.08) plays no part
    assert peak_on_validation(validation, test) == {"step": 20, "gain": pytest.approx(0.02)}
    tied = {"steps": [0, 10, 20], "sampled_accuracy": [0.40, 0.45, 0.45]}
    flat = {"steps": [0, 10, 20], "sampled_accuracy": [0.40, 0.30, 0.50]}
    assert peak_on_validation(tied, flat) == {"step": 10, "gain": pytest.approx(-0.10)}
    with pytest.raises(ValueError, match="step 10"):
        peak_on_validation(tied, {"steps": [0, 20], "sampled_accuracy": [0.4, 0.5]})


def test_permutation_p_hand_enumerated_for_four_rewards_with_a_tied_premise():
    # ranks: premise [3.5, 3.5, 2, 1], outcome [4, 2, 3, 1]; rho = 3 / sqrt(4.5 * 5) = 0.632;
    # of the 24 orders of the outcome, 6 reach it (3 placements of the last two x 2 orders of
    # the tied pair): p = 6 / 24
    premise, outcome = [0.9, 0.9, 0.6, 0.5], [0.3, 0.1, 0.2, -0.1]
    assert permutation_p(premise, outcome) == pytest.approx(6 / 24)
    # the same order as the premise: only the 2 orders of the tied pair reach rho
    assert permutation_p(premise, [4, 3, 2, 1]) == pytest.approx(2 / 24)
    assert permutation_p([4, 3, 2, 1], [4, 3, 2, 1]) == pytest.approx(1 / 24)


def test_permutation_p_matches_scipy_permutation_test():
    premise = [0.94, 0.91, 0.91, 0.75, 0.57, 0.57, 0.56]
    outcome = [0.15, 0.13, 0.11, 0.02, -0.02, -0.04, -0.02]
    ref = stats.permutation_test(
        (outcome,),  # the outcomes permuted against the premise held fixed
        lambda y: stats.spearmanr(premise, y).statistic,
        permutation_type="pairings",
        vectorized=False,
        alternative="greater",
        n_resamples=np.inf,
    )
    assert permutation_p(premise, outcome) == pytest.approx(ref.pvalue, abs=1e-9)


def test_rank_agreement_rho_and_an_interval_that_only_outcome_noise_widens():
    premise = {"a": 0.9, "b": 0.9, "c": 0.6, "d": 0.5}
    still = {"a": [0.3, 0.3], "b": [0.1, 0.1], "c": [0.2, 0.2], "d": [-0.1, -0.1]}
    out = rank_agreement(premise, still)
    assert out["rho"] == pytest.approx(3 / np.sqrt(22.5))
    assert stats.spearmanr([0.9, 0.9, 0.6, 0.5], [0.3, 0.1, 0.2, -0.1]).statistic == pytest.approx(
        out["rho"]
    )
    assert (out["low"], out["high"]) == pytest.approx((out["rho"], out["rho"]))
    assert out["p"] == pytest.approx(0.25)
    # seeds that disagree on the order of c and d: some resamples swap them
    noisy = still | {"c": [0.2, -0.3], "d": [-0.1, -0.1]}
    wide = rank_agreement(premise, noisy)
    assert wide["low"] < wide["high"]
    with pytest.raises(ValueError, match="3 or more"):
        rank_agreement({"a": 1.0, "b": 0.5}, still)


def test_permutation_p_samples_beyond_nine_rewards():
    premise = [0.9, 0.8, 0.8, 0.7, 0.6, 0.5, 0.5, 0.4, 0.3, 0.2]
    outcome = [0.2, 0.3, 0.1, 0.15, 0.0, 0.05, -0.1, 0.02, -0.05, -0.02]
    ref = stats.permutation_test(
        (outcome,),  # the outcomes permuted against the premise held fixed
        lambda y: stats.spearmanr(premise, y).statistic,
        permutation_type="pairings",
        vectorized=False,
        alternative="greater",
        n_resamples=5_000,
        random_state=0,
    )
    assert permutation_p(premise, outcome, samples=50_000) == pytest.approx(ref.pvalue, abs=0.01)
