"""Confidence intervals: a percentile bootstrap over items, and Student's t over seeds.

Bootstrap: a statistic is a function of item weights `[B, M]` (how often each of M items, e.g.
prompts, is in each of B resamples) returning `[B]` values; the point estimate is the statistic
at weight 1 for every item. Paired differences evaluate two statistics on the same resamples.
Seeds: runs that differ only in their seed are independent draws; their mean gets a t interval.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import stats

Statistic = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its bootstrap interval (NaN where the statistic is undefined)."""

    value: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float | None]:
        return {k: v if math.isfinite(v) else None for k, v in vars(self).items()}


def resample_counts(num_items: int, resamples: int, seed: int) -> np.ndarray:
    """[B, M] multiplicities: row b counts how often each item is drawn in resample b."""
    if num_items < 1 or resamples < 1:
        raise ValueError(f"bootstrap needs items and resamples, got {num_items}, {resamples}")
    draws = np.random.default_rng(seed).integers(0, num_items, size=(resamples, num_items))
    flat = (draws + num_items * np.arange(resamples)[:, None]).ravel()
    return np.bincount(flat, minlength=resamples * num_items).reshape(resamples, num_items)


def percentile_interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    """The central `confidence` share of the finite `values` (NaN, NaN when there are none)."""
    if not 0 < confidence < 1:
        raise ValueError(f"bootstrap confidence must be in (0, 1), got {confidence}")
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return math.nan, math.nan
    tail = (1 - confidence) / 2
    low, high = np.quantile(finite, [tail, 1 - tail])
    return float(low), float(high)


def estimate(statistic: Statistic, counts: np.ndarray, confidence: float) -> Estimate:
    """`statistic` on all items once, with its percentile interval over the resamples `counts`."""
    value = float(statistic(np.ones((1, counts.shape[1])))[0])
    return Estimate(value, *percentile_interval(statistic(counts), confidence))


def difference(a: Statistic, b: Statistic) -> Statistic:
    """The paired statistic a - b (both on the same resamples)."""
    return lambda weights: a(weights) - b(weights)


def ratio_of_sums(numerators, denominators) -> Statistic:
    """sum_i w_i n_i / sum_i w_i d_i per resample (NaN where the denominator is 0): a pooled
    share such as hits over clusters, or a mean when every denominator is 1."""
    num, den = np.asarray(numerators, float), np.asarray(denominators, float)

    def statistic(weights: np.ndarray) -> np.ndarray:
        top, bottom = weights @ num, weights @ den
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(bottom > 0, top / np.where(bottom > 0, bottom, 1), np.nan)

    return statistic


def pooled_auroc(scores, positives, item_of) -> Statistic:
    """AUROC of `scores` against `positives` over the pooled responses of the resampled items.

    Response j belongs to item `item_of[j]` and enters a resample as often as its item. Ties
    count 1/2; NaN when a resample has no positive or no negative.
    """
    scores, positives = np.asarray(scores, float), np.asarray(positives, bool)
    item_of = np.asarray(item_of, int)
    levels, level_of = np.unique(scores, return_inverse=True)
    one_hot = np.zeros((scores.size, levels.size))
    one_hot[np.arange(scores.size), level_of] = 1.0

    def statistic(weights: np.ndarray) -> np.ndarray:
        w = weights[:, item_of]
        pos = (w * positives) @ one_hot  # [B, levels]: positive weight at each score level
        neg = (w * ~positives) @ one_hot
        below = np.cumsum(neg, axis=1) - neg
        wins = (pos * (below + 0.5 * neg)).sum(1)
        pairs = pos.sum(1) * neg.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(pairs > 0, wins / np.where(pairs > 0, pairs, 1), np.nan)

    return statistic


def restricted(statistic: Statistic, mask) -> Statistic:
    """`statistic` over the items where `mask` holds (the others weigh 0)."""
    keep = np.asarray(mask, float)
    return lambda weights: statistic(weights * keep)


def t_quantile(p: float, df: int) -> float:
    """The p-quantile (p in (0.5, 1)) of Student's t with `df` degrees of freedom."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    return float(stats.t.ppf(p, df))


def seed_interval(values, confidence: float = 0.95) -> Estimate:
    """Mean over seeds with its t interval: mean +- t * sd / sqrt(n) (sd with n - 1); one
    value gets no interval (NaN bounds)."""
    x = np.asarray(values, float)
    if x.size == 0:
        raise ValueError("seed_interval needs at least one value")
    mean = float(x.mean())
    if x.size == 1:
        return Estimate(mean, math.nan, math.nan)
    half = t_quantile((1 + confidence) / 2, x.size - 1) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return Estimate(mean, mean - half, mean + half)
