"""The statistics of a verdict over rewards: intervals that see both seeds and problems,
comparisons corrected for their number, a checkpoint chosen where it is not reported, and
the rank agreement of a premise with an outcome.

- `hierarchical_bootstrap`: a two-stage bootstrap of a mean over seeds x problems: draw seeds
  with replacement, then, within each drawn seed, problems with replacement.
- `holm`: Holm's step-down adjustment of p-values (family-wise error at most alpha).
- `peak_on_validation`: the step a run would be stopped at, chosen on the validation split,
  and its accuracy read on the test split.
- `rank_agreement`: Spearman's rho (average ranks for ties) with a one-sided permutation
  p-value and a bootstrap interval over each outcome's seeds.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
from scipy import stats

from covo.analysis.intervals import Estimate, percentile_interval

EXACT_PERMUTATIONS = 9  # up to 9! = 362880 orders are enumerated; more are sampled


def hierarchical_bootstrap(
    values, confidence: float = 0.95, resamples: int = 4000, seed: int = 0, baseline=None
) -> Estimate:
    """Mean of `values` [S seeds, M problems] with a two-stage percentile interval.

    Each resample draws S seeds with replacement and, within each drawn seed, M problems with
    replacement, and takes the mean. With `baseline` (the same shape: another reward's values
    on the same seeds and problems) the statistic is the paired difference, both rewards
    drawn on the same seeds and problems.
    """
    x = np.asarray(values, float)
    if baseline is not None:
        base = np.asarray(baseline, float)
        if base.shape != x.shape:
            raise ValueError(f"paired values need one shape, got {x.shape} and {base.shape}")
        x = x - base
    if x.ndim != 2 or x.size == 0:
        raise ValueError(f"hierarchical_bootstrap needs [seeds, problems] values, got {x.shape}")
    means = two_stage_means(x, resamples, seed)
    return Estimate(float(x.mean()), *percentile_interval(means, confidence))


def two_stage_means(x: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """[B] means of `x` [S, M] over B two-stage resamples (seeds, then problems in each)."""
    num_seeds, num_problems = x.shape
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, num_seeds, size=(resamples, num_seeds))
    problems = rng.integers(0, num_problems, size=(resamples, num_seeds, num_problems))
    return x[seeds[:, :, None], problems].mean(axis=(1, 2))


def holm(pvalues) -> list[float]:
    """Holm-adjusted p-values, in the order given: the k-th smallest of m is multiplied by
    m - k + 1, kept at least as large as the ones before it and capped at 1."""
    p = np.asarray(pvalues, float)
    order = np.argsort(p, kind="stable")
    scaled = p[order] * (p.size - np.arange(p.size))
    adjusted = np.empty_like(p)
    adjusted[order] = np.minimum(np.maximum.accumulate(scaled), 1.0)
    return adjusted.tolist()


def paired_t_p(differences) -> float:
    """Two-sided p-value of a paired t-test that the mean per-seed difference is 0 (NaN with
    fewer than 2 seeds; 0 or 1 when every difference is equal)."""
    d = np.asarray(differences, float)
    if d.size < 2:
        return math.nan
    if np.all(d == d[0]):
        return 1.0 if d[0] == 0 else 0.0
    return float(stats.ttest_1samp(d, 0.0).pvalue)


def peak_on_validation(validation: dict, test: dict) -> dict:
    """The step with the highest validation sampled accuracy (the first one at the max) and
    the test gain there; each curve `{"steps": [...], "sampled_accuracy": [...]}`, step 0
    first. The test split never takes part in the choice."""
    steps = list(validation["steps"])
    accuracy = list(validation["sampled_accuracy"])
    step = steps[accuracy.index(max(accuracy))]
    at = dict(zip(test["steps"], test["sampled_accuracy"], strict=True))
    if step not in at or 0 not in at:
        raise ValueError(f"the test curve has no evaluation at step {step} (or at step 0)")
    return {"step": step, "gain": at[step] - at[0]}


def spearman(premise, outcome) -> float:
    """Spearman's rho with average ranks for ties (scipy's)."""
    return float(stats.spearmanr(premise, outcome).statistic)


def _pearson_rows(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    xc = x - x.mean()
    rc = rows - rows.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (rc @ xc) / (np.sqrt((rc**2).sum(1)) * math.sqrt((xc**2).sum()))


def permutation_p(premise, outcome, samples: int = 100_000, seed: int = 0) -> float:
    """One-sided p-value of rho >= the observed one when the outcomes' order is unrelated to
    the premise: the share of orderings of the outcomes (all n! up to n = 9, else `samples`
    random ones) whose rho reaches the observed rho; the premise's ties stay tied."""
    x = stats.rankdata(premise)
    y = stats.rankdata(outcome)
    observed = _pearson_rows(x, y[None, :])[0]
    if len(y) <= EXACT_PERMUTATIONS:
        orders = np.array(list(itertools.permutations(range(len(y)))))
    else:
        rng = np.random.default_rng(seed)
        orders = np.argsort(rng.random((samples, len(y))), axis=1)
    rhos = _pearson_rows(x, y[orders])
    return float(np.mean(rhos >= observed - 1e-12))


def rank_agreement(
    premise: dict, per_seed: dict, confidence: float = 0.95, resamples: int = 4000, seed: int = 0
) -> dict:
    """Rho of `premise` (reward -> number) against the mean of `per_seed` (reward -> the
    per-seed outcomes), its permutation p-value, and a percentile interval from resampling
    each reward's seeds (the outcome's noise; the premise is held fixed)."""
    names = [name for name in premise if name in per_seed and len(per_seed[name])]
    if len(names) < 3:
        raise ValueError(f"a rank correlation needs 3 or more rewards, got {names}")
    x = [premise[n] for n in names]
    means = [float(np.mean(per_seed[n])) for n in names]
    rng = np.random.default_rng(seed)
    drawn = np.stack(
        [
            np.asarray(per_seed[n], float)[
                rng.integers(0, len(per_seed[n]), (resamples, len(per_seed[n])))
            ].mean(1)
            for n in names
        ],
        axis=1,
    )
    rhos = _pearson_rows(stats.rankdata(x), stats.rankdata(drawn, axis=1))
    low, high = percentile_interval(rhos, confidence)
    return {
        "rewards": names,
        "rho": spearman(x, means),
        "p": permutation_p(x, means),
        "low": low,
        "high": high,
        "n": len(names),
    }
