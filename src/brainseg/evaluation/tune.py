"""Measure post-processing and test-time options on validation patients, and choose the model's own.

Probabilities are computed once per patient (with and without flip TTA); every combination of
threshold, largest 3D component and minimum component size is then scored from them.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd

from brainseg.data.index import ensure_outside, scan
from brainseg.data.splits import case_groups, drawn_over, split_unit
from brainseg.errors import BadInputError
from brainseg.evaluation.bootstrap import paired_change
from brainseg.evaluation.crossval import check_folds
from brainseg.evaluation.evaluate import EvaluateOptions, select_rows
from brainseg.evaluation.postprocess import components, kept_components
from brainseg.inference import Predictor
from brainseg.metrics import Counts, dice
from brainseg.progress import progress as progress_bar
from brainseg.runs.folder import SPLIT_FILE, check_unseen, resolve_model_path, run_folder_of, split_for
from brainseg.runs.model_file import store_settings
from brainseg.runs.pretrained import is_pretrained

THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.2, 0.81, 0.05))
MIN_SIZES = (0, 20, 100)
# Which components survive: (largest only, minimum share of the largest). A share keeps every part of a
# multifocal tumour that the largest component alone would drop.
COMPONENTS = ((False, 0.0), (False, 0.1), (False, 0.25), (False, 0.5), (True, 0.0))


def tune(model: str | Path | list, data: str | Path, out: str | Path, *, side: str = "val",
         split_file: str = "", layout: str = "auto", store: bool = False, group_by: str = "",
         progress: bool = True) -> dict:
    """Write tuning.csv (every combination) and tuning.json (each option alone, and the best).

    `model` is one model, scored on the `side` patients of its split, or a list of the runs of a
    k-fold split, each scored on its own fold's validation patients and pooled (out of fold). The
    intervals are drawn over patients (images), or over groups of them with `group_by` (as
    `brainseg split --group-by`, e.g. index-block:16 for Figshare images)."""
    folds = isinstance(model, (list, tuple))
    if folds and len(model) == 1:
        model, folds = model[0], False
    if side == "test":  # choosing on test patients would leak them into model selection
        raise BadInputError("--split", "tuning on the test patients would leak them into model selection")
    if store and (folds or is_pretrained(model)):
        raise BadInputError("--store", "takes one model file that you own (not the installed package, "
                                       "not several fold runs)")
    out = Path(out)
    ensure_outside(out, data)
    result = scan(data, layout, progress=progress)
    jobs = _fold_jobs(model, result.table) if folds else [_job(model, result.table, side, split_file)]
    scores = {combo: [] for combo in itertools.product((False, True), COMPONENTS, MIN_SIZES, THRESHOLDS)}
    patients = [(plain, volume) for plain, rows in jobs for _, volume in rows.groupby("patient", sort=True)]
    # a bad --group-by fails here, before anything is scored
    groups = case_groups([volume["patient"].iloc[0] for _, volume in patients], group_by, result.table)
    for plain, volume in progress_bar(patients, desc="tuning", unit="patient", enabled=progress):
        keys = volume.sort_values("slice")["image_path"].tolist()
        images = np.stack([result.store.image(k) for k in keys])
        truth = np.stack([result.store.mask(k) for k in keys]).astype(bool)
        flipped = dataclasses.replace(plain, tta_flip=True)  # the same network, not a second load
        probabilities = {False: plain.predict_volume(images, keys),
                         True: flipped.predict_volume(images, keys)}
        for tta, probability in probabilities.items():
            for setting, value in dice_by_setting(probability, truth).items():
                scores[(tta, *setting)].append(value)
    table = pd.DataFrame([{"tta_flip": tta, "largest_component": largest, "min_fraction": min_fraction,
                           "min_size": min_size, "threshold": threshold,
                           "dice_mean": float(np.nanmean(values)), "dice_median": float(np.nanmedian(values)),
                           "dice_min": float(np.nanmin(values))}
                          for (tta, (largest, min_fraction), min_size, threshold), values in scores.items()])
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "tuning.csv", index=False)
    summary = _summary(table, scores, jobs[0][0].cutoff, "val out of fold" if folds else side, len(patients),
                       groups)
    if split_unit(result.table) == "image":
        summary.update(metric="mean Dice per image", unit="image")
    summary["interval_over"] = drawn_over(summary["unit"], group_by)
    if folds:
        summary["runs"] = [str(run) for run in model]
    if store:
        summary["stored_in"] = str(store_postprocessing(Path(jobs[0][0].source), summary["recommended"],
                                                        summary["unit"]))
    (out / "tuning.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def dice_by_setting(probability: np.ndarray, truth: np.ndarray) -> dict:
    """{(COMPONENTS entry, min size, threshold): Dice} for one volume. Each threshold's mask is labelled
    once; each post-processing is then a choice of labels, scored from per-label overlaps."""
    true_voxels, scores = int(truth.sum()), {}
    for threshold in THRESHOLDS:
        labels, sizes = components(probability >= threshold)
        overlap = np.bincount(labels[truth], minlength=len(sizes))
        for (largest, min_fraction), min_size in itertools.product(COMPONENTS, MIN_SIZES):
            keep = kept_components(sizes, largest=largest, min_size=min_size, min_fraction=min_fraction)
            tp, predicted = int(overlap[keep].sum()), int(sizes[keep].sum())
            fp, fn = predicted - tp, true_voxels - tp
            counts = Counts(tp, fp, fn, labels.size - tp - fp - fn)
            scores[((largest, min_fraction), min_size, threshold)] = dice(counts)
    return scores


def _job(model, table: pd.DataFrame, side: str, split_file: str, fold: int = -1):
    """(predictor, the rows it is tuned on) for one model and a side of its split (or of a fold's)."""
    model = resolve_model_path(model)
    options = EvaluateOptions(side=side, split_file=split_file, fold=fold)
    plain = Predictor.from_checkpoint(model)
    # A model file away from its run (the shipped one) carries its split in its description.
    rows = select_rows(table, split_for(model, side, split_file, plain.description), options)
    check_unseen(model, plain.description, rows["patient"], side)
    return plain, rows


def _fold_jobs(runs: list, table: pd.DataFrame) -> list:
    """One job per fold run, on its own fold's validation patients (checked as crossval checks them)."""
    folds, _ = check_folds(runs)
    return [_job(run, table, "val", str(run_folder_of(run) / SPLIT_FILE), fold)
            for fold, run in folds.items()]


def _summary(table: pd.DataFrame, scores: dict, default: float, side: str, patients: int,
             groups=None) -> dict:
    def key(row: dict) -> tuple:
        return (bool(row["tta_flip"]), (bool(row["largest_component"]), float(row["min_fraction"])),
                int(row["min_size"]), float(row["threshold"]))

    def find(tta=False, largest=False, min_fraction=0.0, min_size=0, threshold=default) -> dict:
        row = table[(table.tta_flip == tta) & (table.largest_component == largest)
                    & np.isclose(table.min_fraction, min_fraction) & (table.min_size == min_size)
                    & np.isclose(table.threshold, threshold)]
        return row.iloc[0].to_dict() if len(row) else {}

    baseline = find()

    def at(*args, **kwargs) -> dict:
        """The row of a setting, with its change against the baseline paired over patients and its 95%
        bootstrap interval."""
        found = find(*args, **kwargs)
        if not found or not baseline:
            return found
        return {**found, "change": paired_change(scores[key(found)], scores[key(baseline)], groups=groups)}

    base = table[(~table.tta_flip) & (~table.largest_component) & (table.min_fraction == 0)
                 & (table.min_size == 0)]
    tuned = at(threshold=float(base.loc[base["dice_mean"].idxmax(), "threshold"]))

    def at_row(row) -> dict:
        return at(bool(row.tta_flip), bool(row.largest_component), float(row.min_fraction), int(row.min_size),
                  float(row.threshold))

    best = at_row(table.loc[table["dice_mean"].idxmax()])
    alone = {"largest_component": at(largest=True),
             **{f"min_fraction_{f:g}": at(min_fraction=f) for _, f in COMPONENTS if f},
             "min_size_20": at(min_size=20), "min_size_100": at(min_size=100),
             "tta_flip": at(tta=True), "tuned_threshold": tuned}
    plain_settings = at()
    recommended, because = _recommended(alone, plain_settings, at)
    return {
        "side": side, "patients": patients, "metric": "mean Dice per patient volume", "unit": "patient",
        "baseline": plain_settings,
        "each_option_alone": alone,
        "tuned_threshold": tuned,
        "best_combination": best,
        "recommended": recommended,
        "recommended_because": because,
        "interval": "95% percentile bootstrap of each option's paired change against the baseline "
                    "(change.low/high); a gain only where the whole interval is above 0",
    }


def _recommended(alone: dict, baseline: dict, at) -> tuple[dict, str]:
    """What --store writes, each choice on its own interval: the tuned threshold only if it is a gain
    alone, and of the post-processing options that are gains alone the one that gains most. Flip TTA
    doubles the cost of every prediction, so it stays the user's choice; the best combination of all
    is shown but not stored, since the best of 390 is an optimistic pick."""
    if not baseline:
        return baseline, "no baseline to compare with"

    def is_gain(row: dict) -> bool:
        return row.get("change", {}).get("verdict") == "gain"

    threshold = alone["tuned_threshold"]["threshold"] if is_gain(alone["tuned_threshold"]) \
        else baseline["threshold"]
    gains = [(row["dice_mean"], name, row) for name, row in alone.items()
             if name not in ("tta_flip", "tuned_threshold") and is_gain(row)]
    if not gains and threshold == baseline["threshold"]:
        return baseline, "no option is a gain by its interval: the baseline"
    kept = max(gains, key=lambda gain: gain[0]) if gains else None
    post = kept[2] if kept else baseline
    row = at(largest=bool(post["largest_component"]), min_fraction=float(post["min_fraction"]),
             min_size=int(post["min_size"]), threshold=float(threshold))
    chosen = [kept[1]] if kept else []
    if threshold != baseline["threshold"]:
        chosen.append(f"threshold {threshold:g}")
    return row, "each a gain alone by its interval: " + ", ".join(chosen)


def store_postprocessing(model: Path, chosen: dict, unit: str = "patient", source: str = "") -> Path:
    """Write a tuned threshold and post-processing into the model file's description (a run's model.pt).

    Prediction and evaluation then apply them unless told otherwise. `source` says where they were
    chosen, when not on the model's own validation cases (a refit's, out of fold)."""
    source = source or f"tuned on validation {unit}s (brainseg tune)"
    return store_settings(model, {
        "threshold": float(chosen["threshold"]), "threshold_source": source,
        "postprocessing": {"largest_component": bool(chosen["largest_component"]),
                           "min_size": int(chosen["min_size"]),
                           "min_fraction": float(chosen.get("min_fraction", 0.0)), "source": source}})
