"""Checks on the real data in ../shared/data; each test skips where that folder is absent."""

from __future__ import annotations

import pytest

from brainseg.data.explore import explore
from brainseg.data.index import scan
from brainseg.data.splits import load_split, make_split, patient_table

pytestmark = pytest.mark.shared


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("shared-cache")


@pytest.fixture(autouse=True)
def reuse_cache_across_tests(isolated_cache, shared_cache, monkeypatch):
    """Decode the real data once per module rather than once per test."""
    monkeypatch.setenv("BRAINSEG_CACHE", str(shared_cache))


def test_lgg_counts(shared_data):
    result = scan(shared_data / "lgg")
    table = result.table
    assert result.layout == "kaggle_3m"
    assert result.report.ok, result.report.lines()
    assert table["patient"].nunique() == 75
    assert len(table) == 2662
    assert int(table["has_tumour"].sum()) == 943
    assert (table[["height", "width", "channels"]] == [256, 256, 3]).all().all()
    # Slice numbers run 1..N in numeric order within every patient.
    for _, slices in table.groupby("patient")["slice"]:
        assert slices.tolist() == list(range(1, len(slices) + 1))
    assert table["RNASeqCluster"].notna().any()  # data.csv joined


def test_figshare_counts(shared_data):
    result = scan(shared_data / "figshare")
    assert result.layout == "images_masks"
    assert len(result.table) == 240
    assert result.table["label_name"].value_counts().to_dict() == {
        "meningioma": 80, "glioma": 80, "pituitary": 80}


@pytest.mark.parametrize("options", [{"val": 0.15, "test": 0.15, "seed": 0},
                                     {"test": 0.1, "folds": 5, "seed": 1}])
def test_lgg_split_files_never_leak(shared_data, tmp_path, options):
    split = load_split(make_split(shared_data / "lgg", tmp_path / "split.json", **options) and
                       tmp_path / "split.json")
    everyone = set(patient_table(scan(shared_data / "lgg").table).index)
    groups = split.get("folds") or [split]
    for group in groups:
        train, val, test = set(group["train"]), set(group["val"]), set(split["test"])
        assert not (train & val or train & test or val & test)
        assert train | val | test == everyone


def test_figshare_split_is_per_image(shared_data, tmp_path):
    split = make_split(shared_data / "figshare", tmp_path / "split.json", seed=0)
    assert split["unit"] == "image"
    assert sum(split["counts"].values()) == 240


def test_explore_lgg_writes_summary_and_figures(shared_data, tmp_path):
    summary = explore(shared_data / "lgg", tmp_path / "explore")
    assert (summary["patients"], summary["slices"], summary["tumour_slices"]) == (75, 2662, 943)
    assert len(summary["intensity_per_channel"]) == 3
    for name in summary["figures"]:
        assert (tmp_path / "explore" / name).stat().st_size > 5000
