"""Metrics on hand-made cases (empty truth/prediction conventions, HD95 of offset squares) and losses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from brainseg.errors import BrainsegError
from brainseg.losses import LOSS_NAMES, UnknownLossError, create_loss
from brainseg.metrics import (
    Counts,
    accuracy,
    batch_scores,
    count,
    count_per_item,
    detection,
    dice,
    hd95,
    iou,
    precision,
    recall,
    specificity,
)


def square(shape=(32, 32), top=8, left=8, side=10) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[top:top + side, left:left + side] = True
    return mask


# --- counts and reductions -------------------------------------------------------------------------


def test_counts_and_scores_on_a_hand_made_case():
    pred = np.array([[1, 1, 0, 0], [1, 0, 0, 0]])
    truth = np.array([[1, 0, 0, 0], [1, 1, 1, 0]])
    c = count(pred, truth)
    assert c == Counts(tp=2, fp=1, fn=2, tn=3)
    assert dice(c) == pytest.approx(4 / 7)
    assert iou(c) == pytest.approx(2 / 5)
    assert precision(c) == pytest.approx(2 / 3)
    assert recall(c) == pytest.approx(2 / 4)
    assert specificity(c) == pytest.approx(3 / 4)
    assert accuracy(c) == pytest.approx(5 / 8)
    assert count(torch.from_numpy(pred), torch.from_numpy(truth).bool()) == c  # torch and mixed dtypes


def test_empty_cases_follow_the_nan_convention():
    empty, lesion = np.zeros((4, 4), bool), square((4, 4), 1, 1, 2)
    both = count(empty, empty)
    assert both == Counts(0, 0, 0, 16)
    assert math.isnan(dice(both)) and math.isnan(iou(both))
    assert math.isnan(precision(both)) and math.isnan(recall(both))
    assert accuracy(both) == 1.0

    missed = count(empty, lesion)  # truth present, nothing predicted
    assert dice(missed) == 0.0 and iou(missed) == 0.0 and recall(missed) == 0.0
    assert math.isnan(precision(missed))

    false_alarm = count(lesion, empty)  # nothing there, something predicted
    assert dice(false_alarm) == 0.0 and precision(false_alarm) == 0.0
    assert math.isnan(recall(false_alarm))


def test_count_per_item_equals_a_loop_and_reductions_vectorise():
    rng = np.random.default_rng(0)
    pred = rng.random((6, 1, 9, 7)) > 0.6
    truth = rng.random((6, 1, 9, 7)) > 0.7
    truth[2] = pred[2] = False  # an all-empty item
    batched = count_per_item(pred, truth)
    for i in range(6):
        item = Counts(*(int(getattr(batched, f)[i]) for f in ("tp", "fp", "fn", "tn")))
        assert item == count(pred[i], truth[i])
    torch_batched = count_per_item(torch.from_numpy(pred), torch.from_numpy(truth).float())
    for field in ("tp", "fp", "fn", "tn"):
        np.testing.assert_array_equal(getattr(batched, field), getattr(torch_batched, field))
    scores = dice(batched)
    assert scores.shape == (6,) and math.isnan(scores[2])
    assert scores[0] == pytest.approx(dice(count(pred[0], truth[0])))
    assert batched.sum() == count(pred, truth)


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="differ in shape"):
        count(np.zeros((3, 3)), np.zeros((3, 4)))


# --- HD95 --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [1, 3, 6])
def test_hd95_of_offset_squares_is_the_offset(offset):
    a, b = square((48, 48), 10, 10, 20), square((48, 48), 10, 10 + offset, 20)
    assert hd95(a, b) == pytest.approx(offset)
    assert hd95(torch.from_numpy(b), a) == pytest.approx(offset)
    # Cubes, not thin slabs: a 2-slice slab is all surface, so most of it overlaps at distance 0.
    volume_a, volume_b = np.zeros((24, 48, 48), bool), np.zeros((24, 48, 48), bool)
    volume_a[2:22], volume_b[2:22] = a, b
    assert hd95(volume_a, volume_b) == pytest.approx(offset)


def test_hd95_is_nan_when_a_side_is_empty():
    lesion, empty = square(), np.zeros((32, 32), bool)
    assert math.isnan(hd95(lesion, empty))
    assert math.isnan(hd95(empty, lesion))
    assert math.isnan(hd95(empty, empty))
    assert hd95(lesion, lesion) == 0.0


# --- batch scores and detection ----------------------------------------------------------------------


def test_batch_scores_pool_counts_over_the_batch():
    truth = torch.from_numpy(np.stack([square(), np.zeros((32, 32), bool)]))[:, None].float()
    logits = (truth * 2 - 1) * 8  # perfect on both items, one of them empty
    scores = batch_scores(logits.to(torch.bfloat16), truth)
    assert {k: float(v) for k, v in scores.items()} == {"dice": 1.0, "iou": 1.0, "accuracy": 1.0}

    half = logits.clone()
    half[0, 0, 8:13] = -8  # miss 5 of the 10 lesion rows
    scores = batch_scores(half, truth)
    assert float(scores["dice"]) == pytest.approx(2 * 50 / (50 + 100))
    assert float(scores["iou"]) == pytest.approx(0.5)
    assert float(scores["accuracy"]) == pytest.approx(1 - 50 / (2 * 32 * 32))

    empty = torch.zeros(2, 1, 8, 8)
    assert float(batch_scores(empty - 5, empty)["dice"]) == 1.0  # nothing there, nothing predicted
    assert float(batch_scores(empty + 5, empty)["dice"]) == 0.0


def test_detection_scores():
    pred_has = np.array([True, True, False, False, True])
    true_has = np.array([True, False, False, True, True])
    scores = detection(pred_has, true_has)
    assert scores["accuracy"] == pytest.approx(3 / 5)
    assert scores["sensitivity"] == pytest.approx(2 / 3)
    assert scores["specificity"] == pytest.approx(1 / 2)
    no_tumour = detection(np.array([False, True]), np.array([False, False]))
    assert math.isnan(no_tumour["sensitivity"]) and no_tumour["specificity"] == 0.5


# --- losses ------------------------------------------------------------------------------------------


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    target = (torch.rand(4, 1, 16, 16, generator=g) > 0.7).float()
    target[3] = 0  # an empty slice
    return target


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_losses_are_small_when_right_large_when_wrong_and_give_gradients(name):
    loss = create_loss(name)
    target = _batch()
    right = (target * 2 - 1) * 20
    wrong = -right
    assert loss(right, target).item() < 1e-3
    assert loss(wrong, target).item() > 0.5
    logits = torch.randn(4, 1, 16, 16, requires_grad=True)
    value = loss(logits, target)
    assert torch.isfinite(value)
    value.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_losses_are_finite_on_an_all_empty_batch():
    target = torch.zeros(2, 1, 8, 8)
    for name in LOSS_NAMES:
        assert torch.isfinite(create_loss(name)(torch.full_like(target, -10.0), target))


def test_bce_dice_is_the_sum_of_bce_and_dice():
    target = _batch(1)
    logits = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    combined = create_loss("bce+dice")(logits, target)
    parts = create_loss("bce")(logits, target) + create_loss("dice")(logits, target)
    assert combined.item() == pytest.approx(parts.item(), rel=1e-6)
    assert combined.item() == pytest.approx(create_loss("BCE-Dice")(logits, target).item())


def test_tversky_costs_a_missed_pixel_more_than_a_false_positive_one():
    target = torch.zeros(1, 1, 16, 16)
    target[0, 0, 4:12, 4:12] = 1  # 64 tumour pixels
    hard = torch.where(target.bool(), 20.0, -20.0)
    under, over = hard.clone(), hard.clone()
    under[0, 0, 4:6, 4:12] = -20.0  # 16 tumour pixels missed
    over[0, 0, 2:4, 4:12] = 20.0  # 16 background pixels called tumour
    tversky = create_loss("bce_tversky")
    dice = create_loss("bce_dice")
    # the BCE terms are equal (16 wrong pixels each); Tversky's gap is over three times Dice's
    tversky_gap = tversky(under, target) - tversky(over, target)
    dice_gap = dice(under, target) - dice(over, target)
    expected = (1 - 48 / (48 + 0.7 * 16)) - (1 - 64 / (64 + 0.3 * 16))
    assert tversky_gap.item() == pytest.approx(expected, abs=1e-3)
    assert tversky_gap > 3 * dice_gap
    # with both weights at 0.5, the Tversky index is the Dice coefficient
    from monai.losses import TverskyLoss
    even = TverskyLoss(sigmoid=True, alpha=0.5, beta=0.5, batch=True)
    assert even(under, target).item() == pytest.approx(create_loss("dice")(under, target).item(), abs=1e-4)


def test_dice_per_image_weighs_a_missed_small_tumour_as_much_as_a_found_large_one():
    target = torch.zeros(2, 1, 32, 32)
    target[0, 0, :, :16] = 1  # a large tumour, found
    target[1, 0, 5:7, 5:7] = 1  # a small one, missed
    logits = torch.where(target.bool(), 20.0, -20.0)
    logits[1] = -20.0
    per_image = create_loss("bce_dice_image")(logits, target) - create_loss("bce")(logits, target)
    batch = create_loss("bce_dice")(logits, target) - create_loss("bce")(logits, target)
    assert per_image.item() == pytest.approx(0.5, abs=1e-3)  # one of two tumour images wholly missed
    assert batch.item() < 0.01  # the batch Dice hardly notices: 4 of 516 tumour pixels missed
    empty = torch.zeros(2, 1, 8, 8)  # no tumour image: the Dice term is 0, BCE alone remains
    assert create_loss("bce_dice_image")(torch.full_like(empty, -3.0), empty).item() == pytest.approx(
        create_loss("bce")(torch.full_like(empty, -3.0), empty).item())


def test_tversky_per_image_averages_the_tumour_images_and_weighs_misses_more():
    target = torch.zeros(3, 1, 16, 16)
    target[0, 0, 4:12, 4:12] = 1  # 64 tumour pixels, 16 of them missed below
    target[1, 0, 4:12, 4:12] = 1  # found exactly
    hard = torch.where(target.bool(), 20.0, -20.0)  # image 2 has no tumour: left to BCE
    hard[0, 0, 4:6, 4:12] = -20.0
    bce = create_loss("bce")(hard, target)
    per_image = create_loss("bce_tversky_image")(hard, target) - bce
    missed = 1 - 48 / (48 + 0.7 * 16)  # image 0's Tversky loss; image 1's is 0
    assert per_image.item() == pytest.approx(missed / 2, abs=1e-3)
    batch = create_loss("bce_tversky")(hard, target) - bce  # pooled: the found image dilutes the miss
    assert batch.item() == pytest.approx(1 - 112 / (112 + 0.7 * 16), abs=1e-3)
    assert per_image > batch


def test_loss_accepts_bf16_logits():
    target = _batch()
    logits = torch.randn(4, 1, 16, 16)
    full = create_loss()(logits, target)
    half = create_loss()(logits.to(torch.bfloat16), target)
    assert half.dtype == torch.float32 and half.item() == pytest.approx(full.item(), rel=2e-2)


def test_unknown_loss_name_lists_the_choices():
    with pytest.raises(UnknownLossError, match="bce, dice, bce_dice") as info:
        create_loss("focal")
    assert isinstance(info.value, BrainsegError)


def test_training_minutes_carry_on_across_a_resume():
    from brainseg.plots import training_minutes

    # history.csv's clock restarts when a run resumes (third epoch)
    assert training_minutes([60, 120, 30, 90]).tolist() == [1.0, 2.0, 2.5, 3.5]
