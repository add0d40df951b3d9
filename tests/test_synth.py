"""Tests for brainseg.data.synth: layouts, mask/image contract, contrast, determinism."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from brainseg.data.synth import LABEL_NAMES, synthesize
from brainseg.errors import BadInputError, OptionError

FOLDER_RE = re.compile(r"TCGA_SY_\d{4}_\d{8}")


def _slices(folder: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """(image, mask) pairs of one kaggle_3m patient folder, in slice order."""
    n = len(list(folder.glob("*_mask.tif")))
    return [
        (
            tifffile.imread(folder / f"{folder.name}_{k}.tif"),
            tifffile.imread(folder / f"{folder.name}_{k}_mask.tif"),
        )
        for k in range(1, n + 1)
    ]


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def kaggle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Default size and slice range; fewer patients to stay fast.
    return synthesize(tmp_path_factory.mktemp("synth") / "lgg", patients=3, seed=1)


def test_kaggle_layout(kaggle: Path) -> None:
    folders = sorted(p for p in kaggle.iterdir() if p.is_dir())
    assert len(folders) == 3
    for folder in folders:
        assert FOLDER_RE.fullmatch(folder.name), folder.name
        images = {p.name for p in folder.glob("*.tif") if not p.name.endswith("_mask.tif")}
        masks = {p.name for p in folder.glob("*_mask.tif")}
        numbers = sorted(int(name[: -len(".tif")].rsplit("_", 1)[1]) for name in images)
        assert 16 <= len(numbers) <= 24
        assert numbers == list(range(1, len(numbers) + 1))
        assert masks == {name.replace(".tif", "_mask.tif") for name in images}


def test_kaggle_arrays(kaggle: Path) -> None:
    with_lesion = without = 0
    for folder in sorted(p for p in kaggle.iterdir() if p.is_dir()):
        flags = []
        for img, mask in _slices(folder):
            assert img.shape == (256, 256, 3) and img.dtype == np.uint8
            assert mask.shape == (256, 256) and mask.dtype == np.uint8
            assert set(np.unique(mask).tolist()) <= {0, 255}
            flags.append(bool(mask.any()))
        # Every patient has one lesion over a contiguous run of slices, not touching the ends.
        idx = np.flatnonzero(flags)
        assert idx.size > 0
        assert np.all(np.diff(idx) == 1)
        assert not flags[0] and not flags[-1]
        with_lesion += int(sum(flags))
        without += len(flags) - int(sum(flags))
    assert with_lesion > 0
    assert without >= 0.3 * (with_lesion + without)


def test_data_csv(kaggle: Path) -> None:
    with open(kaggle / "data.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["Patient", "age_at_initial_pathologic", "gender"]
    folders = sorted(p.name for p in kaggle.iterdir() if p.is_dir())
    assert [r["Patient"] for r in rows] == [name.rsplit("_", 1)[0] for name in folders]


def test_lesion_contrast(kaggle: Path) -> None:
    checked = 0
    for folder in sorted(p for p in kaggle.iterdir() if p.is_dir()):
        for img, mask in _slices(folder):
            lesion = mask > 0
            if lesion.sum() < 30:  # tiny end-of-lesion sections are mostly partial volume
                continue
            flair = img[..., 1].astype(float)
            # Brain outside the lesion: mid-grey FLAIR (excludes background, CSF and scalp).
            brain = ~lesion & (flair > 35) & (flair < 140)
            assert flair[lesion].mean() - flair[brain].mean() > 30
            # Pre-contrast: the lesion is darker than the brain around it.
            pre = img[..., 0].astype(float)
            assert pre[lesion].mean() < pre[brain].mean()
            checked += 1
    assert checked >= 3


def test_lesion_sizes_vary(tmp_path: Path) -> None:
    out = synthesize(tmp_path / "d", patients=6, seed=3, size=128, slices=(8, 10))
    areas = [
        max(int((m > 0).sum()) for _, m in _slices(folder))
        for folder in sorted(p for p in out.iterdir() if p.is_dir())
    ]
    assert max(areas) > 2 * min(areas)


def test_size_option(tmp_path: Path) -> None:
    out = synthesize(tmp_path / "d", patients=1, size=128, slices=(5, 5))
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    img, mask = _slices(folder)[0]
    assert img.shape == (128, 128, 3) and mask.shape == (128, 128)
    assert len(_slices(folder)) == 5


def test_deterministic(tmp_path: Path) -> None:
    kw = {"patients": 2, "size": 128, "slices": (4, 6)}
    a = _tree(synthesize(tmp_path / "a", seed=7, **kw))
    b = _tree(synthesize(tmp_path / "b", seed=7, **kw))
    c = _tree(synthesize(tmp_path / "c", seed=8, **kw))
    assert a == b
    assert a != c


def test_images_masks_layout(tmp_path: Path) -> None:
    kw = {"patients": 4, "seed": 5, "size": 128, "slices": (4, 6)}
    out = synthesize(tmp_path / "fig", layout="images_masks", **kw)
    images = {p.stem: p for p in (out / "images").glob("*.png")}
    masks = {p.stem: p for p in (out / "masks").glob("*.png")}
    assert images.keys() == masks.keys()
    assert sorted(int(s) for s in images) == list(range(1, len(images) + 1))
    for stem, path in images.items():
        with Image.open(path) as im, Image.open(masks[stem]) as m:
            assert im.mode == "L" and m.mode == "L"
            assert im.size == m.size == (128, 128)
            assert set(np.unique(np.asarray(m)).tolist()) <= {0, 255}
    with open(out / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["index", "label", "label_name"]
    assert sorted(int(r["index"]) for r in rows) == sorted(int(s) for s in images)
    assert {int(r["label"]) for r in rows} <= {1, 2, 3}
    assert all(r["label_name"] == LABEL_NAMES[int(r["label"]) - 1] for r in rows)

    # Same seed, other layout: the PNGs are the FLAIR channel of the same volumes.
    lgg = synthesize(tmp_path / "lgg", **kw)
    folders = sorted(p for p in lgg.iterdir() if p.is_dir())
    flair = [img[..., 1] for folder in folders for img, _ in _slices(folder)]
    assert len(flair) == len(images)
    assert np.array_equal(np.asarray(Image.open(images["1"])), flair[0])


def test_refuses_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(BadInputError, match="not empty"):
        synthesize(tmp_path, patients=1, size=64)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_accepts_empty_existing_folder(tmp_path: Path) -> None:
    assert synthesize(tmp_path, patients=1, size=64, slices=(3, 3)) == tmp_path
    assert (tmp_path / "data.csv").is_file()


@pytest.mark.parametrize(
    "kwargs, message",
    [({"size": 32}, "size must be from 64 to 1024"), ({"size": 100_000}, "size must be from 64 to 1024"),
     ({"layout": "nifti"}, "layout"), ({"patients": 0}, "patients"), ({"slices": (6, 4)}, "slices"),
     ({"seed": -1}, "seed must be a whole number from 0 to 4294967295"), ({"seed": 2**32}, "seed")],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(OptionError, match=message):
        synthesize(tmp_path / "d", **kwargs)
    assert not (tmp_path / "d").exists()


def test_progress_goes_to_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    synthesize(tmp_path / "d", patients=2, size=64, slices=(3, 4), progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 2
