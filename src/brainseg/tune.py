"""Measure post-processing and test-time options on validation patients, and tune the threshold.

Probabilities are computed once per patient (with and without flip TTA); every combination of
threshold, largest 3D component and minimum component size is then scored from them.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from brainseg.evaluation import EvaluateOptions, select_rows, split_for
from brainseg.progress import progress as progress_bar

THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.2, 0.81, 0.05))
MIN_SIZES = (0, 20, 100)


def tune(model: str | Path, data: str | Path, out: str | Path, *, side: str = "val", split_file: str = "",
         layout: str = "auto", store: bool = False, progress: bool = True) -> dict:
    """Write tuning.csv (every combination) and tuning.json (each option alone, and the best)."""
    from brainseg.data.index import ensure_outside, scan
    from brainseg.metrics import count, dice
    from brainseg.postprocess import postprocess
    from brainseg.prediction import Predictor

    model, out = Path(model), Path(out)
    ensure_outside(out, data)
    options = EvaluateOptions(side=side, split_file=split_file)
    result = scan(data, layout, progress=progress)
    rows = select_rows(result.table, split_for(model, options), options)
    plain = Predictor.from_checkpoint(model)
    flipped = Predictor.from_checkpoint(model, tta_flip=True)
    combos = list(itertools.product((False, True), (False, True), MIN_SIZES, THRESHOLDS))
    scores = {combo: [] for combo in combos}
    patients = list(rows.groupby("patient", sort=True))
    for _, volume in progress_bar(patients, desc="tuning", unit="patient", enabled=progress):
        keys = volume.sort_values("slice")["image_path"].tolist()
        images = np.stack([result.store.image(k) for k in keys])
        truth = np.stack([result.store.mask(k) for k in keys]).astype(bool)
        probabilities = {False: plain.predict_volume(images), True: flipped.predict_volume(images)}
        for tta, largest, min_size, threshold in combos:
            predicted = postprocess(probabilities[tta] >= threshold, largest=largest, min_size=min_size)
            scores[(tta, largest, min_size, threshold)].append(dice(count(predicted, truth)))
    table = pd.DataFrame([{"tta_flip": tta, "largest_component": largest, "min_size": min_size,
                           "threshold": threshold, "dice_mean": float(np.nanmean(values)),
                           "dice_median": float(np.nanmedian(values)), "dice_min": float(np.nanmin(values))}
                          for (tta, largest, min_size, threshold), values in scores.items()])
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "tuning.csv", index=False)
    summary = _summary(table, plain.cutoff, side, len(patients))
    if store:
        summary["stored_threshold_in"] = str(store_threshold(model, summary["tuned_threshold"]["threshold"]))
    (out / "tuning.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _summary(table: pd.DataFrame, default: float, side: str, patients: int) -> dict:
    def at(tta=False, largest=False, min_size=0, threshold=default) -> dict:
        row = table[(table.tta_flip == tta) & (table.largest_component == largest)
                    & (table.min_size == min_size) & np.isclose(table.threshold, threshold)]
        return row.iloc[0].to_dict() if len(row) else {}

    base = table[(~table.tta_flip) & (~table.largest_component) & (table.min_size == 0)]
    tuned = base.loc[base["dice_mean"].idxmax()].to_dict()
    best = table.loc[table["dice_mean"].idxmax()].to_dict()
    return {
        "side": side, "patients": patients, "metric": "mean Dice per patient volume",
        "baseline": at(),
        "each_option_alone": {"largest_component": at(largest=True), "min_size_20": at(min_size=20),
                              "min_size_100": at(min_size=100), "tta_flip": at(tta=True),
                              "tuned_threshold": tuned},
        "tuned_threshold": tuned,
        "best_combination": best,
    }


def store_threshold(model: Path, threshold: float) -> Path:
    """Write the tuned threshold into the model file's description (model.pt of a run)."""
    from brainseg.prediction import MODEL_FILE

    path = model / MODEL_FILE if model.is_dir() else model
    state = torch.load(path, map_location="cpu", weights_only=True)
    state["brainseg"]["threshold"] = float(threshold)
    state["brainseg"]["threshold_source"] = "tuned on validation patients (brainseg tune)"
    torch.save(state, path)
    return path
