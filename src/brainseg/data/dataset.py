"""Torch datasets over an indexed data set: resizing, 2.5D context, tumour-weighted sampling."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, WeightedRandomSampler, default_collate

# Each channel of a volume is divided by its 99.5th percentile over the volume's non-zero voxels
# and clipped to [0, 1]: scanners and institutions store FLAIR at very different brightness, and
# dividing by 255 alone left whole patients unsegmented (see docs/training.md).
# data.normalize -> the name a model file records; "divide255" is the Keras seed notebooks' x / 255.
NORMALISATIONS = {"percentile": "volume_p99.5", "divide255": "divide255"}
NORMALISATION = NORMALISATIONS["percentile"]
PERCENTILE = 99.5


def channel_scales(images, normalisation: str = NORMALISATION) -> np.ndarray:
    """Per-channel divisors for uint8 images (H, W, C) of one volume: the 99.5th percentile of the
    non-zero values, or 255 for "divide255"."""
    if normalisation == NORMALISATIONS["divide255"]:
        first = next(iter(images))
        return np.full(first.shape[-1] if first.ndim == 3 else 1, 255.0, np.float32)
    histograms = None
    for image in images:
        image = image if image.ndim == 3 else image[..., None]
        counts = np.stack([np.bincount(image[..., c].ravel(), minlength=256) for c in range(image.shape[-1])])
        histograms = counts if histograms is None else histograms + counts
    if histograms is None:
        raise ValueError("no images to normalise")
    histograms[:, 0] = 0  # background
    scales = np.ones(len(histograms), np.float32)
    for channel, counts in enumerate(histograms):
        total = counts.sum()
        if total:
            scales[channel] = max(1.0, float(np.searchsorted(np.cumsum(counts), PERCENTILE / 100 * total)))
    return scales


def to_input(image: np.ndarray, image_size: int, scales: np.ndarray | None = None) -> torch.Tensor:
    """(H, W, C) uint8 -> (C, S, S) float32 in [0, 1], each channel divided by its scale and clipped,
    resized with antialiasing when needed. Without scales, the image's own are used."""
    if scales is None:
        scales = channel_scales([image])
    # np.array copies: cached slices are read-only memory maps, which torch will not wrap.
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).float()
    tensor = tensor.div_(torch.as_tensor(scales, dtype=torch.float32)[:, None, None]).clamp_(0.0, 1.0)
    if tensor.shape[-2:] != (image_size, image_size):
        tensor = F.interpolate(tensor[None], size=(image_size, image_size), mode="bilinear",
                               antialias=True, align_corners=False)[0].clamp_(0.0, 1.0)
    return tensor


def to_target(mask: np.ndarray, image_size: int) -> torch.Tensor:
    """(H, W) 0/1 uint8 -> (1, S, S) float32 0/1; downsizing keeps a pixel where it is mostly tumour."""
    tensor = torch.from_numpy(np.array(mask)).float()[None]
    if tensor.shape[-2:] != (image_size, image_size):
        tensor = (F.interpolate(tensor[None], size=(image_size, image_size), mode="area")[0] >= 0.5).float()
    return tensor


def neighbour_positions(table: pd.DataFrame, context: int) -> np.ndarray:
    """For each row, the rows of the 2*context+1 slices centred on it in its patient's volume.

    At the ends of a volume the edge slice is repeated, so every row gets the same channel count.
    """
    positions = np.zeros((len(table), 2 * context + 1), np.int64)
    order = np.lexsort((table["slice"].to_numpy(), table["patient"].to_numpy()))
    patients = table["patient"].to_numpy()[order]
    starts = np.flatnonzero(np.r_[True, patients[1:] != patients[:-1]])
    ends = np.r_[starts[1:], len(order)]
    for start, end in zip(starts, ends, strict=True):
        volume = order[start:end]
        for offset, row in enumerate(volume):
            picks = np.clip(np.arange(offset - context, offset + context + 1), 0, len(volume) - 1)
            positions[row] = volume[picks]
    return positions


class SliceDataset(Dataset):
    """Samples {"image", "mask", "patient", "position"} (plus "mask_full" when resized, and "teacher" once
    `soft_targets` holds a distillation teacher's probabilities, one (1, S, S) uint8 map per slice, 255
    meaning 1).

    `patient` indexes `self.patients`, so per-patient volumes can be accumulated from batches.
    """

    def __init__(self, table: pd.DataFrame, store, *, image_size: int = 256, context: int = 0,
                 transform=None, keep_full_mask: bool = False, normalisation: str = NORMALISATION) -> None:
        self.table = table.reset_index(drop=True)
        self.normalisation = normalisation
        self.store = store
        self.image_size = image_size
        self.context = context
        self.transform = transform
        self.keep_full_mask = keep_full_mask
        self.keys = self.table["image_path"].astype(str).tolist()
        self.patients = sorted(self.table["patient"].astype(str).unique())
        lookup = {name: i for i, name in enumerate(self.patients)}
        self.patient_of_row = self.table["patient"].astype(str).map(lookup).to_numpy()
        self.neighbours = neighbour_positions(self.table, context)
        self.scales = self._volume_scales()
        channels = int(self.table["channels"].max()) if len(self.table) else 0
        if len(self.table) and int(self.table["channels"].min()) != channels:
            raise ValueError("mixed channel counts in one data set; convert the images first")
        self.in_channels = channels * (2 * context + 1)
        self.soft_targets: torch.Tensor | None = None

    def _volume_scales(self) -> np.ndarray:
        """Per-patient channel scales, one row per patient, tiled over the 2.5D neighbours."""
        rows = []
        for patient in self.patients:
            keys = self.table.loc[self.table["patient"].astype(str) == patient, "image_path"]
            scales = channel_scales((self.store.image(k) for k in keys), self.normalisation)
            rows.append(np.tile(scales, 2 * self.context + 1))
        return np.stack(rows) if rows else np.zeros((0, 1), np.float32)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> dict:
        rows = self.neighbours[index]
        if len(rows) == 1:
            image = self.store.image(self.keys[index])
        else:
            image = np.concatenate([self.store.image(self.keys[r]) for r in rows], axis=-1)
        mask = self.store.mask(self.keys[index])
        scales = self.scales[self.patient_of_row[index]]
        sample = {"image": to_input(image, self.image_size, scales), "mask": to_target(mask, self.image_size),
                  "patient": int(self.patient_of_row[index]), "position": index}
        if self.soft_targets is not None:
            sample["teacher"] = self.soft_targets[index].float().div_(255.0)
        if self.keep_full_mask and mask.shape != (self.image_size, self.image_size):
            sample["mask_full"] = torch.from_numpy(np.array(mask)).float()[None]
        return self.transform(sample) if self.transform is not None else sample

    def sampler(self, tumour_weight: float, num_samples: int = 0, seed: int = 0, small_weight: float = 1.0,
                small_pixels: int = 0) -> WeightedRandomSampler:
        """Draw tumour slices `tumour_weight` times as often as slices without tumour, and those with
        fewer than `small_pixels` tumour pixels `small_weight` times as often again."""
        pixels = self.table["tumour_pixels"].to_numpy()
        weights = np.where(pixels > 0, tumour_weight, 1.0)
        weights = np.where((pixels > 0) & (pixels < small_pixels), weights * small_weight, weights)
        generator = torch.Generator().manual_seed(seed)
        return WeightedRandomSampler(torch.as_tensor(weights, dtype=torch.double),
                                     num_samples or len(self), replacement=True, generator=generator)


def collate(samples: list[dict]) -> dict:
    """Default batching, except full-size masks of different sizes stay a list."""
    full = [s.pop("mask_full") for s in samples if "mask_full" in s]
    batch = default_collate(samples)
    if full:
        same = all(f.shape == full[0].shape for f in full)
        batch["mask_full"] = torch.stack(full) if same else full
    return batch
