"""Splits by patient (never by slice), stratified by tumour volume, saved as JSON.

Layouts without patient ids (images_masks) are split per image, and the split says so.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd

from brainseg.config import check_seed
from brainseg.data.index import ensure_outside, scan
from brainseg.errors import BadInputError, SplitLeakError

SPLIT_FORMAT = "brainseg-split/1"
SIDES = ("train", "val", "test")


def patient_table(table: pd.DataFrame) -> pd.DataFrame:
    """One row per patient: slices, tumour slices, tumour voxels and a size class.

    A patient's volume is 'large' when its tumour voxels reach the median of the patients
    with a tumour, 'small' below it, and 'none' without a tumour.
    """
    patients = table.groupby("patient", sort=True).agg(
        slices=("slice", "size"), tumour_slices=("has_tumour", "sum"),
        tumour_voxels=("tumour_pixels", "sum"))
    with_tumour = patients["tumour_voxels"] > 0
    median = patients.loc[with_tumour, "tumour_voxels"].median() if with_tumour.any() else 0
    by_size = np.where(patients["tumour_voxels"] >= median, "large", "small")
    patients["size_class"] = np.where(with_tumour, by_size, "none")
    return patients


SCORED_PER = {"patient": "per patient volume", "image": "per image"}  # how the headline Dice is taken
SIZE_UNIT = {"patient": "voxels", "image": "pixels"}  # what a tumour's size is counted in
DETECTED_PER = {"patient": "slice", "image": "image"}  # what tumour detection is scored on
# history.csv's column of the validation Dice that picks the best epoch, named for what it averages
VALIDATION_SCORE = {"patient": "val_patient_dice", "image": "val_image_dice"}


def validation_score_column(history) -> str | None:
    """The column of a history table that holds its validation Dice per case, if it has one."""
    return next((column for column in VALIDATION_SCORE.values() if column in history), None)


def case_groups(cases, group_by: str = "", table: pd.DataFrame | None = None) -> np.ndarray | None:
    """The bootstrap's resampling unit for each case (a patient or image name): its group with
    `group_by` (as units_of, e.g. index-block:16), or None (each case alone) without it. A
    column:NAME group is looked up in `table`, the data set's index."""
    if not group_by:
        return None
    cases = [str(case) for case in cases]
    if table is None:
        table = pd.DataFrame({"patient": cases})
    group_of = dict(zip(table["patient"].astype(str), units_of(table, group_by), strict=True))
    unknown = [case for case in cases if case not in group_of]
    if unknown:
        raise BadInputError("--group-by", f"{unknown[0]!r} is not in the data set's index")
    return np.array([group_of[case] for case in cases])


def drawn_over(unit: str, group_by: str = "") -> str:
    """What intervals are drawn over, in words: 'images', or 'groups of images (index-block:16)'."""
    return f"groups of {unit}s ({group_by})" if group_by else f"{unit}s"


def split_unit(table: pd.DataFrame) -> str:
    layouts = set(table["layout"]) if "layout" in table else {"kaggle_3m"}
    return "image" if layouts == {"images_masks"} else "patient"


LABEL_COLUMN = "label_name"  # tumour type, joined from labels.csv where a data set has one


def units_of(table: pd.DataFrame, group_by: str = "") -> pd.Series:
    """The unit each row is split by: its patient, or with `group_by` a group of patients (images):
    'index-block:N' puts image N... in blocks of N consecutive indices (1-16, 17-32, ... for N=16),
    since neighbouring indices of a published set are mostly one patient; 'column:NAME' takes a
    column of the index (e.g. a `group` column of labels.csv)."""
    patients = table["patient"].astype(str)
    if not group_by:
        return patients
    kind, _, value = group_by.partition(":")
    if kind == "index-block" and value.isdigit() and int(value) > 0:
        size = int(value)
        numbers = pd.to_numeric(patients, errors="coerce")
        if numbers.isna().any():
            raise BadInputError("--group-by", f"index-block needs numeric image names; "
                                              f"{patients[numbers.isna()].iloc[0]!r} is not a number")
        first = (numbers.astype("int64") - 1) // size * size + 1
        return "block" + first.astype(str) + "-" + (first + size - 1).astype(str)
    if kind == "column" and value:
        if value not in table:
            raise BadInputError("--group-by", f"the index has no column {value!r} (columns come from "
                                              "labels.csv or data.csv)")
        return table[value].astype(str)
    raise BadInputError("--group-by", f"must be index-block:N or column:NAME, not {group_by!r}")


def split_patients(table: pd.DataFrame, *, val: float = 0.15, test: float = 0.15,
                   folds: int | None = None, seed: int = 0,
                   test_patients: Sequence[str] = (), group_by: str = "") -> dict:
    """Split the patients of an index table into train/val/test or k folds plus a test set.

    `test_patients` fixes the test set (the other `test` fraction is then ignored). With `folds`,
    the non-test patients are divided into k stratified folds, each with its own train and val.
    With `group_by` (see `units_of`) whole groups go to one side, and a test patient takes its group.
    Strata are the tumour type where the index has one (labels.csv), else the tumour volume.
    """
    # scikit-learn here, not at the top: every command imports this module, few make a split
    from sklearn.model_selection import KFold, StratifiedKFold, train_test_split

    seed = check_seed(seed)
    unknown = sorted(set(test_patients) - set(table["patient"].astype(str)))
    if unknown:
        raise BadInputError("test patients", f"not in the data set: {', '.join(unknown)}")
    unit_of_row = units_of(table, group_by)
    units = patient_table(table.assign(patient=unit_of_row))
    names = units.index.to_numpy(dtype=str)
    members = table.assign(unit=unit_of_row).groupby("unit")["patient"].agg(
        lambda p: sorted(set(p.astype(str))))
    if not 0 <= val < 1 or not 0 <= test < 1 or val + test >= 1:
        raise BadInputError("split", f"fractions val={val} and test={test} must be in [0, 1) "
                                     "and leave patients for training")
    if LABEL_COLUMN in table:
        labels = table.assign(unit=unit_of_row).groupby("unit")[LABEL_COLUMN].agg(
            lambda v: v.astype(str).mode().iloc[0])
        strata, stratified_by = _strata(labels.reindex(names)), f"{LABEL_COLUMN} (tumour type)"
    else:
        strata = _strata(units["size_class"])
        stratified_by = "tumour volume: none/small/large (median of tumour patients)"
    split: dict = {"format": SPLIT_FORMAT, "unit": split_unit(table), "seed": seed,
                   "stratified_by": stratified_by}
    if group_by:
        split["grouped_by"] = group_by
    fixed_test = table["patient"].astype(str).isin(test_patients)
    test_patients = sorted(set(unit_of_row[fixed_test]))

    if test_patients:
        test_names = sorted(test_patients)
    elif test > 0:
        _, test_names = _draw(names, strata, test, seed, train_test_split)
    else:
        test_names = []
    rest_mask = ~np.isin(names, test_names)
    rest, rest_strata = names[rest_mask], strata[rest_mask]
    split["test"] = sorted(test_names)

    if folds:
        if folds < 2 or folds > len(rest):
            raise BadInputError("split", f"folds must be between 2 and {len(rest)} (the patients "
                                         "left after the test set)")
        counts = pd.Series(rest_strata).value_counts()
        splitter = (StratifiedKFold(folds, shuffle=True, random_state=seed) if counts.min() >= folds
                    else KFold(folds, shuffle=True, random_state=seed))
        split["folds"] = [{"train": sorted(rest[train]), "val": sorted(rest[val_idx])}
                          for train, val_idx in splitter.split(rest, rest_strata)]
        split["fractions"] = {"test": len(test_names) / len(names), "folds": folds}
    else:
        val_share = val / (1 - len(test_names) / len(names)) if len(rest) else 0
        train_names, val_names = (_draw(rest, rest_strata, val_share, seed, train_test_split)
                                  if val > 0 else (rest, np.array([], dtype=str)))
        split["train"], split["val"] = sorted(train_names), sorted(val_names)
        split["fractions"] = {side: len(split[side]) / len(names) for side in SIDES}
    if group_by:  # back from groups to the patients (images) in them
        for group in [split, *split.get("folds", [])]:
            for side in SIDES:
                if side in group:
                    group[side] = sorted(p for unit in group[side] for p in members[unit])
    split["counts"] = _counts(split)
    validate_split(split)
    return split


def _strata(classes: pd.Series) -> np.ndarray:
    """Merge a class too small to stratify (fewer than 2 members) into its neighbour (small and
    large into each other, any other into the commonest class)."""
    strata = classes.to_numpy(dtype=str).copy()
    counts = pd.Series(strata).value_counts()
    for rare in counts[counts < 2].index:
        if rare in ("small", "large", "none"):
            strata[strata == rare] = "small" if rare != "small" else "large"
        elif len(counts) > 1:
            strata[strata == rare] = next(c for c in counts.index if c != rare)
    return strata


def _draw(names: np.ndarray, strata: np.ndarray, fraction: float, seed: int, splitter):
    """Draw a stratified share of names; fall back to a plain draw when strata are too thin."""
    count = max(1, round(fraction * len(names)))
    if count >= len(names):
        raise BadInputError("split", f"too few patients ({len(names)}) for the requested fractions")
    try:
        kept, drawn = splitter(names, test_size=count, random_state=seed, stratify=strata)
    except ValueError:
        kept, drawn = splitter(names, test_size=count, random_state=seed)
    return np.asarray(kept, dtype=str), np.asarray(drawn, dtype=str)


def _counts(split: dict) -> dict:
    if "folds" in split:
        folds = [{"train": len(fold["train"]), "val": len(fold["val"])} for fold in split["folds"]]
        return {"test": len(split["test"]), "folds": folds}
    return {side: len(split[side]) for side in SIDES}


LISTS = (*SIDES, "refit_val")


def check_structure(split, source: str = "split") -> None:
    """Raise BadInputError naming `source` and the key when a split is not shaped as split_patients
    and refit_split write it: a plain split has train, val and test; a k-fold split has test and a
    non-empty list of folds, each with train and val; every side is a list of patient names."""
    def names(value, key: str) -> None:
        if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
            raise BadInputError(source, f"{key!r} must be a list of patient names, "
                                        f"not {_shown(value)}")

    if not isinstance(split, dict):
        raise BadInputError(source, "not a brainseg split (a JSON object with 'train'/'val'/'test' "
                                    "or 'test'/'folds')")
    required = ("test", "folds") if "folds" in split else SIDES
    missing = [key for key in required if key not in split]
    if missing:
        raise BadInputError(source, f"not a brainseg split: no {missing[0]!r} (a split has "
                                    f"{', '.join(map(repr, required))})")
    for key in LISTS:
        if key in split:
            names(split[key], key)
    if "folds" in split:
        folds = split["folds"]
        if not isinstance(folds, list) or not folds:
            raise BadInputError(source, f"'folds' must be a non-empty list of folds, not {_shown(folds)}")
        for number, fold in enumerate(folds):
            if not isinstance(fold, dict):
                raise BadInputError(source, f"fold {number} must be an object with 'train' and 'val', "
                                            f"not {_shown(fold)}")
            for side in ("train", "val"):
                if side not in fold:
                    raise BadInputError(source, f"fold {number} has no {side!r}")
                names(fold[side], f"fold {number} {side}")


def _shown(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def seen_patients(split: dict, fold: int | None = None,
                  keys: Sequence[str] = ("train", "val", "refit_val")) -> set[str]:
    """Patients a model trained on this split learnt from or was selected on (train, val, refit_val;
    `keys` picks some): those of `fold` for a k-fold run, else of the split and all its folds (the
    safe side when the fold is unknown). compare and evaluate refuse to call these patients unseen."""
    groups = [split, split["folds"][fold]] if fold is not None and split.get("folds") else \
        [split, *split.get("folds", [])]
    return {name for group in groups for key in keys for name in group.get(key, [])}


def validate_split(split: dict, source: str = "split") -> None:
    """Raise BadInputError for a malformed split and SplitLeakError when any patient stands on two
    sides of a split or fold."""
    check_structure(split, source)
    groups = [("", {side: split.get(side, []) for side in SIDES if side in split})]
    for number, fold in enumerate(split.get("folds", [])):
        groups.append((f"fold {number}: ", {"train": fold.get("train", []),
                                            "val": fold.get("val", []),
                                            "test": split.get("test", [])}))
    for prefix, sides in groups:
        for side, names in sides.items():
            repeated = sorted({n for n in names if list(names).count(n) > 1})
            if repeated:
                raise SplitLeakError(f"{source}: {prefix}{repeated[0]} is listed twice in {side}")
        for (side_a, a), (side_b, b) in combinations(sides.items(), 2):
            both = sorted(set(a) & set(b))
            if both:
                more = f" and {len(both) - 1} more" if len(both) > 1 else ""
                raise SplitLeakError(f"{source}: {prefix}patient {both[0]}{more} is in both "
                                     f"{side_a} and {side_b}")


def save_split(split: dict, path: str | Path) -> Path:
    validate_split(split)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(split, indent=2) + "\n")
    return path


def load_split(path: str | Path) -> dict:
    """Read a split JSON and check that it leaks no patient across sides."""
    path = Path(path)
    try:
        split = json.loads(path.read_text())
    except OSError as error:
        raise BadInputError(path, f"cannot read split ({error.strerror})") from None
    except ValueError as error:
        raise BadInputError(path, f"not valid JSON ({error})") from None
    validate_split(split, str(path))
    return split


def select(table: pd.DataFrame, split: dict, side: str, fold: int | None = None) -> pd.DataFrame:
    """Rows of the table whose patient is on `side` of the split (or of one of its folds)."""
    names = split["folds"][fold][side] if fold is not None and side != "test" else split[side]
    return table[table["patient"].isin(set(names))]


def make_split(root: str | Path, out: str | Path, *, layout: str = "auto", **options) -> dict:
    """Index a data set, split it with `split_patients` and save the split as JSON."""
    ensure_outside(out, root)
    result = scan(root, layout)
    split = split_patients(result.table, **options)
    split["data"] = {"root": str(result.root), "layout": result.layout}
    save_split(split, ensure_outside(out, result.root))
    return split
