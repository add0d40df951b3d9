"""Segmentation metrics, with counting (confusion counts) kept apart from reducing (scores from counts).

Counts add up, so any aggregation (per slice, per patient, whole set) is a sum of counts followed by one
reduction. Empty-case convention, as in nnU-Net and MONAI: Dice and IoU are NaN when truth and prediction
are both empty (such cases are left out of means with ``np.nanmean``), precision is NaN when nothing is
predicted, recall (sensitivity) NaN when the truth is empty, specificity NaN when the truth is all positive.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance

from brainseg.config import check_threshold

ArrayLike = np.ndarray | torch.Tensor
Count = int | np.ndarray | torch.Tensor


@dataclass(frozen=True)
class Counts:
    """Confusion counts: ints for one item, int64 arrays (one entry per item) for a batch."""

    tp: Count
    fp: Count
    fn: Count
    tn: Count

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn)

    def sum(self) -> Counts:
        """Totals over the items of a batched ``Counts`` (micro aggregation)."""
        return Counts(*(int(np.sum(value)) for value in (self.tp, self.fp, self.fn, self.tn)))

    @property
    def total(self) -> Count:
        return self.tp + self.fp + self.fn + self.tn


def _as_bool(x: ArrayLike | Any) -> np.ndarray | torch.Tensor:
    """Nonzero counts as positive: threshold probabilities before counting."""
    if isinstance(x, torch.Tensor):
        return x if x.dtype == torch.bool else x != 0
    x = np.asarray(x)
    return x if x.dtype == bool else x != 0


def _pair(pred: ArrayLike, target: ArrayLike) -> tuple[Any, Any]:
    """Both as bool numpy arrays, or both as bool tensors on one device if either is a tensor."""
    p, t = _as_bool(pred), _as_bool(target)
    _check_shapes(p, t)
    if isinstance(p, torch.Tensor) or isinstance(t, torch.Tensor):
        p = torch.as_tensor(p)
        t = torch.as_tensor(t, device=p.device)
    return p, t


def _check_shapes(pred: Any, target: Any) -> None:
    if tuple(pred.shape) != tuple(target.shape):
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")


def count(pred: ArrayLike, target: ArrayLike) -> Counts:
    """Confusion counts over all elements of two binary arrays (numpy or torch, any shape), as ints."""
    p, t = _pair(pred, target)
    if isinstance(p, torch.Tensor):
        tp, n_pred, n_true = torch.stack([(p & t).sum(), p.sum(), t.sum()]).tolist()  # one sync
        size = p.numel()
    else:
        tp, n_pred, n_true = np.count_nonzero(p & t), np.count_nonzero(p), np.count_nonzero(t)
        size = p.size
    tp, fp, fn = int(tp), int(n_pred - tp), int(n_true - tp)
    return Counts(tp, fp, fn, int(size) - tp - fp - fn)


def count_per_item(pred: ArrayLike, target: ArrayLike) -> Counts:
    """Confusion counts per item of the leading (batch) dimension, as int64 numpy arrays."""
    p, t = _pair(pred, target)
    if p.ndim == 0:
        raise ValueError("count_per_item needs a leading batch dimension")
    p, t = p.reshape(len(p), -1), t.reshape(len(t), -1)
    if isinstance(p, torch.Tensor):
        tp, n_pred, n_true = torch.stack([(p & t).sum(1), p.sum(1), t.sum(1)]).cpu().numpy()
    else:
        tp, n_pred, n_true = (np.count_nonzero(x, axis=1) for x in (p & t, p, t))
    tp, fp, fn = (np.asarray(x, dtype=np.int64) for x in (tp, n_pred - tp, n_true - tp))
    return Counts(tp, fp, fn, p.shape[1] - tp - fp - fn)


def _ratio(numerator, denominator, empty: float = math.nan):
    """numerator / denominator, `empty` where the denominator is 0; tensors stay on their device."""
    if isinstance(numerator, torch.Tensor) or isinstance(denominator, torch.Tensor):
        num, den = torch.as_tensor(numerator).double(), torch.as_tensor(denominator).double()
        return torch.where(den > 0, num / den.clamp_min(1), torch.full_like(den, empty))
    num = np.asarray(numerator, dtype=np.float64)
    den = np.asarray(denominator, dtype=np.float64)
    out = np.divide(num, den, out=np.full(np.broadcast(num, den).shape, empty), where=den > 0)
    return float(out) if out.ndim == 0 else out


def dice(c: Counts, empty: float = math.nan):
    """2TP / (2TP + FP + FN); `empty` when truth and prediction are both empty: NaN (left out of
    means, as nnU-Net and MONAI do) or 1.0 (a perfect empty answer, for training-time batch scores).
    Counts may be ints, numpy arrays or tensors (then the result is a tensor on their device)."""
    return _ratio(2 * c.tp, 2 * c.tp + c.fp + c.fn, empty)


def iou(c: Counts, empty: float = math.nan):
    """TP / (TP + FP + FN) (Jaccard); `empty` when truth and prediction are both empty."""
    return _ratio(c.tp, c.tp + c.fp + c.fn, empty)


def precision(c: Counts) -> float | np.ndarray:
    """TP / (TP + FP); NaN when nothing is predicted."""
    return _ratio(c.tp, np.asarray(c.tp) + c.fp)


def recall(c: Counts) -> float | np.ndarray:
    """TP / (TP + FN), the sensitivity; NaN when the truth is empty."""
    return _ratio(c.tp, np.asarray(c.tp) + c.fn)


def specificity(c: Counts) -> float | np.ndarray:
    """TN / (TN + FP); NaN when the truth has no negatives."""
    return _ratio(c.tn, np.asarray(c.tn) + c.fp)


def accuracy(c: Counts) -> float | np.ndarray:
    """(TP + TN) / all; NaN only for zero elements."""
    return _ratio(np.asarray(c.tp) + c.tn, c.total)


def hd95(pred: ArrayLike, target: ArrayLike) -> float:
    """95th-percentile symmetric Hausdorff distance in pixels between two binary 2D or 3D masks.

    MONAI's definition: distances between the masks' edge pixels, the 95th percentile taken in each
    direction and the larger of the two kept. NaN when either mask is empty.
    """
    p, t = _pair(pred, target)
    if p.ndim not in (2, 3):
        raise ValueError(f"hd95 needs 2D or 3D masks, got shape {tuple(p.shape)}")
    if not p.any() or not t.any():
        return math.nan
    p, t = torch.as_tensor(p), torch.as_tensor(t)
    # MONAI wants one-hot (B, C, spatial...); our single channel is the foreground, so keep "background".
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI's empty-mask warnings; empty cases are handled above
        distance = compute_hausdorff_distance(p[None, None], t[None, None], include_background=True,
                                              percentile=95)
    return float(distance[0, 0])


def batch_scores(logits: torch.Tensor, target: torch.Tensor,
                 threshold: float = 0.5) -> dict[str, torch.Tensor]:
    """Dice, IoU and pixel accuracy from the whole batch's counts (micro), as 0-d tensors on the device.

    ``threshold`` applies to sigmoid probabilities. Pooling counts over the batch means empty slices do
    not give NaN; when the whole batch is empty in truth and prediction, Dice and IoU are 1.0 (a perfect
    empty answer). No host synchronisation.
    """
    check_threshold(threshold, "threshold")
    _check_shapes(logits, target)
    # sigmoid(x) > t  <=>  x > logit(t); float32 because bf16 logits round near the cut.
    pred = logits.detach().float() > math.log(threshold / (1.0 - threshold))
    truth = target.detach() > 0.5
    tp = (pred & truth).sum(dtype=torch.float32)
    fp = pred.sum(dtype=torch.float32) - tp
    fn = truth.sum(dtype=torch.float32) - tp
    c = Counts(tp, fp, fn, pred.numel() - tp - fp - fn)
    return {"dice": dice(c, empty=1.0).float(), "iou": iou(c, empty=1.0).float(),
            "accuracy": (c.tp + c.tn) / max(pred.numel(), 1)}


def detection(pred_has: ArrayLike, true_has: ArrayLike) -> dict[str, float | int]:
    """Tumour-presence scores from per-slice (or per-patient) booleans.

    Returns accuracy, sensitivity (NaN without positives), specificity (NaN without negatives) and the
    four counts.
    """
    c = count(np.ravel(_to_numpy(pred_has)), np.ravel(_to_numpy(true_has)))
    return {"accuracy": accuracy(c), "sensitivity": recall(c), "specificity": specificity(c),
            "tp": c.tp, "fp": c.fp, "fn": c.fn, "tn": c.tn}


def _to_numpy(x: ArrayLike | Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
