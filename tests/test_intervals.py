"""Bootstrap and seed intervals against answers known without the code under test."""

from __future__ import annotations

import math

import numpy as np
import pytest

from covo.analysis.intervals import (
    difference,
    estimate,
    percentile_interval,
    pooled_auroc,
    ratio_of_sums,
    resample_counts,
    restricted,
    seed_interval,
    t_quantile,
)
from covo.metrics.diagnostics import auroc


def test_resample_counts_draw_m_items_per_row_reproducibly():
    counts = resample_counts(7, 50, seed=3)
    assert counts.shape == (50, 7)
    assert (counts.sum(1) == 7).all()
    assert (counts == resample_counts(7, 50, seed=3)).all()
    assert not (counts == resample_counts(7, 50, seed=4)).all()


def test_bootstrap_interval_of_a_share_matches_the_normal_approximation():
    # 120 of 400 items hit: the share's standard error is sqrt(0.3 * 0.7 / 400) = 0.02291, so
    # the 95% interval is about 0.3 -+ 1.96 * 0.02291 = [0.2551, 0.3449].
    hits = np.array([1.0] * 120 + [0.0] * 280)
    e = estimate(ratio_of_sums(hits, np.ones(400)), resample_counts(400, 4000, 0), 0.95)
    assert e.value == pytest.approx(0.3)
    assert e.low == pytest.approx(0.2551, abs=0.006)
    assert e.high == pytest.approx(0.3449, abs=0.006)


def test_bootstrap_intervals_cover_the_true_share_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    covered = 0
    for trial in range(200):
        hits = (rng.random(100) < 0.3).astype(float)
        e = estimate(ratio_of_sums(hits, np.ones(100)), resample_counts(100, 1000, trial), 0.95)
        covered += e.low <= 0.3 <= e.high
    assert 0.90 <= covered / 200 <= 0.99


def test_pooled_share_weighs_items_by_their_denominators():
    # item 0: 2 of 2 clusters right, item 1: 1 of 3; pooled (2 + 1) / (2 + 3) = 0.6
    statistic = ratio_of_sums([2, 1, 0], [2, 3, 0])
    assert statistic(np.ones((1, 3)))[0] == pytest.approx(0.6)
    # a resample holding item 1 twice and item 2 once: 2 / 6; only item 2: undefined
    assert statistic(np.array([[0, 2, 1]]))[0] == pytest.approx(1 / 3)
    assert math.isnan(statistic(np.array([[0, 0, 3]]))[0])


def test_pooled_auroc_equals_the_rank_auroc_of_the_repeated_responses():
    scores = [[0.5, 0.5, 0.25, 0.0], [0.5, 0.5, 0.25, 0.25], [1.0, 1.0]]
    positives = [[True, True, False, False], [False, False, True, False], [True, True]]
    item_of = [i for i, s in enumerate(scores) for _ in s]
    statistic = pooled_auroc(sum(scores, []), sum(positives, []), item_of)
    assert statistic(np.ones((1, 3)))[0] == pytest.approx(
        auroc(sum(scores, []), sum(positives, []))
    )
    weights = np.array([[2, 0, 1], [0, 3, 0], [1, 1, 1]])
    for row, value in zip(weights, statistic(weights)):
        repeated = [(s, p) for i, n in enumerate(row) for _ in range(n) for s, p in
                    zip(scores[i], positives[i])]  # fmt: skip
        if len({p for _, p in repeated}) < 2:
            assert math.isnan(value)
        else:
            assert value == pytest.approx(auroc(*zip(*repeated)))


def test_paired_difference_of_a_constant_shift_has_no_width():
    a = np.array([0.2, 0.9, 0.4, 0.7, 0.1])
    counts = resample_counts(5, 500, 1)
    ones = np.ones(5)
    paired = estimate(difference(ratio_of_sums(a + 0.1, ones), ratio_of_sums(a, ones)), counts, 0.9)
    assert (paired.value, paired.low, paired.high) == pytest.approx((0.1, 0.1, 0.1))
    unpaired = estimate(ratio_of_sums(a, ones), counts, 0.9)
    assert unpaired.high - unpaired.low > 0.2


def test_restricted_statistic_is_the_statistic_of_the_kept_items():
    statistic = restricted(ratio_of_sums([1, 0, 1, 1], [1, 1, 1, 1]), [True, True, False, False])
    assert statistic(np.ones((1, 4)))[0] == pytest.approx(0.5)
    assert statistic(np.array([[3, 1, 5, 5]]))[0] == pytest.approx(0.75)


def test_percentile_interval_skips_undefined_resamples():
    values = np.array([np.nan, *range(101)], float)
    assert percentile_interval(values, 0.9) == pytest.approx((5.0, 95.0))
    assert all(math.isnan(v) for v in percentile_interval(np.array([np.nan]), 0.9))
    with pytest.raises(ValueError, match="confidence"):
        percentile_interval(values, 95)


@pytest.mark.parametrize(
    "df,quantile", [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (30, 2.042)]
)
def test_t_quantiles_match_the_tables(df, quantile):
    assert t_quantile(0.975, df) == pytest.approx(quantile, abs=1e-3)


def test_seed_interval_is_mean_plus_minus_t_times_standard_error():
    # mean 0.4, sd 0.2, se 0.2 / sqrt(3) = 0.11547, t(0.975, 2) = 4.3027: half-width 0.49683
    e = seed_interval([0.2, 0.4, 0.6])
    assert (e.value, e.low, e.high) == pytest.approx((0.4, -0.09683, 0.89683), abs=1e-4)
    single = seed_interval([0.7])
    assert single.value == 0.7 and math.isnan(single.low) and math.isnan(single.high)
