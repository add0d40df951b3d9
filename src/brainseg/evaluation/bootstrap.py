"""95% bootstrap intervals over patients (or images): for a mean, and for the change an option makes.

A change counts as a gain only when its whole interval lies above 0: with tens of patients, a mean
that moves by 0.005 is usually noise (issue 17: settings chosen on 11 patients did not transfer).
"""

from __future__ import annotations

import numpy as np

RESAMPLES = 10_000
LEVEL = 0.95


def _interval(values: np.ndarray, resamples: int, seed: int, level: float) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(values), (resamples, len(values)))
    means = values[draws].mean(axis=1)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def mean_interval(values, *, resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> dict:
    """{mean, low, high, n}: the mean of the finite values and its percentile bootstrap interval."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if not len(values):
        return {"mean": None, "low": None, "high": None, "n": 0}
    low, high = _interval(values, resamples, seed, level)
    return {"mean": float(values.mean()), "low": low, "high": high, "n": len(values)}


def paired_change(new, base, *, resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> dict:
    """The mean change new - base over the cases both score (paired), its interval, and a verdict:
    'gain' (interval above 0), 'loss' (below 0) or 'no clear change'."""
    new, base = np.asarray(new, dtype=float), np.asarray(base, dtype=float)
    both = np.isfinite(new) & np.isfinite(base)
    change = mean_interval(new[both] - base[both], resamples=resamples, seed=seed, level=level)
    verdict = "no clear change"
    if change["n"] and change["low"] > 0:
        verdict = "gain"
    elif change["n"] and change["high"] < 0:
        verdict = "loss"
    return {**change, "verdict": verdict}
