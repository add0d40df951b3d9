"""Bootstrap intervals over patients: the mean's, and an option's paired change with its verdict."""

from __future__ import annotations

import numpy as np
import pytest

from brainseg.evaluation.bootstrap import mean_interval, paired_change


def test_mean_interval_holds_the_mean_and_narrows_with_more_patients():
    rng = np.random.default_rng(0)
    few, many = rng.normal(0.8, 0.1, 10), rng.normal(0.8, 0.1, 400)
    small, large = mean_interval(few), mean_interval(many)
    assert small["low"] < small["mean"] < small["high"] and small["n"] == 10
    assert large["high"] - large["low"] < (small["high"] - small["low"]) / 3
    assert mean_interval([np.nan, 0.5, 0.7])["n"] == 2
    assert mean_interval([np.nan])["mean"] is None


def test_paired_change_calls_a_gain_only_when_the_interval_is_above_zero():
    rng = np.random.default_rng(1)
    base = rng.uniform(0.5, 0.9, 60)
    assert paired_change(base + 0.02 + rng.normal(0, 0.005, 60), base)["verdict"] == "gain"
    assert paired_change(base - 0.02, base)["verdict"] == "loss"
    noisy = paired_change(base + rng.normal(0, 0.05, 60), base)
    assert noisy["verdict"] == "no clear change" and noisy["low"] < 0 < noisy["high"]
    assert paired_change([np.nan, 0.6], [0.5, 0.5])["mean"] == pytest.approx(0.1)  # pairs with both only


def test_groups_draw_whole_blocks_so_near_copies_do_not_narrow_the_interval():
    rng = np.random.default_rng(1)
    blocks = rng.normal(0.7, 0.1, 12)  # 12 patients
    copied = np.repeat(blocks, 16)  # each seen as 16 near-identical images
    groups = np.repeat(np.arange(12), 16)
    naive, grouped = mean_interval(copied), mean_interval(copied, groups=groups)
    honest = mean_interval(blocks)
    assert grouped["mean"] == pytest.approx(honest["mean"]) and grouped["groups"] == 12
    assert grouped["high"] - grouped["low"] == pytest.approx(honest["high"] - honest["low"], rel=0.05)
    assert naive["high"] - naive["low"] < (grouped["high"] - grouped["low"]) / 3
    # a change seen in only one block is not a gain once blocks are drawn whole
    change = np.where(groups == 0, 0.2, 0.0) + np.tile([1e-3, -1e-3], len(groups) // 2)
    assert paired_change(change, np.zeros_like(change))["verdict"] == "gain"
    assert paired_change(change, np.zeros_like(change), groups=groups)["verdict"] == "no clear change"
