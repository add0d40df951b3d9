"""Shared fixtures: an isolated slice cache, small hand-made data trees, the shared data path."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("BRAINSEG_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Each test gets its own slice cache so that tests never see each other's files."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("BRAINSEG_CACHE", str(cache))
    return cache


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (a fresh clone has no ../shared/data)")
    return SHARED_DATA


def write_slice(folder: Path, patient: str, number: int, *, size: int = 32, lesion: int = 0,
                mask_name: str | None = None, seed: int = 0) -> tuple[Path, Path]:
    """One kaggle_3m pair: an RGB TIFF and a 0/255 mask with a `lesion`-pixel square."""
    rng = np.random.default_rng(seed + number)
    image = rng.integers(0, 200, (size, size, 3), dtype=np.uint8)
    mask = np.zeros((size, size), np.uint8)
    if lesion:
        side = int(np.sqrt(lesion))
        mask[2:2 + side, 2:2 + side] = 255
    folder.mkdir(parents=True, exist_ok=True)
    image_path = folder / f"{patient}_{number}.tif"
    mask_path = folder / (mask_name or f"{patient}_{number}_mask.tif")
    tifffile.imwrite(image_path, image)
    tifffile.imwrite(mask_path, mask)
    return image_path, mask_path


def make_kaggle_tree(root: Path, slices: dict[str, int], *, size: int = 32) -> Path:
    """Patients with `slices[name]` slices each; the middle third of each volume has a lesion."""
    for patient, count in slices.items():
        for number in range(1, count + 1):
            lesion = 16 if count // 3 < number <= 2 * count // 3 + 1 else 0
            write_slice(root / patient, patient, number, size=size, lesion=lesion)
    return root


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def tree_state(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root with its size and mtime, to prove nothing was written there."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


TINY_TRAINING = {"data.image_size": 64, "model.base_filters": 4, "model.depth": 3, "train.batch_size": 8,
                 "data.val": 0.34, "data.test": 0.0, "data.samples_per_epoch": 32,
                 "train.precision": "32-true", "train.epochs": 2}


def train_once(root: Path, data: Path, **overrides):
    """A TINY_TRAINING run of `data` in root/run, with its own slice cache (session fixtures run
    outside the per-test isolated cache)."""
    from brainseg.config import RunConfig
    from brainseg.training import train

    previous = os.environ.get("BRAINSEG_CACHE")
    os.environ["BRAINSEG_CACHE"] = str(root / "cache")
    try:
        config = RunConfig().override({**TINY_TRAINING, "data.root": str(data), **overrides})
        return train(config, root / "run", progress=False)
    finally:
        if previous is None:
            os.environ.pop("BRAINSEG_CACHE", None)
        else:
            os.environ["BRAINSEG_CACHE"] = previous


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """(data folder, run folder) of a 2-epoch model on 3 synthetic 64x64 patients, trained once."""
    from brainseg.data.synth import synthesize

    root = tmp_path_factory.mktemp("tiny-run")
    data = synthesize(root / "data", patients=3, seed=1, size=64, slices=(6, 8))
    return data, train_once(root, data).run_dir
