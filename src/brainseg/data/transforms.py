"""Training augmentation for 2D slices, built from MONAI dictionary transforms.

A sample is ``{"image": float32 (C, H, W) in [0, 1], "mask": float32 (1, H, W) of 0/1, ...}``. Spatial
transforms draw once per sample and apply the same draw to image and mask (mask resampled with nearest,
so it stays exactly 0/1); a distillation teacher's probabilities, ``"teacher"`` (1, H, W), when present,
move with them (bilinear). Intensity transforms touch the image only. Other keys pass through untouched
and the caller's dict and tensors are never modified. Outputs are plain contiguous ``torch.Tensor``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Hashable, Mapping
from functools import partial
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor, get_track_meta, set_track_meta
from monai.transforms import (
    Compose,
    MapTransform,
    Rand2DElasticd,
    RandAdjustContrastd,
    RandAffined,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    Randomizable,
    RandomizableTransform,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Transform,
)
from monai.utils import MAX_SEED

from brainseg.config import AugmentConfig
from brainseg.data.io import FLAIR_CHANNEL, MISSING_SEQUENCES

KEYS = ("image", "mask", "teacher")  # "teacher" only while distilling (allow_missing_keys)
_MODES = ("bilinear", "nearest", "bilinear")  # per key: image interpolated, mask kept binary


class _PerShape(RandomizableTransform, MapTransform):
    """Applies, with probability ``prob``, a transform built for the sample's spatial shape.

    MONAI takes shifts and elastic control spacing in pixels and caches sampling grids for one size, so
    the wrapped transform is built once per shape (usually one). All of them draw from this object's
    random state, which keeps a seeded pipeline reproducible. Deciding ``prob`` here also spares
    ``Rand2DElasticd`` its identity resample when it is not applied.
    """

    def __init__(self, keys: tuple[str, ...], factory: Callable[[tuple[int, ...]], Randomizable],
                 prob: float) -> None:
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, keys, allow_missing_keys=True)
        self.factory = factory
        self._built: dict[tuple[int, ...], Randomizable] = {}

    def set_random_state(self, seed: int | None = None,
                         state: np.random.RandomState | None = None) -> _PerShape:
        super().set_random_state(seed, state)
        for transform in self._built.values():
            transform.set_random_state(state=self.R)
        return self

    def __call__(self, data: Mapping[Hashable, Any]) -> Mapping[Hashable, Any]:
        self.randomize(None)
        if not self._do_transform:
            return data
        shape = tuple(data[self.keys[0]].shape[1:])
        transform = self._built.get(shape)
        if transform is None:
            transform = self._built[shape] = self.factory(shape)
            transform.set_random_state(state=self.R)
        return transform(data)


def _affine_for(config: AugmentConfig, shape: tuple[int, ...]) -> RandAffined:
    # Keras shears one axis by an angle; MONAI wants the matrix coefficient, tan(angle), per axis.
    transform = RandAffined(
        keys=KEYS, prob=1.0, mode=_MODES, padding_mode="zeros", allow_missing_keys=True,
        rotate_range=math.radians(config.rotation_deg),
        shear_range=(math.tan(math.radians(config.shear_deg)),),
        translate_range=tuple(config.shift * side for side in shape),
        scale_range=(config.zoom,) * len(shape),
        spatial_size=shape, cache_grid=True,
    )
    # MONAI resamples in float64 by default and RandAffined has no dtype argument; float32 is 3x
    # faster at 256² and its rounding is far below a pixel.
    transform.rand_affine.resampler.dtype = torch.float32
    return transform


def _elastic_for(shape: tuple[int, ...]) -> Rand2DElasticd:
    # Eight control cells per side and displacements of up to ~1.5 % of the side: a mild warp that
    # keeps the brain outline plausible at 128² and 256² alike.
    side = min(shape)
    spacing = max(side // 8, 4)
    transform = Rand2DElasticd(
        keys=KEYS, spacing=(spacing, spacing), magnitude_range=(0.0, 0.015 * side), prob=1.0,
        mode=_MODES, padding_mode="zeros", allow_missing_keys=True,
    )
    transform.rand_2d_elastic.resampler.dtype = torch.float32  # as for the affine
    return transform


class _PatchCrop(RandCropByPosNegLabeld):
    """One square patch per slice: centred on a tumour pixel a third of the time, else on any non-black pixel.

    The cut comes before the other augmentations, so they run at the patch's size. On slices without
    tumour MONAI warns that it cannot balance the centres and draws from the non-black pixels alone,
    which is what is wanted here, so that warning is silenced.
    """

    def __init__(self, side: int) -> None:
        super().__init__(keys=KEYS, label_key="mask", spatial_size=(side, side), pos=1.0, neg=2.0,
                         num_samples=1, image_key="image", image_threshold=0.0, allow_missing_keys=True)

    def __call__(self, data: Mapping[Hashable, Any], lazy: bool | None = None) -> dict[Hashable, Any]:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*unable to generate class balanced samples.*")
            return super().__call__(data, lazy=lazy)[0]


class _MissingSequence(RandomizableTransform):
    """With probability ``prob``, copies the FLAIR channel over post-contrast, or over both other channels.

    kaggle_3m fills a patient's missing sequence with FLAIR, so a model that never saw that learns to
    trust contrast that is absent: held-out copied-FLAIR patients scored 0.53 mean Dice in 5-fold CV
    against 0.80 for the others. The two patterns are equally likely (the shared data has both). Only
    3-channel (pre-contrast, FLAIR, post-contrast) images are touched.
    """

    PATTERNS = tuple(MISSING_SEQUENCES.values())

    def __init__(self, prob: float) -> None:
        RandomizableTransform.__init__(self, prob)
        self._replaced: tuple[int, ...] = ()

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        self._replaced = self.PATTERNS[self.R.randint(len(self.PATTERNS))]

    def __call__(self, data: Mapping[Hashable, Any]) -> Mapping[Hashable, Any]:
        self.randomize()
        image = data["image"]
        if not self._do_transform or image.shape[0] != 3:
            return data
        image = torch.as_tensor(image).clone()  # the caller's tensor stays as it was
        image[list(self._replaced)] = image[FLAIR_CHANNEL].clone()
        return {**data, "image": image}


class _Finish(Transform):
    """Clips the image to [0, 1] (intensity ops and noise overshoot) and returns plain tensors."""

    def __init__(self, clip: bool) -> None:
        self.clip = clip

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        for key in KEYS:
            if key not in out:
                continue
            value = out[key]
            if isinstance(value, MetaTensor):
                value = value.as_tensor()
            value = torch.as_tensor(value, dtype=torch.float32)
            if self.clip and key == "image":
                value = value.clamp(0.0, 1.0)  # out of place: the input may be the caller's tensor
            out[key] = value.contiguous()
        return out


class AugmentPipeline(Compose):
    """MONAI ``Compose`` run with meta-data tracking off.

    ``MetaTensor`` bookkeeping doubles the cost of the resampling on small 2D slices and nothing here
    inverts transforms, so tracking is switched off for the duration of a call. The switch is MONAI's
    process-wide flag: DataLoader workers are separate processes, but do not run this concurrently with
    meta-dependent MONAI code on another thread of the same process.
    """

    def __call__(self, input_: Any, *args: Any, **kwargs: Any) -> Any:
        previous = get_track_meta()
        set_track_meta(False)
        try:
            return super().__call__(input_, *args, **kwargs)
        finally:
            set_track_meta(previous)


def _augmentations(config: AugmentConfig) -> list[Callable]:
    steps: list[Callable] = []
    if config.p_missing_sequence > 0:  # first: the scanner-side substitution precedes any augmentation
        steps.append(_MissingSequence(config.p_missing_sequence))
    if config.geometric and config.p_geometric > 0:
        steps.append(_PerShape(KEYS, partial(_affine_for, config), prob=config.p_geometric))
    if config.hflip:
        steps.append(RandFlipd(keys=KEYS, prob=0.5, spatial_axis=1, allow_missing_keys=True))
    if config.elastic and config.p_elastic > 0:
        steps.append(_PerShape(KEYS, _elastic_for, prob=config.p_elastic))
    p = config.p_intensity
    if config.intensity and p > 0:
        if config.gamma > 0:
            gamma = (1 - config.gamma, 1 + config.gamma)
            steps.append(RandAdjustContrastd(keys="image", prob=p, gamma=gamma))
        if config.contrast > 0:
            steps.append(RandScaleIntensityd(keys="image", prob=p, factors=config.contrast))
        if config.brightness > 0:
            steps.append(RandShiftIntensityd(keys="image", prob=p, offsets=config.brightness))
    if config.noise_std > 0 and p > 0:
        steps.append(RandGaussianNoised(keys="image", prob=p, mean=0.0, std=config.noise_std))
    return steps


def build_transforms(config: AugmentConfig | None, *, train: bool, seed: int | None = None,
                     patch_size: int = 0) -> Callable[[dict], dict]:
    """Augmentation for training; for validation (or no config) only the plain-tensor conversion.

    ``patch_size`` > 0 first cuts a training patch of that side (see :class:`_PatchCrop`).

    ``seed`` makes the sequence of draws reproducible; without it the pipeline gets fresh entropy. In
    DataLoader workers pass :func:`seed_worker` as ``worker_init_fn`` so workers do not repeat each
    other's draws.
    """
    if not train or (config is None and not patch_size):
        return _Finish(clip=False)
    steps: list[Callable] = [_PatchCrop(patch_size)] if patch_size else []
    if config is not None:
        steps += _augmentations(config)
    steps.append(_Finish(clip=True))
    pipeline = AugmentPipeline(steps)
    pipeline.set_random_state(seed=seed)
    return pipeline


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: re-seed every MONAI random transform held by the worker's dataset.

    Forked workers inherit identical transform random states, so without this each worker repeats the
    others' augmentations. The seed is torch's per-worker seed (base seed + worker id, drawn anew each
    epoch from the main process's torch RNG), so ``torch.manual_seed``/``seed_everything`` makes the
    whole run reproducible. ``monai.data.utils.worker_init_fn`` does the same walk over the dataset's
    attributes but does not look inside dicts and has no guard against reference cycles; this version
    handles both and otherwise follows it (``Randomizable`` objects get ``seed``, ``seed + 1``, ...).
    """
    info = torch.utils.data.get_worker_info()
    if info is None:  # called outside a worker
        return
    _reseed(info.dataset, info.seed, seen=set())


def _reseed(obj: Any, seed: int, seen: set[int]) -> int:
    if id(obj) in seen:
        return seed
    seen.add(id(obj))
    if isinstance(obj, Randomizable):
        obj.set_random_state(seed=seed % MAX_SEED)
        return seed + 1
    if isinstance(obj, (str, bytes, np.ndarray, torch.Tensor)):
        return seed
    if isinstance(obj, dict):
        children: Any = obj.values()
    elif isinstance(obj, (list, tuple)):
        children = obj
    else:
        children = getattr(obj, "__dict__", {}).values()
    for child in children:
        seed = _reseed(child, seed, seen)
    return seed
