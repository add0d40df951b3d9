"""95% bootstrap intervals over patients (or images, or groups of them): for a mean, and for the change an
option makes.

A change counts as a gain only when its whole interval lies above 0: with tens of patients, a mean
that moves by 0.005 is usually noise (issue 17: settings chosen on 11 patients did not transfer).
"""

from __future__ import annotations

import numpy as np

RESAMPLES = 10_000
LEVEL = 0.95


def _interval(values: np.ndarray, resamples: int, seed: int, level: float,
              groups: np.ndarray | None = None) -> tuple[float, float]:
    """Percentile interval of the mean; with `groups`, whole groups are drawn (a cluster bootstrap),
    so that cases which are not independent (slices of one patient) are not counted as if they were."""
    rng = np.random.default_rng(seed)
    if groups is None:
        draws = rng.integers(0, len(values), (resamples, len(values)))
        means = values[draws].mean(axis=1)
    else:
        _, codes = np.unique(groups, return_inverse=True)
        sums, counts = np.bincount(codes, weights=values), np.bincount(codes)
        draws = rng.integers(0, len(sums), (resamples, len(sums)))
        means = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def mean_interval(values, *, groups=None, resamples: int = RESAMPLES, seed: int = 0,
                  level: float = LEVEL) -> dict:
    """{mean, low, high, n}: the mean of the finite values and its percentile bootstrap interval, drawn
    by `groups` (one label per value, e.g. blocks of consecutive image indices) when given."""
    values = np.asarray(values, dtype=float)
    finite = np.isfinite(values)
    groups = None if groups is None else np.asarray(groups)[finite]
    values = values[finite]
    if not len(values):
        return {"mean": None, "low": None, "high": None, "n": 0}
    low, high = _interval(values, resamples, seed, level, groups)
    out = {"mean": float(values.mean()), "low": low, "high": high, "n": len(values)}
    return out if groups is None else {**out, "groups": len(np.unique(groups))}


def paired_change(new, base, *, groups=None, resamples: int = RESAMPLES, seed: int = 0,
                  level: float = LEVEL) -> dict:
    """The mean change new - base over the cases both score (paired), its interval (drawn by `groups`
    when given), and a verdict: 'gain' (interval above 0), 'loss' (below 0) or 'no clear change'."""
    new, base = np.asarray(new, dtype=float), np.asarray(base, dtype=float)
    both = np.isfinite(new) & np.isfinite(base)
    groups = None if groups is None else np.asarray(groups)[both]
    change = mean_interval(new[both] - base[both], groups=groups, resamples=resamples, seed=seed, level=level)
    verdict = "no clear change"
    if change["n"] and change["low"] > 0:
        verdict = "gain"
    elif change["n"] and change["high"] < 0:
        verdict = "loss"
    return {**change, "verdict": verdict}
