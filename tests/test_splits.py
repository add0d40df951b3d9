"""Splits by patient: no leaks, stratification, folds, seeds, per-image splits, JSON round trip."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from brainseg.data.splits import (
    case_groups,
    load_split,
    patient_table,
    save_split,
    seen_patients,
    select,
    split_patients,
    validate_split,
)
from brainseg.errors import BadInputError, OptionError, SplitLeakError


def fake_index(voxels: list[int], slices: int = 4, layout: str = "kaggle_3m") -> pd.DataFrame:
    """An index table with one patient per entry of `voxels` (its tumour volume)."""
    rows = []
    for number, volume in enumerate(voxels):
        for s in range(1, slices + 1):
            pixels = volume // slices
            rows.append({"patient": f"P{number:03d}", "slice": s, "tumour_pixels": pixels,
                         "has_tumour": pixels > 0, "layout": layout})
    return pd.DataFrame(rows)


def sides(split: dict) -> list[set[str]]:
    return [set(split[side]) for side in ("train", "val", "test")]


def test_patient_table_size_classes():
    patients = patient_table(fake_index([0, 400, 800, 1200, 1600]))
    assert patients["size_class"].tolist() == ["none", "small", "small", "large", "large"]
    assert patients["slices"].tolist() == [4] * 5


def test_train_val_test_partition_is_seeded_and_stratified():
    table = fake_index([100 * (i + 1) for i in range(40)])
    split = split_patients(table, val=0.2, test=0.2, seed=3)
    train, val, test = sides(split)
    assert not (train & val or train & test or val & test)
    assert train | val | test == set(table["patient"])
    assert split["counts"] == {"train": 24, "val": 8, "test": 8}
    assert split == split_patients(table, val=0.2, test=0.2, seed=3)
    assert split != split_patients(table, val=0.2, test=0.2, seed=4)
    classes = patient_table(table)["size_class"]
    for side in ("val", "test"):  # stratified: half large, half small
        assert classes[split[side]].value_counts().to_dict() == {"large": 4, "small": 4}
    assert set(select(table, split, "val")["patient"]) == val


def test_folds_cover_every_non_test_patient_once():
    table = fake_index([0] * 3 + [100 * (i + 1) for i in range(27)])
    split = split_patients(table, test=0.1, folds=4, seed=0)
    test = set(split["test"])
    seen = []
    for fold in split["folds"]:
        assert not set(fold["train"]) & set(fold["val"])
        assert not (set(fold["train"]) | set(fold["val"])) & test
        assert set(fold["train"]) | set(fold["val"]) | test == set(table["patient"])
        seen += fold["val"]
    assert sorted(seen) == sorted(set(table["patient"]) - test)
    assert set(select(table, split, "train", fold=1)["patient"]) == set(split["folds"][1]["train"])


def test_fixed_test_patients():
    table = fake_index([100] * 10)
    split = split_patients(table, test_patients=["P001", "P007"], val=0.2)
    assert split["test"] == ["P001", "P007"]
    with pytest.raises(BadInputError, match="not in the data set: NOPE"):
        split_patients(table, test_patients=["NOPE"])


def test_images_masks_layout_splits_per_image():
    split = split_patients(fake_index([50] * 20, slices=1, layout="images_masks"), seed=1)
    assert split["unit"] == "image"


@pytest.mark.parametrize("seed", [-1, 2**32, 99999999999999999999])
def test_seeds_numpy_and_sklearn_cannot_take_are_refused(seed):
    with pytest.raises(OptionError, match=f"seed must be a whole number from 0 to 4294967295, got {seed}"):
        split_patients(fake_index([100] * 10), seed=seed)


@pytest.mark.parametrize("val, test", [(0.6, 0.5), (-0.1, 0.1), (0.0, 1.0)])
def test_impossible_fractions_are_refused(val, test):
    with pytest.raises(BadInputError, match="fractions"):
        split_patients(fake_index([100] * 10), val=val, test=test)


def test_save_load_round_trip_and_leak_detection(tmp_path):
    split = split_patients(fake_index([100 * i for i in range(12)]), seed=0)
    path = save_split(split, tmp_path / "split.json")
    assert load_split(path) == split
    leaked = dict(split, val=[*split["val"], split["train"][0]])
    path.write_text(json.dumps(leaked))
    with pytest.raises(SplitLeakError, match=f"patient {split['train'][0]} is in both train and val"):
        load_split(path)
    folds = {"test": ["A"], "folds": [{"train": ["B", "C"], "val": ["A"]}]}
    with pytest.raises(SplitLeakError, match="fold 0: patient A is in both val and test"):
        validate_split(folds)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(BadInputError, match="not valid JSON"):
        load_split(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"a": 1}')
    with pytest.raises(BadInputError, match="not a brainseg split"):
        load_split(tmp_path / "other.json")


PLAIN = {"train": ["A", "B"], "val": ["C"], "test": ["D"]}
KFOLD = {"test": ["D"], "folds": [{"train": ["A", "B"], "val": ["C"]}, {"train": ["A", "C"], "val": ["B"]}]}


@pytest.mark.parametrize(("split", "message"), [
    ({**PLAIN, "val": None}, "'val' must be a list of patient names, not null"),
    ({**PLAIN, "train": "TCGA_A"}, "'train' must be a list of patient names, not \"TCGA_A\""),
    ({**PLAIN, "train": [1, 2]}, "'train' must be a list of patient names"),
    ({**PLAIN, "test": {}}, "'test' must be a list of patient names, not {}"),
    ({**PLAIN, "refit_val": "C"}, "'refit_val' must be a list"),
    ({"train": ["A"], "val": []}, "no 'test'"),
    ({"train": ["A"], "test": []}, "no 'val'"),
    ({**KFOLD, "folds": "x"}, "'folds' must be a non-empty list of folds, not \"x\""),
    ({**KFOLD, "folds": []}, "'folds' must be a non-empty list"),
    ({**KFOLD, "folds": ["x"]}, "fold 0 must be an object"),
    ({**KFOLD, "folds": [{"train": ["A"]}]}, "fold 0 has no 'val'"),
    ({**KFOLD, "folds": [{"train": ["A"], "val": [3]}]}, "'fold 0 val' must be a list of patient names"),
    ({"folds": KFOLD["folds"]}, "no 'test'"),
    ([PLAIN], "not a brainseg split"),
])
def test_a_hand_edited_split_of_the_wrong_shape_is_one_error_naming_the_file_and_key(tmp_path, split,
                                                                                      message):
    path = tmp_path / "split.json"
    path.write_text(json.dumps(split))
    with pytest.raises(BadInputError, match=f"^{path}: .*" + message.replace("(", r"\(")):
        load_split(path)


def test_what_split_patients_and_a_refit_write_is_well_formed(tmp_path):
    table = fake_index([100 * i for i in range(12)])
    for split in (split_patients(table), split_patients(table, folds=3),
                  {**PLAIN, "train": ["A", "B", "C"], "val": [], "refit_val": ["C"]}, PLAIN, KFOLD):
        assert load_split(save_split(split, tmp_path / "split.json")) == split
    # A split made on another copy of the data may name patients missing here: evaluating the
    # patients present is legitimate, so unknown names are not an error.
    rows = select(table, {**PLAIN, "test": ["P000", "ELSEWHERE"]}, "test")
    assert rows["patient"].unique().tolist() == ["P000"]


def test_seen_patients_are_trained_or_validated_on():
    assert seen_patients(PLAIN) == {"A", "B", "C"}
    assert seen_patients({**PLAIN, "val": [], "refit_val": ["C"]}) == {"A", "B", "C"}
    assert seen_patients(KFOLD) == {"A", "B", "C"}  # fold unknown: every fold's
    assert seen_patients(KFOLD, 1) == {"A", "B", "C"}
    assert seen_patients({**KFOLD, "folds": [{"train": ["A"], "val": ["B"]}, {"train": ["C"], "val": []}]},
                         1) == {"C"}


@settings(max_examples=60, deadline=None)
@given(volumes=st.lists(st.integers(0, 5000), min_size=6, max_size=60),
       val=st.floats(0.05, 0.4), test=st.floats(0.0, 0.4), seed=st.integers(0, 10**6))
def test_any_split_partitions_patients_without_leaks(volumes, val, test, seed):
    if val + test >= 0.9:
        return
    table = fake_index(volumes)
    try:
        split = split_patients(table, val=val, test=test, seed=seed)
    except BadInputError:  # too few patients for these fractions is a legitimate refusal
        return
    train, val_set, test_set = sides(split)
    assert train and not (train & val_set or train & test_set or val_set & test_set)
    assert train | val_set | test_set == set(table["patient"])


def image_index(count: int, labels: list[str]) -> pd.DataFrame:
    """An images_masks index of images 1..count with a tumour type each (cycling through `labels`)."""
    return pd.DataFrame([{"patient": str(n), "slice": 1, "tumour_pixels": 10 * n, "has_tumour": True,
                          "layout": "images_masks", "label_name": labels[(n - 1) // 16 % len(labels)]}
                         for n in range(1, count + 1)])


@pytest.mark.parametrize("folds", [None, 3])
def test_index_blocks_never_straddle_a_split(folds):
    table = image_index(160, ["glioma", "meningioma"])
    split = split_patients(table, val=0.2, test=0.2, folds=folds, seed=1, group_by="index-block:16")
    assert split["grouped_by"] == "index-block:16" and split["stratified_by"].startswith("label_name")
    groups = [split, *split.get("folds", [])]
    for group in groups:
        sides = {side: {(int(n) - 1) // 16 for n in group.get(side, split["test"] if side == "test" else [])}
                 for side in ("train", "val", "test")}
        assert not sides["train"] & sides["val"] and not sides["train"] & sides["test"] \
            and not sides["val"] & sides["test"]
    everyone = set(split["test"]) | ({*split["train"], *split["val"]} if folds is None
                                     else {*split["folds"][0]["train"], *split["folds"][0]["val"]})
    assert everyone == {str(n) for n in range(1, 161)}


def test_a_fixed_test_image_takes_its_whole_block():
    split = split_patients(image_index(64, ["glioma"]), val=0.25, test=0, seed=0,
                           test_patients=["20"], group_by="index-block:16")
    assert split["test"] == sorted(str(n) for n in range(17, 33))


def test_group_by_a_column_and_bad_group_settings():
    table = image_index(40, ["a", "b"]).assign(group=lambda t: "g" + (t.index // 4).astype(str))
    split = split_patients(table, val=0.2, test=0.2, seed=0, group_by="column:group")
    by_image = dict(zip(table["patient"], table["group"], strict=True))
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not {by_image[n] for n in split[a]} & {by_image[n] for n in split[b]}
    with pytest.raises(BadInputError, match="no column 'nope'"):
        split_patients(table, group_by="column:nope")
    with pytest.raises(BadInputError, match="index-block:N or column:NAME"):
        split_patients(table, group_by="blocks")
    with pytest.raises(BadInputError, match="numeric image names"):
        split_patients(table.assign(patient="img" + table["patient"]), group_by="index-block:16")


def test_case_groups_for_the_bootstrap():
    assert case_groups(["3", "17"]) is None  # without a grouping, each case is its own unit
    assert case_groups(["3", "17", "18"], "index-block:16").tolist() == ["block1-16", "block17-32",
                                                                         "block17-32"]
    table = image_index(8, ["a", "b"]).assign(site=lambda t: "s" + (t.index // 4).astype(str))
    assert case_groups(["1", "5", "2"], "column:site", table).tolist() == ["s0", "s1", "s0"]
    with pytest.raises(BadInputError, match="'99' is not in the data set"):
        case_groups(["99"], "column:site", table)
