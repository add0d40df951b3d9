"""Augmentation: one draw for image and mask, binary masks, seeding, worker re-seeding, plain outputs."""

from __future__ import annotations

import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from monai.data import MetaTensor, get_track_meta
from torch.utils.data import DataLoader, Dataset

from brainseg.config import AugmentConfig, AugmentConfigError, DataConfig
from brainseg.data.transforms import build_transforms, seed_worker
from brainseg.errors import BrainsegError

HEAVY = AugmentConfig(intensity=True, elastic=True, noise_std=0.05, p_intensity=1.0, p_elastic=1.0)


def make_sample(size: int = 64, seed: int = 0) -> dict:
    """A square-ish lesion whose FLAIR (channel 1) copy lets us check that image and mask moved together."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(1, size, size)
    mask[:, size // 4: size // 2 + 5, size // 5: size // 2] = 1
    image = torch.rand(3, size, size, generator=g) * 0.4
    image[1] = mask[0]
    return {"image": image, "mask": mask, "path": "p1/slice_3.tif", "patient": 7}


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum() / (a | b).sum())


def assert_binary(mask: torch.Tensor) -> None:
    assert set(torch.unique(mask).tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("config", [AugmentConfig(p_geometric=1.0),
                                    AugmentConfig(p_geometric=1.0, elastic=True, p_elastic=1.0)])
def test_image_and_mask_share_one_draw(config):
    transform = build_transforms(config, train=True, seed=3)
    sample = make_sample(128)  # big enough that double interpolation at the edge stays under 5 % IoU
    changed = 0
    for _ in range(20):
        out = transform(sample)
        assert_binary(out["mask"])
        assert iou(out["image"][1] > 0.5, out["mask"][0] > 0.5) > 0.95
        changed += not torch.equal(out["mask"], sample["mask"])
    assert changed >= 15  # the affine really ran


@pytest.mark.parametrize("config", [HEAVY, AugmentConfig(p_geometric=1.0, hflip=True)])
def test_teacher_maps_move_with_the_slice_and_keep_their_values(config):
    # a distillation teacher's probabilities follow every spatial draw (bilinear), never an intensity one
    for seed in range(4):
        sample = make_sample(seed=seed)
        sample["teacher"] = sample["mask"] * 0.8
        out = build_transforms(config, train=True, seed=seed)(sample)
        assert out["teacher"].shape == out["mask"].shape and out["teacher"].dtype == torch.float32
        assert out["teacher"].max() <= 0.8 + 1e-5
        assert iou(out["teacher"] > 0.4, out["mask"] > 0.5) > 0.9


def test_outputs_are_plain_contiguous_float32_and_extra_keys_pass_through():
    sample = make_sample()
    before = {key: value.clone() for key, value in sample.items() if isinstance(value, torch.Tensor)}
    for config in (AugmentConfig(), HEAVY):
        out = build_transforms(config, train=True, seed=0)(sample)
        for key in ("image", "mask"):
            assert type(out[key]) is torch.Tensor and not isinstance(out[key], MetaTensor)
            assert out[key].dtype == torch.float32 and out[key].is_contiguous()
            assert out[key].shape == sample[key].shape
        assert out["path"] == "p1/slice_3.tif" and out["patient"] == 7
        assert out["image"].min() >= 0.0 and out["image"].max() <= 1.0
        assert_binary(out["mask"])
    for key, value in before.items():  # the caller's tensors are untouched
        assert torch.equal(sample[key], value)
    assert get_track_meta()  # the pipeline switches MONAI's meta tracking off only while it runs


def test_validation_and_no_config_are_identity():
    sample = make_sample()
    for transform in (build_transforms(AugmentConfig(), train=False), build_transforms(None, train=True)):
        out = transform(sample)
        assert out.keys() == sample.keys()
        assert torch.equal(out["image"], sample["image"]) and torch.equal(out["mask"], sample["mask"])
        assert type(out["image"]) is torch.Tensor


def test_seed_reproduces_and_differs():
    sample = make_sample()

    def run(seed):
        transform = build_transforms(HEAVY, train=True, seed=seed)
        return [transform(sample) for _ in range(3)]

    first, again, other = run(5), run(5), run(6)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    assert any(not torch.equal(a["image"], c["image"]) for a, c in zip(first, other, strict=True))


def test_pickle_round_trip_keeps_state():
    transform = build_transforms(HEAVY, train=True, seed=1)
    sample = make_sample()
    transform(sample)  # builds the per-shape transforms, which must pickle too
    copy = pickle.loads(pickle.dumps(transform))
    assert torch.equal(transform(sample)["image"], copy(sample)["image"])


@pytest.mark.parametrize("size", [48, 64])
def test_heavy_options_run_on_several_sizes(size):
    transform = build_transforms(HEAVY, train=True, seed=0)
    for _ in range(3):
        out = transform(make_sample(size))
        assert out["image"].shape == (3, size, size) and out["mask"].shape == (1, size, size)
        assert_binary(out["mask"])


def test_bad_config_is_a_user_error():
    with pytest.raises(BrainsegError, match=r"augment\.gamma"):
        AugmentConfig(gamma=1.5)
    with pytest.raises(AugmentConfigError, match="p_geometric"):
        AugmentConfig(p_geometric=float("nan"))


def test_patches_are_cut_together_and_a_third_centred_on_tumour():
    size, side = 128, 32
    mask = torch.zeros(1, size, size)
    mask[:, 100:104, 10:14] = 1  # a small lesion far from the centre
    image = torch.full((3, size, size), 0.3)
    image[:, :8] = 0.0  # black rows are never patch centres
    image[1] = torch.maximum(image[1], mask[0])  # FLAIR carries the lesion, so the two can be compared
    transform = build_transforms(None, train=True, seed=0, patch_size=side)
    hits = 0
    for _ in range(200):
        out = transform({"image": image, "mask": mask, "patient": 7})
        assert out["image"].shape == (3, side, side) and out["mask"].shape == (1, side, side)
        assert out["patient"] == 7
        assert torch.equal(out["image"][1] == 1.0, out["mask"][0] == 1.0)
        hits += bool(out["mask"].any())
    # A uniform window holds the lesion about 7 % of the time; the third centred on tumour always do.
    assert 0.3 < hits / 200 < 0.7
    empty = transform({"image": image, "mask": torch.zeros(1, size, size)})  # no tumour, no warning
    assert empty["mask"].shape == (1, side, side) and not empty["mask"].any()


def test_patches_come_before_augmentation():
    out = build_transforms(HEAVY, train=True, seed=1, patch_size=48)(make_sample(64))
    assert out["image"].shape == (3, 48, 48)
    assert_binary(out["mask"])


def test_patch_larger_than_the_slice_is_refused():
    with pytest.raises(BrainsegError, match="patch_size"):
        DataConfig(image_size=128, patch_size=256)


def test_missing_sequence_copies_flair_over_contrast_in_both_patterns():
    config = AugmentConfig(geometric=False, hflip=False, p_missing_sequence=0.5)
    transform = build_transforms(config, train=True, seed=4)
    sample = make_sample()
    original = sample["image"].clone()
    patterns = {"none": 0, "post": 0, "both": 0}
    for _ in range(400):
        out = transform(sample)
        image = out["image"]
        assert torch.equal(image[1], original[1]) and torch.equal(out["mask"], sample["mask"])
        post, pre = torch.equal(image[2], original[1]), torch.equal(image[0], original[1])
        if not post:  # pre-contrast is never replaced alone
            assert torch.equal(image, original)
        patterns["both" if pre else "post" if post else "none"] += 1
    assert torch.equal(sample["image"], original)  # the caller's tensor is untouched
    assert 140 < patterns["none"] < 260 and patterns["post"] > 60 and patterns["both"] > 60


def test_missing_sequence_leaves_single_channel_images_alone():
    transform = build_transforms(AugmentConfig(p_missing_sequence=1.0, geometric=False, hflip=False),
                                 train=True, seed=0)
    image = torch.rand(1, 32, 32)
    assert torch.equal(transform({"image": image, "mask": torch.zeros(1, 32, 32)})["image"], image)


class _Slices(Dataset):
    def __init__(self, transform):
        self.transforms = {"train": transform}  # held in a dict: MONAI's own walker would miss it
        self.sample = make_sample(32)

    def __len__(self):
        return 4

    def __getitem__(self, index):
        return self.transforms["train"](self.sample)["image"]


def test_seed_worker_gives_distinct_reproducible_worker_streams():
    def epoch():
        torch.manual_seed(0)
        dataset = _Slices(build_transforms(HEAVY, train=True, seed=0))
        loader = DataLoader(dataset, batch_size=1, num_workers=2, worker_init_fn=seed_worker)
        return [batch[0] for batch in loader]  # items 0, 2 from worker 0; 1, 3 from worker 1

    first, again = epoch(), epoch()
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], first[1])  # first draws of the two workers differ


@settings(max_examples=25, deadline=None)
@given(
    rotation=st.floats(0, 45), shift=st.floats(0, 0.3), shear=st.floats(0, 30), zoom=st.floats(0, 0.5),
    hflip=st.booleans(), p_geometric=st.floats(0, 1), intensity=st.booleans(), gamma=st.floats(0, 0.9),
    noise=st.floats(0, 0.2), elastic=st.booleans(), seed=st.integers(0, 2**31 - 1),
)
def test_random_configs_keep_masks_binary_and_shapes(rotation, shift, shear, zoom, hflip, p_geometric,
                                                     intensity, gamma, noise, elastic, seed):
    config = AugmentConfig(rotation_deg=rotation, shift=shift, shear_deg=shear, zoom=zoom, hflip=hflip,
                           p_geometric=p_geometric, intensity=intensity, gamma=gamma, noise_std=noise,
                           elastic=elastic, p_elastic=1.0)
    out = build_transforms(config, train=True, seed=seed)(make_sample(32))
    assert out["image"].shape == (3, 32, 32) and out["mask"].shape == (1, 32, 32)
    assert_binary(out["mask"])
    assert out["image"].min() >= 0.0 and out["image"].max() <= 1.0
