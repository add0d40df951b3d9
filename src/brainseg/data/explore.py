"""Explore a data set: counts, shapes, intensity ranges and figures (the seeds' steps 3-5)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from brainseg import plots
from brainseg.config import check_seed
from brainseg.data.cache import SliceStore
from brainseg.data.index import Scan, ensure_outside, scan
from brainseg.data.io import equal_channel_pairs
from brainseg.data.splits import patient_table, split_unit
from brainseg.errors import OptionError


def summarise(result: Scan) -> dict:
    """Counts, shapes, channels, per-channel intensity range and per-patient slice counts. An image set
    (no patients) counts "images" and has no per-patient keys."""
    table = result.table
    patients = patient_table(table)
    tumour = table.loc[table["has_tumour"], "tumour_pixels"]
    shapes = (table["height"].astype(str) + "x" + table["width"].astype(str)).value_counts()
    unit = split_unit(table)
    summary = {
        "root": str(result.root),
        "layout": result.layout,
        "unit": unit,
        "cases": len(patients),
        f"{unit}s": len(patients),
        "slices": len(table),
        "tumour_slices": int(table["has_tumour"].sum()),
        "tumour_slice_fraction": round(float(table["has_tumour"].mean()), 4),
        "image_shapes": {k: int(v) for k, v in shapes.items()},
        "channels": {str(k): int(v) for k, v in table["channels"].value_counts().items()},
        "intensity_per_channel": intensity_ranges(result.store, table["image_path"]),
        "slices_per_patient": _min_median_max(patients["slices"]),
        "tumour_pixels_per_tumour_slice": _min_median_max(tumour),
        "patients_without_tumour": int((patients["tumour_voxels"] == 0).sum()),
        f"{unit}s_with_identical_channels": identical_channels(table, result.store),
        "problems": result.report.counts(),
    }
    if unit == "image":  # every image is its own case: per-patient counts would say nothing
        for key in ("slices_per_patient", "patients_without_tumour"):
            summary.pop(key)
    return summary


def identical_channels(table: pd.DataFrame, store: SliceStore) -> dict[str, list[str]]:
    """Patients in whose every slice two channels are equal, e.g. {"P": ["1=2"]}.

    kaggle_3m fills a missing sequence with a copy of FLAIR; a model trained on three distinct
    sequences may then miss the tumour, so such patients are worth knowing about.
    """
    found = {}
    for patient, rows in table.groupby("patient", sort=True):
        pairs = equal_channel_pairs([store.image(key) for key in rows["image_path"]])
        if pairs:
            found[str(patient)] = pairs
    return found


def intensity_ranges(store: SliceStore, keys) -> list[dict]:
    """Exact min, 1st/50th/99th percentile, max and mean per channel, from 256-bin histograms."""
    histograms: list[np.ndarray] = []
    for key in keys:
        image = store.image(key)
        for channel in range(image.shape[-1]):
            counts = np.bincount(image[..., channel].ravel(), minlength=256)
            if channel == len(histograms):
                histograms.append(counts.astype(np.int64))
            else:
                histograms[channel] += counts
    ranges = []
    for counts in histograms:
        cumulative = np.cumsum(counts) / counts.sum()
        nonzero = np.flatnonzero(counts)
        ranges.append({
            "min": int(nonzero[0]), "max": int(nonzero[-1]),
            "p1": int(np.searchsorted(cumulative, 0.01)),
            "median": int(np.searchsorted(cumulative, 0.5)),
            "p99": int(np.searchsorted(cumulative, 0.99)),
            "mean": round(float((counts * np.arange(256)).sum() / counts.sum()), 2),
            "zero_fraction": round(float(counts[0] / counts.sum()), 4),
        })
    return ranges


def _min_median_max(values: pd.Series) -> dict:
    if len(values) == 0:
        return {"min": None, "median": None, "max": None}
    return {"min": int(values.min()), "median": float(values.median()), "max": int(values.max())}


def summary_lines(summary: dict) -> list[str]:
    unit = f"{summary['unit']}s"
    lines = [
        f"data set:       {summary['root']} ({summary['layout']})",
        f"{unit + ':':<15} {summary['cases']}" + ("" if summary["unit"] == "patient" else
                                                   " (no patient ids in this layout: every image is a case)"),
        f"{'slices:' if summary['unit'] == 'patient' else 'with tumour:':<15} "
        + (f"{summary['slices']}, with tumour " if summary["unit"] == "patient" else "")
        + f"{summary['tumour_slices']} ({100 * summary['tumour_slice_fraction']:.1f}%)",
        "image shapes:   " + ", ".join(f"{k} ({v})" for k, v in summary["image_shapes"].items()),
        "channels:       " + ", ".join(f"{k} ({v})" for k, v in summary["channels"].items()),
    ]
    for number, r in enumerate(summary["intensity_per_channel"]):
        lines.append(f"channel {number}:      min {r['min']}, p1 {r['p1']}, median {r['median']}, "
                     f"p99 {r['p99']}, max {r['max']}, mean {r['mean']}")
    if "slices_per_patient" in summary:
        spp = summary["slices_per_patient"]
        lines.append(f"slices/patient: min {spp['min']}, median {spp['median']:g}, max {spp['max']}")
    area = summary["tumour_pixels_per_tumour_slice"]
    if area["min"] is not None:
        per = "tumour slice" if summary["unit"] == "patient" else "image with tumour"
        lines.append(f"tumour pixels:  min {area['min']}, median {area['median']:g}, "
                     f"max {area['max']} (per {per})")
    copied = summary.get(f"{unit}_with_identical_channels", {})
    if copied:
        names = ", ".join(f"{name} ({' '.join(pairs)})" for name, pairs in copied.items())
        lines.append(f"identical channels (a sequence copied into another's place): {len(copied)} "
                     f"{unit}: {names}")
    if summary["problems"]:
        counts = ", ".join(f"{k}: {v}" for k, v in summary["problems"].items())
        lines.append(f"problems:       {counts}")
    return lines


def explore(root: str | Path, out: str | Path, *, layout: str = "auto", seed: int = 0,
            samples: int = 6, progress: bool = False) -> dict:
    """Write summary.json and the exploration figures to `out`; return the summary."""
    seed = check_seed(seed)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise OptionError(f"samples (slices in the sample grid) must be at least 1, got {samples!r}")
    ensure_outside(out, root)
    result = scan(root, layout, progress=progress)
    out = ensure_outside(out, result.root)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(result)
    summary["figures"] = [p.name for p in _figures(result, out, seed, samples)]
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _figures(result: Scan, out: Path, seed: int, samples: int) -> list[Path]:
    table, store = result.table, result.store
    rng = np.random.default_rng(seed)
    # Half the samples from tumour slices so that the overlay column shows something.
    with_tumour = table.index[table["has_tumour"]].to_numpy()
    without = table.index[~table["has_tumour"]].to_numpy()
    take = min(len(with_tumour), (samples + 1) // 2)
    chosen = list(rng.choice(with_tumour, take, replace=False)) if take else []
    rest = min(len(without), samples - len(chosen))
    chosen += list(rng.choice(without, rest, replace=False)) if rest else []
    rows = table.loc[sorted(chosen)]
    figures = [plots.sample_grid(
        [store.image(k) for k in rows["image_path"]], [store.mask(k) for k in rows["image_path"]],
        [f"{p} #{s}" for p, s in zip(rows["patient"], rows["slice"], strict=True)],
        out / "sample_grid.png")]
    tumour_area = table.loc[table["has_tumour"], "tumour_pixels"]
    figures.append(plots.histogram(tumour_area, "tumour pixels per slice (slices with tumour)",
                                   "Tumour area distribution", out / "tumour_area.png", log_x=True))
    if split_unit(table) == "patient":
        patients = patient_table(table).sort_values("slices")
        figures.append(plots.bar_per_patient(
            list(patients.index),
            {"with tumour": patients["tumour_slices"],
             "without tumour": patients["slices"] - patients["tumour_slices"]},
            "slices", "Slices per patient", out / "slices_per_patient.png"))
        fraction = (patients["tumour_slices"] / patients["slices"]).sort_values()
        figures.append(plots.bar_per_patient(
            list(fraction.index), {"tumour fraction": fraction}, "fraction of slices with tumour",
            "Fraction of tumour slices per patient", out / "tumour_fraction_per_patient.png"))
    return figures
