"""Indexing both layouts, every broken-pair check, the slice cache, and never writing into data."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
import tifffile

from brainseg.data.checks import Kind
from brainseg.data.index import check_dataset, ensure_outside, index_dataset, scan, write_index
from brainseg.data.io import read_image
from brainseg.errors import BadInputError, OptionError
from conftest import make_kaggle_tree, tree_state, write_png, write_slice

PATIENT_A = "TCGA_AA_0001_20000101"
PATIENT_B = "TCGA_BB_0002_20000202"


def kinds(result) -> dict[Kind, list]:
    found: dict[Kind, list] = {}
    for problem in result.report.problems:
        found.setdefault(problem.kind, []).append(problem)
    return found


def test_kaggle_layout_rows_order_and_metadata(tmp_path):
    root = make_kaggle_tree(tmp_path / "kaggle_3m", {PATIENT_A: 12, PATIENT_B: 3})
    (root / "data.csv").write_text("Patient,age_at_initial_pathologic\nTCGA_AA_0001,44\n")
    result = scan(root)
    table = result.table
    assert result.layout == "kaggle_3m"
    assert result.notes == ["layout: kaggle_3m (auto-detected)"]
    assert result.report.ok
    assert len(table) == 15
    a = table[table.patient == PATIENT_A]
    assert a["slice"].tolist() == list(range(1, 13))  # numeric order: 10 after 9
    assert a["image_path"].iloc[9].endswith(f"{PATIENT_A}_10.tif")
    assert {"height", "width", "channels", "tumour_pixels", "has_tumour"} <= set(table.columns)
    assert (table[["height", "width", "channels"]] == [32, 32, 3]).all().all()
    assert (table["has_tumour"] == (table["tumour_pixels"] > 0)).all()
    assert table.loc[table.has_tumour, "tumour_pixels"].eq(16).all()
    assert a["age_at_initial_pathologic"].eq(44).all()
    assert table.loc[table.patient == PATIENT_B, "age_at_initial_pathologic"].isna().all()


def test_kaggle_layout_found_one_level_down(tmp_path):
    make_kaggle_tree(tmp_path / "download" / "kaggle_3m", {PATIENT_A: 2})
    result = scan(tmp_path / "download")
    assert result.layout == "kaggle_3m"
    assert result.root == tmp_path / "download" / "kaggle_3m"
    assert len(result.table) == 2


def test_images_masks_layout_pairs_by_stem(tmp_path):
    rng = np.random.default_rng(0)
    write_png(tmp_path / "images" / "10.png", rng.integers(0, 255, (48, 40, 3), dtype=np.uint8))
    write_png(tmp_path / "images" / "2.png", rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    mask = np.zeros((48, 40), np.uint8)
    mask[5:10, 5:10] = 255
    write_png(tmp_path / "masks" / "10_mask.png", mask)
    write_png(tmp_path / "masks" / "2.png", np.zeros((32, 32), np.uint8))
    (tmp_path / "labels.csv").write_text("index,label,label_name\n2,1,meningioma\n10,3,pituitary\n")
    table = index_dataset(tmp_path)
    assert table.attrs["layout"] == "images_masks"
    assert table["patient"].tolist() == ["2", "10"]  # natural sort
    assert table["channels"].tolist() == [3, 3]
    assert table[["height", "width"]].values.tolist() == [[32, 32], [48, 40]]
    assert table["tumour_pixels"].tolist() == [0, 25]
    assert table["label_name"].tolist() == ["meningioma", "pituitary"]


def test_forced_layout_and_unknown_layout(tmp_path):
    make_kaggle_tree(tmp_path, {PATIENT_A: 2})
    assert scan(tmp_path, "kaggle_3m").notes == []
    with pytest.raises(BadInputError, match="unknown layout 'nifti'"):
        scan(tmp_path, "nifti")
    with pytest.raises(BadInputError, match="images/ and masks/"):
        scan(tmp_path, "images_masks")
    with pytest.raises(BadInputError, match="no usable image/mask pairs"):
        scan(tmp_path / PATIENT_A, "kaggle_3m")


@pytest.mark.parametrize("problem", ["missing", "not_a_dir", "no_layout"])
def test_unusable_roots_raise_one_clear_error(tmp_path, problem):
    root = tmp_path / "data"
    if problem == "not_a_dir":
        root.write_text("x")
    elif problem == "no_layout":
        (root / "something").mkdir(parents=True)
    with pytest.raises(BadInputError) as error:
        scan(root)
    assert str(root) in str(error.value)
    assert "\n" not in str(error.value)


def test_every_broken_case_is_reported_and_left_out(tmp_path):
    root = tmp_path / "kaggle_3m"
    make_kaggle_tree(root, {PATIENT_A: 9})
    folder = root / PATIENT_A
    (folder / f"{PATIENT_A}_2_mask.tif").unlink()  # image without mask
    (folder / f"{PATIENT_A}_3.tif").unlink()  # mask without image
    tifffile.imwrite(folder / f"{PATIENT_A}_4_mask.tif", np.zeros((16, 16), np.uint8))  # size
    levels = np.zeros((32, 32), np.uint8)
    levels[0, :3] = [0, 128, 255]
    tifffile.imwrite(folder / f"{PATIENT_A}_5_mask.tif", levels)  # three levels
    data = (folder / f"{PATIENT_A}_6.tif").read_bytes()
    (folder / f"{PATIENT_A}_6.tif").write_bytes(data[: len(data) // 2])  # truncated
    for suffix in ("", "_mask"):
        (folder / f"{PATIENT_A}_8{suffix}.tif").unlink()  # gap at 8
    write_slice(folder, PATIENT_A, 7, mask_name=f"{PATIENT_A}_07_mask.tif")  # duplicate mask
    (folder / "notes.txt").write_text("x")  # unrecognised
    (root / "TCGA_EMPTY_0000_20000101").mkdir()  # empty folder

    result = scan(root)
    found = kinds(result)
    assert set(found) == set(Kind) - {Kind.ODD_CHANNELS}  # that one has a test of its own
    assert found[Kind.MISSING_MASK][0].files == (f"{PATIENT_A}/{PATIENT_A}_2.tif",)
    assert found[Kind.MISSING_IMAGE][0].files == (f"{PATIENT_A}/{PATIENT_A}_3_mask.tif",)
    assert "image 32x32, mask 16x16" in found[Kind.SIZE_MISMATCH][0].detail
    assert found[Kind.MASK_LEVELS][0].detail == "3 distinct values"
    assert found[Kind.UNREADABLE][0].files == (f"{PATIENT_A}/{PATIENT_A}_6.tif",)
    assert "1 missing: 8" in found[Kind.SLICE_GAP][0].detail
    assert len(found[Kind.DUPLICATE_SLICE][0].files) == 3
    assert found[Kind.UNRECOGNISED][0].files == (f"{PATIENT_A}/notes.txt",)
    assert found[Kind.EMPTY_FOLDER][0].files == ("TCGA_EMPTY_0000_20000101",)
    # Only slices 1 and 9 are intact.
    assert result.table["slice"].tolist() == [1, 9]
    lines = result.report.lines()
    assert "image without mask: 1 (left out)" in lines
    assert "gaps in slice numbers: 1 (kept)" in lines


def test_broken_images_masks_pairs(tmp_path):
    write_png(tmp_path / "images" / "1.png", np.zeros((8, 8), np.uint8))
    write_png(tmp_path / "images" / "2.png", np.zeros((8, 8), np.uint8))
    write_png(tmp_path / "masks" / "2.png", np.zeros((8, 8), np.uint8))
    write_png(tmp_path / "masks" / "3.png", np.zeros((8, 8), np.uint8))
    (tmp_path / "images" / "4.png").write_bytes(b"not a png")
    write_png(tmp_path / "masks" / "4.png", np.zeros((8, 8), np.uint8))
    found = kinds(scan(tmp_path))
    assert found[Kind.MISSING_MASK][0].files == ("images/1.png",)
    assert found[Kind.MISSING_IMAGE][0].files == ("masks/3.png",)
    assert found[Kind.UNREADABLE][0].files == ("images/4.png",)


def test_an_rgba_image_among_greyscale_ones_is_left_out_by_name_cached_or_not(tmp_path):
    """check --strict and training see the same data set: the odd image is a problem, not a crash later."""
    rng = np.random.default_rng(0)
    for i in range(5):
        write_png(tmp_path / "images" / f"{i}.png", rng.integers(0, 255, (16, 16), dtype=np.uint8))
        write_png(tmp_path / "masks" / f"{i}.png", np.pad(np.full((4, 4), 255, np.uint8), 6))
    write_png(tmp_path / "images" / "2.png", rng.integers(0, 255, (16, 16, 4), dtype=np.uint8))  # RGBA
    for _ in range(2):  # decoded, then from the cache
        result = scan(tmp_path)
        odd = kinds(result)[Kind.ODD_CHANNELS]
        assert [p.files for p in odd] == [("images/2.png",)] and "3 channel(s) where 4 of 5" in odd[0].detail
        names = sorted(result.table["image_path"].map(lambda p: p.split("/")[-1]))
        assert names == ["0.png", "1.png", "3.png", "4.png"]
        assert set(result.table["channels"]) == {1}


def test_strict_cli_exits_non_zero_and_default_warns(tmp_path):
    from typer.testing import CliRunner

    from brainseg.cli import app

    root = make_kaggle_tree(tmp_path / "data", {PATIENT_A: 3})
    (root / PATIENT_A / f"{PATIENT_A}_2_mask.tif").unlink()
    runner = CliRunner()
    ok = runner.invoke(app, ["index", str(root), "--out", str(tmp_path / "index.csv")])
    assert ok.exit_code == 0, ok.output
    assert "image without mask: 1 (left out)" in ok.output
    assert len(pd.read_csv(tmp_path / "index.csv")) == 2
    problems = pd.read_csv(tmp_path / "index_problems.csv")
    assert problems["kind"].tolist() == ["image without mask"]
    strict = runner.invoke(app, ["index", str(root), "--out", str(tmp_path / "i.csv"), "--strict"])
    assert strict.exit_code == 1
    assert runner.invoke(app, ["check", str(root), "--strict"]).exit_code == 1


def test_nothing_is_written_into_the_data_folder(tmp_path):
    from brainseg.data.explore import explore
    from brainseg.data.splits import make_split

    root = make_kaggle_tree(tmp_path / "data", {PATIENT_A: 6, PATIENT_B: 6, "TCGA_CC_0003_20000303": 6})
    before = tree_state(root)
    write_index(root, tmp_path / "out" / "index.csv")
    make_split(root, tmp_path / "out" / "split.json", val=0.34, test=0.0)
    explore(root, tmp_path / "out" / "explore", samples=2)
    assert tree_state(root) == before
    for write in (lambda: write_index(root, root / "index.csv"),
                  lambda: explore(root, root / PATIENT_A / "explore"),
                  lambda: make_split(root, root / "split.json")):
        with pytest.raises(BadInputError, match="inside the data folder"):
            write()
    assert tree_state(root) == before
    assert ensure_outside(tmp_path / "elsewhere.csv", root) == tmp_path / "elsewhere.csv"


@pytest.mark.parametrize("options, message", [
    ({"samples": 0}, "samples .* must be at least 1, got 0"),
    ({"samples": -5}, "samples .* must be at least 1, got -5"),
    ({"seed": -1}, "seed must be a whole number from 0 to 4294967295, got -1"),
    ({"seed": 2**32}, "seed must be a whole number"),
])
def test_explore_refuses_bad_options_before_writing(tmp_path, options, message):
    from brainseg.data.explore import explore

    root = make_kaggle_tree(tmp_path / "data", {PATIENT_A: 2})
    with pytest.raises(OptionError, match=message):
        explore(root, tmp_path / "explore", **options)
    assert not (tmp_path / "explore").exists()


def test_cache_is_reused_and_rebuilt_when_a_file_changes(tmp_path, isolated_cache):
    root = make_kaggle_tree(tmp_path / "data", {PATIENT_A: 4})
    first = scan(root)
    assert not first.from_cache
    second = scan(root)
    assert second.from_cache
    pd.testing.assert_frame_equal(first.table, second.table)
    image_path = root / PATIENT_A / f"{PATIENT_A}_2.tif"
    np.testing.assert_array_equal(second.store.image(str(image_path)), read_image(image_path))
    assert not list(root.rglob("*.u8")) and list(isolated_cache.rglob("images.u8"))

    # Same size, new content and mtime: the cache must notice.
    new_mask = np.full((32, 32), 255, np.uint8)
    tifffile.imwrite(root / PATIENT_A / f"{PATIENT_A}_2_mask.tif", new_mask)
    stat = (root / PATIENT_A / f"{PATIENT_A}_2_mask.tif").stat()
    os.utime(root / PATIENT_A / f"{PATIENT_A}_2_mask.tif", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    third = scan(root)
    assert not third.from_cache
    assert third.table.loc[third.table.slice == 2, "tumour_pixels"].item() == 32 * 32
    assert third.store.mask(str(image_path)).all()

    write_slice(root / PATIENT_A, PATIENT_A, 5)  # a new slice
    assert len(scan(root).table) == 5


def test_two_processes_writing_one_cache_both_keep_a_readable_store(tmp_path, isolated_cache,
                                                                    monkeypatch):
    """Two jobs started together on new data both build the cache; neither may fail or lose its slices."""
    from brainseg.data import cache

    root = make_kaggle_tree(tmp_path / "data", {PATIENT_A: 3})
    directory = cache.cache_dir_for(root, "kaggle_3m")
    image = np.full((32, 32, 3), 7, np.uint8)
    mask = np.ones((32, 32), np.uint8)
    writers = []
    for pid in (101, 102):  # as if from two processes: each stages in its own folder
        with monkeypatch.context() as patch:
            patch.setattr(cache.os, "getpid", lambda pid=pid: pid)
            writer = cache.StoreWriter(directory)
        writer.add(image + pid % 2, mask)
        writers.append(writer)
    first = writers[0].finish(["a.tif"], {"fingerprint": "x"})
    second = writers[1].finish(["a.tif"], {"fingerprint": "x"})  # replaces the folder `first` maps
    assert first.image("a.tif")[0, 0, 0] == 8 and second.image("a.tif")[0, 0, 0] == 7
    assert cache.read_manifest(directory) is not None
    assert [p.name for p in isolated_cache.iterdir()] == [directory.name]  # no staging folder left

    scan(root)  # a scan that builds the cache writes its index inside it before it appears
    assert (directory / "index.csv").exists() and scan(root).from_cache


def test_without_cache_nothing_is_cached(tmp_path, isolated_cache):
    root = make_kaggle_tree(tmp_path / "data", {PATIENT_A: 3})
    result = scan(root, cache=False)
    assert not list(isolated_cache.iterdir())
    stacked = result.store.stacked()
    assert stacked is not None
    images, masks = stacked
    assert images.shape == (3, 32, 32, 3) and masks.shape == (3, 32, 32)
    assert set(np.unique(masks)) <= {0, 1}


def test_explore_names_patients_with_a_copied_channel():
    import numpy as np
    import pandas as pd

    from brainseg.data.explore import identical_channels

    rng = np.random.default_rng(0)
    images = {}
    for patient in ("A", "B"):
        for number in range(3):
            image = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
            if patient == "B":
                image[..., 2] = image[..., 1]  # post-contrast missing, FLAIR copied in, in every slice
            images[f"{patient}/{number}"] = image
    images["A/0"][..., 0] = images["A/0"][..., 1]  # equal in one slice only: not a copied sequence

    class Store:
        def image(self, key):
            return images[key]

    table = pd.DataFrame({"patient": [k.split("/")[0] for k in images], "image_path": list(images)})
    assert identical_channels(table, Store()) == {"B": ["1=2"]}


def test_a_data_set_with_no_readable_pair_is_refused_but_still_checked(tmp_path):
    root = make_kaggle_tree(tmp_path / "data", {PATIENT_A: 3})
    for image in root.rglob("*.tif"):
        image.write_bytes(b"")
    with pytest.raises(BadInputError, match=r"no readable image/mask pair: all 3 have problems"):
        scan(root)
    with pytest.raises(BadInputError, match="no readable"):
        index_dataset(root)
    assert len(check_dataset(root).problems) >= 3  # checking still lists what is wrong


def test_symbolic_link_loops_are_one_line_errors(tmp_path):
    root = make_kaggle_tree(tmp_path / "data", {PATIENT_A: 2})
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(BadInputError, match="link loop"):
        scan(loop)
    with pytest.raises(BadInputError, match="link loop"):
        ensure_outside(loop / "out.csv", root)
    with pytest.raises(BadInputError, match="link loop"):
        ensure_outside(tmp_path / "out.csv", loop)
