"""Evaluate a model on patient volumes: per-patient and per-slice tables, summary.json, figures.

Conventions (also written into summary.json):
* the headline is the mean Dice per patient volume: a patient's slices are stacked and
  Dice = 2|A∩B| / (|A|+|B|) over the whole volume; the median and minimum are reported too;
* per slice, a slice where truth and prediction are both empty has no Dice and is left out of
  the mean; tumour presence per slice is scored separately (accuracy, sensitivity, specificity);
* HD95 is in pixels over the stacked volume (slice index counted as one pixel: kaggle_3m does not
  publish its spacing) and NaN where either side is empty;
* the probability is thresholded at the checkpoint's threshold (0.5 unless tuned) or --threshold.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from brainseg import plots
from brainseg.config import check_seed
from brainseg.data.index import ensure_outside, natural_key, scan
from brainseg.data.io import FLAIR_CHANNEL, MISSING_SEQUENCES, equal_channel_text
from brainseg.data.splits import LABEL_COLUMN, SCORED_PER, select, split_unit
from brainseg.errors import BadInputError
from brainseg.inference import Predictor
from brainseg.metrics import count, detection, dice, hd95, iou, precision, recall
from brainseg.progress import progress as progress_bar
from brainseg.runs.folder import check_unseen, member_patients_seen, split_for

CONVENTIONS = {
    "headline": "mean Dice per patient volume (slices stacked, Dice = 2|A∩B|/(|A|+|B|) over the volume)",
    "size_band": "tumour size in voxels of the truth: none, <5k, 5k-20k, >20k (by_size_band in summary.json)",
    "empty_volume": "a patient with no tumour and no prediction has no Dice; left out of means (NaN)",
    "per_slice": "Dice/IoU per slice only where truth or prediction is non-empty; tumour presence per "
                 "slice scored separately as detection accuracy, sensitivity, specificity",
    "hd95": "95th percentile symmetric Hausdorff distance in pixels over the stacked volume (slice "
            "index counted as one pixel; kaggle_3m spacing is not published); NaN where a side is empty",
    "resolution": "scored at each slice's original size (predictions are resized back from the "
                  "network input)",
    "threshold": "probability >= threshold is tumour",
    "flair_replaces": "a robustness check: the named channels (post = post-contrast, pre+post = both) "
                      "were overwritten with FLAIR before prediction, as kaggle_3m does for a missing "
                      "sequence; equal_channels in per_patient.csv names pairs already equal in the data",
}

# An image set (no patients) scores each image alone: no volumes, no slices within one, no sequences.
IMAGE_CONVENTIONS = {
    "headline": "mean Dice per image (Dice = 2|A∩B|/(|A|+|B|) over the image)",
    "size_band": "tumour size in pixels of the truth: none, <5k, 5k-20k, >20k (by_size_band in summary.json)",
    "empty_image": "an image with no tumour and no prediction has no Dice; left out of means (NaN)",
    "hd95": "95th percentile symmetric Hausdorff distance in pixels; NaN where a side is empty",
    "resolution": "scored at each image's original size (predictions are resized back from the network "
                  "input)",
    "threshold": CONVENTIONS["threshold"],
}
# The figures that name the cases: the worst cases and every case's Dice.
CASE_FIGURES = {"patient": ("worst_patients.png", "patient_dice.png"),
                "image": ("worst_images.png", "image_dice.png")}


# Tumour size bands in voxels (pixels for an image), where small tumours are half-missed.
SIZE_BANDS = ((0, "none"), (1, "<5k"), (5_000, "5k-20k"), (20_000, ">20k"))
CASE_TABLES = {"patient": "per_patient.csv", "image": "per_image.csv"}
# An image is its own volume, so a per-slice table of an image set would repeat per_image.csv.
SLICE_TABLES = {"patient": "per_slice.csv", "image": None}


def size_band(true_voxels: int) -> str:
    """The size band of a tumour: none, <5k, 5k-20k or >20k voxels."""
    return next(name for low, name in reversed(SIZE_BANDS) if true_voxels >= low)


def cases_table(folder: Path) -> Path:
    """The per-case table an evaluation wrote: per_image.csv for an image set, else per_patient.csv."""
    image = folder / CASE_TABLES["image"]
    return image if image.exists() else folder / CASE_TABLES["patient"]


@dataclass
class EvaluateOptions:
    side: str = "test"  # test, val, train or all
    split_file: str = ""  # default: the run's split.json
    fold: int = -1
    threshold: float | None = None  # None: the checkpoint's
    largest_component: bool | None = None  # keep the largest 3D component (None: as the model recommends)
    min_size: int | None = None  # drop 3D components smaller than this, in voxels (None: the model's)
    min_fraction: float | None = None  # drop components under this share of the largest (None: model's)
    tta_flip: bool = False
    flair_replaces: str = ""  # "post" or "pre+post": overwrite those channels with FLAIR (robustness)
    precision: str = "auto"  # auto (bf16 where the hardware runs it natively) or 32
    seed: int = 0
    grid_slices: int = 8
    worst: int = 4


def select_rows(table: pd.DataFrame, split: dict | None, options: EvaluateOptions) -> pd.DataFrame:
    if split is None:
        return table
    if options.side not in ("train", "val", "test"):
        raise BadInputError("--split", f"must be test, val, train or all, not {options.side!r}")
    folds = len(split.get("folds", []))
    if options.fold >= 0 and not folds:
        raise BadInputError("--fold", f"is {options.fold} but this split has no folds; leave it out")
    if options.fold < -1 or options.fold >= folds > 0:
        raise BadInputError("--fold", f"must be in 0..{max(folds, 1) - 1}, not {options.fold}")
    fold = options.fold if options.fold >= 0 else None
    if folds and fold is None and options.side != "test":
        raise BadInputError("--fold", "this is a k-fold split: pass --fold for its train/val sides")
    if options.side == "val" and split.get("refit_val"):
        raise BadInputError("--split", "this model was refit on its validation patients (train and val "
                                       "together); score it on test")
    if fold is None and not split.get(options.side):  # e.g. a model trained on every case it was given
        raise BadInputError("--split", f"the model's split has no {options.side} "
                                       f"{split.get('unit', 'patient')}s; score it with --split all on "
                                       "data it never saw")
    rows = select(table, split, options.side, fold)
    if rows.empty:  # evaluate, tune and crossval all take --data; only evaluate has --split
        raise BadInputError("--data", f"no slices of this data set are on the {options.side} side of "
                                      "the split; is it the data set the split was made on?")
    return rows


def evaluate(model: str | Path, data: str | Path, out: str | Path, *, layout: str = "auto",
             options: EvaluateOptions | None = None, progress: bool = True) -> dict:
    """Score a model on the chosen side of the split and write tables and figures to `out`."""
    options = options or EvaluateOptions()
    check_seed(options.seed, "--seed")
    if options.flair_replaces and options.flair_replaces not in MISSING_SEQUENCES:
        raise BadInputError("--flair-replaces", f"must be post or pre+post, not {options.flair_replaces!r}")
    out = Path(out)
    ensure_outside(out, data)
    predictor = Predictor.load(model, precision=options.precision, tta_flip=options.tta_flip,
                               threshold=options.threshold, largest_component=options.largest_component,
                               min_size=options.min_size, min_fraction=options.min_fraction)
    model = Path(predictor.source)
    result = scan(data, layout, progress=progress)
    split = split_for(model, options.side, options.split_file, predictor.description)
    rows = select_rows(result.table, split, options)
    check_unseen(model, predictor.description, rows["patient"], options.side)
    unit = split_unit(result.table)
    seen = _seen_count(model, predictor.description, rows["patient"]) if options.side == "all" else 0
    if seen:  # --split all takes every case; say when some are not new to the model
        print(f"note: the model trained or was validated on {seen} of these {rows['patient'].nunique()} "
              f"{unit}s; their scores are not of unseen {unit}s (--split test scores only those)",
              file=sys.stderr)
    labels = rows.groupby("patient")[LABEL_COLUMN].first() if LABEL_COLUMN in rows else None
    first = rows["image_path"].iloc[0]  # refused before anything is written
    _replace_with_flair(result.store.image(first)[None], options.flair_replaces, first)
    out.mkdir(parents=True, exist_ok=True)
    cutoff = predictor.cutoff

    rng = np.random.default_rng(options.seed)
    grid_keys = set(_pick_grid_slices(rows, options.grid_slices, rng))
    grid: list[dict] = []
    examples: dict[str, dict] = {}  # patient -> its largest-tumour slice, for the worst-patient grid
    packed_masks: dict[str, tuple] = {}  # patient -> its bit-packed prediction, for the volume montage
    patient_rows, slice_rows = [], []
    patients = list(rows.groupby("patient", sort=True))
    for patient, volume in progress_bar(patients, desc="evaluating", unit=unit, enabled=progress):
        volume = volume.sort_values("slice")
        keys = volume["image_path"].tolist()
        images, truth = _volume(result.store, keys)
        equal_channels = equal_channel_text(images)
        images = _replace_with_flair(images, options.flair_replaces, keys[0])
        probability = predictor.predict_volume(images, keys)  # keys name a bad slice's file
        predicted = predictor.masks(probability)
        c = count(predicted, truth)
        packed_masks[patient] = (np.packbits(predicted), predicted.shape)
        patient_rows.append({"patient": patient, "slices": len(keys), "dice": dice(c), "iou": iou(c),
                             "precision": precision(c), "recall": recall(c), "hd95": hd95(predicted, truth),
                             "true_voxels": int(truth.sum()), "predicted_voxels": int(predicted.sum()),
                             "size_band": size_band(int(truth.sum())), "equal_channels": equal_channels,
                             **({"label": labels[patient]} if labels is not None else {})})
        for i, key in enumerate(keys):
            sc = count(predicted[i], truth[i])
            slice_rows.append({"patient": patient, "slice": int(volume["slice"].iloc[i]),
                               "true_pixels": sc.tp + sc.fn, "predicted_pixels": sc.tp + sc.fp,
                               "dice": dice(sc), "iou": iou(sc)})
            if key in grid_keys:
                grid.append(_grid_row(unit, patient, volume["slice"].iloc[i], images[i], truth[i],
                                      probability[i]))
        best = int(truth.reshape(len(keys), -1).sum(1).argmax())
        examples[patient] = _grid_row(unit, patient, volume["slice"].iloc[best], images[best], truth[best],
                                      probability[best])

    per_patient = pd.DataFrame(patient_rows)
    per_slice = pd.DataFrame(slice_rows)
    # an image is its own "volume": say image, and drop the one-slice count
    if unit == "image":
        cases = per_patient.rename(columns={"patient": "image", "true_voxels": "true_pixels",
                                            "predicted_voxels": "predicted_pixels"}).drop(columns="slices")
        order = sorted(cases.index, key=lambda i: natural_key(str(cases.at[i, "image"])))  # 9 before 10
        cases = cases.loc[order]
    else:
        cases = per_patient
    cases.to_csv(out / CASE_TABLES[unit], index=False)
    if SLICE_TABLES[unit]:
        per_slice.to_csv(out / SLICE_TABLES[unit], index=False)
    summary = _summary(per_patient, per_slice, predictor, result, options, cutoff, unit, seen)
    summary["figures"] = _figures(out, per_patient, grid, examples, options, cutoff, result, rows,
                                  packed_masks)
    (out / "summary.json").write_text(json.dumps(_clean(summary), indent=2) + "\n")
    return summary


def _volume(store, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """A patient's stacked images and boolean masks, in the order of `keys`."""
    images = np.stack([store.image(k) for k in keys])
    return images, np.stack([store.mask(k) for k in keys]).astype(bool)


def _replace_with_flair(images: np.ndarray, pattern: str, name: str) -> np.ndarray:
    if not pattern:
        return images
    replaced = list(MISSING_SEQUENCES[pattern])
    if images.ndim != 4 or images.shape[-1] != 3:
        raise BadInputError(name, "--flair-replaces needs 3-channel (pre, FLAIR, post) images")
    images = images.copy()  # the store's arrays are read-only views
    images[..., replaced] = images[..., FLAIR_CHANNEL:FLAIR_CHANNEL + 1]
    return images


def _pick_grid_slices(rows: pd.DataFrame, count: int, rng) -> list[str]:
    tumour = rows.loc[rows["has_tumour"], "image_path"].to_numpy()
    other = rows.loc[~rows["has_tumour"], "image_path"].to_numpy()
    take = min(len(tumour), count - count // 4)
    picks = list(rng.choice(tumour, take, replace=False)) if take else []
    rest = min(len(other), count - len(picks))
    return picks + (list(rng.choice(other, rest, replace=False)) if rest else [])


def _grid_row(unit: str, patient: str, number, image, truth, probability) -> dict:
    title = f"image {patient}" if unit == "image" else f"{patient}\nslice {number}"
    return {"image": image, "truth": truth, "probability": probability, "title": title}


def _stats(values: pd.Series) -> dict:
    finite = values.dropna()
    if finite.empty:
        return {"mean": None, "median": None, "min": None, "max": None, "n": 0}
    return {"mean": float(finite.mean()), "median": float(finite.median()), "min": float(finite.min()),
            "max": float(finite.max()), "n": len(finite)}


def _grouped(per_patient: pd.DataFrame, column: str, order=None) -> dict:
    """Dice, IoU and recall per value of `column` (tumour type, size band), with counts."""
    groups = dict(tuple(per_patient.groupby(column, sort=True)))
    names = [n for n in (order or sorted(groups)) if n in groups]
    return {str(name): {"cases": len(groups[name]),
                        **{metric: _stats(groups[name][metric]) for metric in ("dice", "iou", "recall")}}
            for name in names}


def _seen_count(model: Path, description: dict, patients: pd.Series) -> int:
    """How many of these cases the model (or an ensemble member) trained or was validated on."""
    seen = member_patients_seen(model, description)
    if seen is None:
        return 0
    return len((set(seen["trained"]) | set(seen["validated"])) & set(patients.astype(str)))


def _summary(per_patient, per_slice, predictor, result, options, cutoff, unit, seen=0) -> dict:
    scored = per_slice[(per_slice["true_pixels"] > 0) | (per_slice["predicted_pixels"] > 0)]
    return {
        "model": predictor.identity,
        # "cases" always; "patients" or "images" as well, so an image set never speaks of patients
        "data": {"root": str(result.root), "layout": result.layout, "side": options.side, "unit": unit,
                 "cases": len(per_patient), f"{unit}s": len(per_patient), "slices": len(per_slice),
                 "seen_by_model": seen},  # cases it trained or was validated on (only --split all has any)
        "options": {**asdict(options), "threshold": cutoff, **predictor.postprocessing},
        "conventions": CONVENTIONS if unit == "patient" else IMAGE_CONVENTIONS,
        "per_patient": {name: _stats(per_patient[name]) for name in
                        ("dice", "iou", "precision", "recall", "hd95")},
        "per_slice": {"dice": _stats(scored["dice"]), "iou": _stats(scored["iou"]),
                      "slices_scored": len(scored)},
        "detection": detection(per_slice["predicted_pixels"] > 0, per_slice["true_pixels"] > 0),
        "by_size_band": _grouped(per_patient, "size_band", [name for _, name in SIZE_BANDS]),
        **({"by_class": _grouped(per_patient, "label")} if "label" in per_patient else {}),
        "cases": per_patient.rename(columns={"patient": unit}).to_dict(orient="records"),
    }


def _figures(out, per_patient, grid, examples, options, cutoff, result, rows, packed_masks) -> list[str]:
    names = []
    if grid:
        names.append(plots.prediction_grid(grid, out / "prediction_grid.png", cutoff).name)
    ranked = per_patient.dropna(subset=["dice"]).sort_values("dice")
    unit = split_unit(result.table)
    worst = [examples[p] for p in ranked["patient"].head(options.worst)]
    for row, dice_value in zip(worst, ranked["dice"].head(options.worst), strict=True):
        row["title"] += f", {'patient ' if unit == 'patient' else ''}Dice {dice_value:.3f}"
    worst_figure, dice_figure = CASE_FIGURES[unit]
    if worst:
        names.append(plots.prediction_grid(worst, out / worst_figure, cutoff).name)
    names.append(plots.patient_scores(per_patient["patient"].tolist(), per_patient["dice"].tolist(),
                                      out / dice_figure, f"Dice {SCORED_PER[unit]}", unit).name)
    # The median patient's volume shows typical behaviour better than the best or worst; an image has
    # no volume, and its slice is in the grids already.
    if not ranked.empty and unit == "patient":
        patient = ranked["patient"].iloc[len(ranked) // 2]
        volume = rows[rows["patient"] == patient].sort_values("slice")
        keys = volume["image_path"].tolist()
        images, truth = _volume(result.store, keys)
        images = _replace_with_flair(images, options.flair_replaces, keys[0])
        bits, shape = packed_masks[patient]
        predicted = np.unpackbits(bits, count=int(np.prod(shape))).reshape(shape).astype(bool)
        dice_value = float(ranked["dice"].iloc[len(ranked) // 2])
        names.append(plots.volume_montage(images, truth, predicted, out / "volume_montage.png",
                                          f"{patient}: Dice {dice_value:.3f}").name)
    return names


def _clean(value):
    """JSON without NaN (written as null) and with plain Python numbers."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(float(value)) else float(value)
    return value
