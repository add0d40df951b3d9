"""Segmentation losses on logits: BCE, soft Dice and their sum.

All take logits ``(B, 1, H, W)`` and float 0/1 targets of the same shape. Soft Dice is computed over the
whole batch (``batch=True``) with smooth terms of 1e-5, so a batch of empty slices gives a finite loss
that is near 0 when nothing is predicted and near 1 otherwise.

``bce_dice_image`` takes the soft Dice of each image that has tumour and averages them, so a small
tumour weighs as much as a large one (a batch Dice is dominated by the large ones); empty images are
left to the BCE term, where per-image Dice would give them a constant loss without a useful gradient.

``bce_tversky`` replaces Dice with the Tversky index (Salehi et al. 2017) over the batch, weighing
missed tumour pixels 0.7 and false-positive pixels 0.3 (Dice weighs both 0.5): for models that
under-segment, as the shipped ones do on small and faint tumours. ``bce_tversky_image`` takes that index
per tumour image and averages, as ``bce_dice_image`` does with Dice.

``DistillationLoss`` mixes one of them with BCE against a teacher's probabilities (brainseg distill).
"""

from __future__ import annotations

import torch
from monai.losses import DiceCELoss, DiceLoss, TverskyLoss
from torch import nn

from brainseg.errors import BrainsegError

LOSS_NAMES = ("bce", "dice", "bce_dice", "bce_dice_image", "bce_tversky", "bce_tversky_image")
TVERSKY_FALSE_POSITIVE, TVERSKY_FALSE_NEGATIVE = 0.3, 0.7  # MONAI's alpha and beta
_ALIASES = {"dice_bce": "bce_dice", "dicece": "bce_dice", "dice_ce": "bce_dice"}
_SMOOTH = 1e-5


class UnknownLossError(BrainsegError, ValueError):
    """The loss name is not one of :data:`LOSS_NAMES`."""


class SegmentationLoss(nn.Module):
    """Wraps a loss on logits: checks shapes and computes in float32 (bf16 sums lose Dice precision)."""

    def __init__(self, name: str, loss: nn.Module) -> None:
        super().__init__()
        self.name = name
        self.loss = loss

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape != target.shape:
            raise ValueError(f"{self.name} loss: logits {tuple(logits.shape)} and target "
                             f"{tuple(target.shape)} differ in shape")
        return self.loss(logits.float(), target.float())

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


class PerTumourImageLoss(nn.Module):
    """The mean of a per-image overlap loss (MONAI, ``batch=False``) over the images whose target has
    foreground; 0 when none has."""

    def __init__(self, overlap: nn.Module) -> None:
        super().__init__()
        self.overlap = overlap

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        per_image = self.overlap(logits, target).flatten()
        present = target.flatten(1).amax(dim=1) > 0
        if not bool(present.any()):
            return logits.sum() * 0.0  # keeps the graph so backward still runs
        return per_image[present].mean()


def _dice(batch: bool) -> DiceLoss:
    """Soft Dice over the batch (one number) or per image (``batch=False``: one value per image)."""
    return DiceLoss(sigmoid=True, batch=batch, reduction="mean" if batch else "none", smooth_nr=_SMOOTH,
                    smooth_dr=_SMOOTH)


def _tversky(batch: bool) -> TverskyLoss:
    return TverskyLoss(sigmoid=True, alpha=TVERSKY_FALSE_POSITIVE, beta=TVERSKY_FALSE_NEGATIVE, batch=batch,
                       reduction="mean" if batch else "none", smooth_nr=_SMOOTH, smooth_dr=_SMOOTH)


class BCEPlus(nn.Module):
    """BCE on every pixel plus an overlap loss."""

    def __init__(self, overlap: nn.Module) -> None:
        super().__init__()
        self.bce = nn.BCEWithLogitsLoss()
        self.overlap = overlap

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.bce(logits, target) + self.overlap(logits, target)


class DistillationLoss(nn.Module):
    """Knowledge distillation on logits: ``(1 - weight) * loss(logits, truth) + weight * BCE(logits,
    teacher probabilities)``, the teacher's probabilities taken as soft targets (Hinton et al. 2015,
    temperature 1). ``weight`` 1 learns the teacher alone, 0 the truth alone."""

    def __init__(self, loss: nn.Module, weight: float) -> None:
        super().__init__()
        if not 0 <= weight <= 1:
            raise ValueError(f"distillation weight must be in [0, 1], got {weight}")
        self.loss = loss
        self.weight = float(weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor,
                teacher_probabilities: torch.Tensor) -> torch.Tensor:
        if logits.shape != teacher_probabilities.shape:
            raise ValueError(f"distillation: logits {tuple(logits.shape)} and teacher probabilities "
                             f"{tuple(teacher_probabilities.shape)} differ in shape")
        soft = nn.functional.binary_cross_entropy_with_logits(logits.float(), teacher_probabilities.float())
        if self.weight == 1:  # the truth plays no part
            return soft
        return (1 - self.weight) * self.loss(logits, target) + self.weight * soft

    def extra_repr(self) -> str:
        return f"weight={self.weight}"


def normalise_loss_name(name: str) -> str:
    """Lower-cases and maps '+', '-' and spaces to '_': ``"BCE+Dice"`` -> ``"bce_dice"``."""
    key = name.strip().lower()
    for separator in "+- ":
        key = key.replace(separator, "_")
    key = _ALIASES.get(key, key)
    if key not in LOSS_NAMES:
        raise UnknownLossError(f"unknown loss {name!r}; choose one of: {', '.join(LOSS_NAMES)}")
    return key


def create_loss(name: str = "bce_dice") -> SegmentationLoss:
    """``"bce"``, ``"dice"``, ``"bce_dice"`` (BCE + batch Dice with equal weights), ``"bce_dice_image"``
    (BCE + the mean Dice of the images with tumour), ``"bce_tversky"`` (BCE + batch Tversky, missed
    pixels weighing 0.7) or ``"bce_tversky_image"`` (BCE + the mean Tversky of the images with tumour),
    all on logits."""
    key = normalise_loss_name(name)
    loss: nn.Module
    if key == "bce":
        loss = nn.BCEWithLogitsLoss()
    elif key == "bce_dice_image":
        loss = BCEPlus(PerTumourImageLoss(_dice(batch=False)))
    elif key == "bce_tversky":
        loss = BCEPlus(_tversky(batch=True))
    elif key == "bce_tversky_image":
        loss = BCEPlus(PerTumourImageLoss(_tversky(batch=False)))
    elif key == "dice":
        loss = _dice(batch=True)
    else:
        # For one channel MONAI's DiceCELoss uses BCEWithLogitsLoss (mean) for the CE term.
        loss = DiceCELoss(sigmoid=True, batch=True, smooth_nr=_SMOOTH, smooth_dr=_SMOOTH,
                          lambda_dice=1.0, lambda_ce=1.0)
    return SegmentationLoss(key, loss)
