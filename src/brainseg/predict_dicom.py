"""Prediction on DICOM series: a series in, a DICOM SEG, a NIfTI mask and PNGs out.

    volume, geometry = read_dicom_series("study/series_3")
    result = predict_dicom(predictor, "study/series_3")      # or predict_series(predictor, volume, geometry)
    write_dicom_outputs(result, Path("out/series_3"))         # seg.dcm, mask.nii.gz, slice PNGs

A greyscale series feeds a 1-channel model as it is. A 3-channel model (LGG's pre-contrast, FLAIR and
post-contrast) gets the one series in all three channels, with a warning, since it was trained on three
different sequences and will miss more tumour; `predict_study` maps several series of one study to the
model's channels instead (`--channels pre=T1,flair=FLAIR,post=T1 post`), on their shared grid:

    plan = channel_plan(parse_channels("pre=T1,flair=FLAIR,post=T1 post"), predictor.slice_channels)
    series = [s for s in find_series("study") if isinstance(s, DicomSeries)]
    result = predict_study(predictor, series, plan, Path("study"))   # result.series says which fed what
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from brainseg.data.dicom import (
    DicomGeometry,
    DicomSeries,
    read_dicom_series,
    read_series,
    write_nifti,
    write_seg,
)
from brainseg.data.io import DEFAULT_LIMITS, SizeLimits
from brainseg.errors import BadInputError, OptionError
from brainseg.files import write_png
from brainseg.inference import Predictor
from brainseg.plots import overlay_rgb8

SEG_FILE = "seg.dcm"
NIFTI_FILE = "mask.nii.gz"
PROBABILITY_FILE = "probability.nii.gz"
# A model's input channels by name: LGG's kaggle_3m slices hold pre-contrast, FLAIR and post-contrast in
# this order; a 1-channel model takes one greyscale series.
CHANNEL_NAMES = {1: ("image",), 3: ("pre", "flair", "post")}
UID_SELECTOR = re.compile(r"^[0-9]+(\.[0-9]*)*$")  # a selector of digits and dots is a UID's start first
GRID_TOLERANCE_MM = 0.01  # series whose affines differ by more lie on different grids
CHANNELS_SYNTAX = ("expected NAME=SERIES pairs separated by commas, e.g. pre=T1,flair=FLAIR,post=T1 post "
                   "(SERIES: part of a SeriesDescription or the start of a SeriesInstanceUID), or the "
                   "series alone in the model's channel order")


@dataclass
class DicomPrediction:
    """One series predicted: the uint8 volume the network saw, probabilities, the binary mask."""

    volume: np.ndarray  # (N, H, W) uint8, or (N, H, W, C) where several series fed C channels
    geometry: DicomGeometry
    probability: np.ndarray  # (N, H, W) float32
    mask: np.ndarray  # (N, H, W) bool, post-processed in 3D
    note: str = ""  # how the series was fed to the model where that needs saying
    series: str = ""  # which series fed which channel (by label, never a patient attribute)

    @property
    def tumour_pixels(self) -> int:
        return int(self.mask.sum())

    @property
    def tumour_area_mm2(self) -> float | None:
        """The tumour's area summed over slices, in mm² (None without PixelSpacing)."""
        area = self.geometry.pixel_area_mm2
        return None if area is None else round(self.tumour_pixels * area, 2)

    @property
    def tumour_volume_ml(self) -> float | None:
        """The tumour's volume in ml (None without pixel spacing or slice spacing)."""
        voxel = self.geometry.voxel_ml
        return None if voxel is None else round(self.tumour_pixels * voxel, 3)


def single_series_note(predictor: Predictor) -> str:
    return (f"one greyscale series is fed to all {predictor.slice_channels} channels of a model trained on "
            "pre-contrast, FLAIR and post-contrast slices; expect it to miss tumour (map a study's three "
            "series with --channels pre=...,flair=...,post=..., or use a 1-channel model such as "
            "pretrained:figshare)")


def model_inputs(predictor: Predictor, volume: np.ndarray, name: str = "series") -> tuple[np.ndarray, str]:
    """(N, H, W) greyscale -> (N, H, W, C) for the model, and a note where the mapping needs one."""
    channels = predictor.slice_channels
    if channels == 1:
        return volume[..., None], ""
    if channels == 3:
        return np.repeat(volume[..., None], 3, axis=-1), single_series_note(predictor)
    raise BadInputError(name, f"is one greyscale series; the model expects {channels} channels")


def predict_series(predictor: Predictor, volume: np.ndarray, geometry: DicomGeometry) -> DicomPrediction:
    """A volume read by `read_series` -> its prediction; the whole series is normalised as one."""
    name = str(geometry.files[0].parent if len(geometry.files) > 1 else geometry.files[0])
    inputs, note = model_inputs(predictor, volume, name)
    probability = _probability(predictor, inputs, geometry, quiet=bool(note))
    channels = "+".join(channel_names(predictor.slice_channels))
    return DicomPrediction(volume, geometry, probability, predictor.masks(probability).astype(bool), note,
                           f"{channels}={geometry.label}")


def _probability(predictor: Predictor, inputs: np.ndarray, geometry: DicomGeometry, *,
                 quiet: bool) -> np.ndarray:
    names = [f"{path.name} frame {frame}" if geometry.files.count(path) > 1 else path.name
             for path, frame in zip(geometry.files, geometry.frame_numbers, strict=True)]
    with warnings.catch_warnings():
        if quiet:  # a note says it better than the Predictor's warning about equal channels
            warnings.filterwarnings("ignore", message=".*channels are equal.*")
        return predictor.predict_volume(inputs, names)


def channel_names(count: int) -> tuple[str, ...]:
    """The names `--channels` gives a model's input channels (c1, c2... for a count brainseg has no
    names for)."""
    return CHANNEL_NAMES.get(count, tuple(f"c{k}" for k in range(1, count + 1)))


def parse_channels(text: str) -> list[tuple[str | None, str]]:
    """`--channels` -> (channel name, series selector) pairs, the name None where the series are given
    in the model's channel order ("T1,FLAIR,T1 post"). Syntax only; `channel_plan` checks the names
    against a model."""
    entries: list[tuple[str | None, str]] = []
    for part in str(text).split(","):
        name, named, selector = part.partition("=")
        name, selector = (name.strip().lower(), selector.strip()) if named else (None, name.strip())
        if not selector or name == "":
            raise OptionError(f"--channels {text!r}: {CHANNELS_SYNTAX}")
        entries.append((name, selector))
    if len({name is None for name, _ in entries}) > 1:
        raise OptionError(f"--channels {text!r}: name every series (pre=...,flair=...) or none")
    names = [name for name, _ in entries if name]
    repeated = next((name for name in names if names.count(name) > 1), None)
    if repeated:
        raise OptionError(f"--channels {text!r}: channel {repeated!r} is given twice")
    return entries


def channel_plan(entries: list[tuple[str | None, str]], channels: int) -> dict[str, str]:
    """Parsed `--channels` for a model with `channels` inputs per slice -> {channel name: selector}, in
    the model's channel order; refused in one line where a name is not one of the model's channels or
    more series are given than it has channels."""
    names = channel_names(channels)
    if len(entries) > len(names):
        raise OptionError(f"--channels: {len(entries)} series for a model of {len(names)} channel(s) "
                          f"({', '.join(names)})")
    if entries[0][0] is None:
        if len(entries) != len(names):
            raise OptionError(f"--channels: series given in order need one per channel ({', '.join(names)}); "
                              "name them to give fewer (flair=FLAIR)")
        return dict(zip(names, (selector for _, selector in entries), strict=True))
    unknown = next((name for name, _ in entries if name not in names), None)
    if unknown is not None:
        raise OptionError(f"--channels: {unknown!r} is not a channel of this model; it takes "
                          f"{', '.join(names)}")
    given = dict(entries)
    return {name: given[name] for name in names if name in given}


def select_series(study: list[DicomSeries], selector: str, channel: str, where: str | Path) -> DicomSeries:
    """The one series of `study` that `selector` names: the start of its SeriesInstanceUID (a selector
    of digits and dots), else its SeriesDescription, case-insensitively, whole before in part. None or
    several is a BadInputError naming the series there are."""
    matches = [s for s in study if s.series_uid.startswith(selector)] if UID_SELECTOR.match(selector) else []
    if not matches:
        wanted = selector.lower()
        matches = ([s for s in study if s.description.lower() == wanted]
                   or [s for s in study if wanted in s.description.lower()])
    if len(matches) == 1:
        return matches[0]
    if not matches:
        held = "; ".join(s.label for s in study) or "no image series"
        raise BadInputError(where, f"no series matches {selector!r} for {channel} (part of a Series"
                                   f"Description or the start of a SeriesInstanceUID); it holds: {held}")
    raise BadInputError(where, f"{selector!r} for {channel} matches {len(matches)} series "
                               f"({'; '.join(s.label for s in matches)}); give more of the description "
                               "or the start of the UID")


def check_same_grid(volume: np.ndarray, geometry: DicomGeometry, channel: str, reference: np.ndarray,
                    reference_geometry: DicomGeometry, reference_channel: str) -> None:
    """Series fed to one model's channels must share one grid (size, slice positions, orientation and
    spacing): a BadInputError naming the first file of the series that does not."""
    shape, expected = volume.shape, reference.shape
    if shape != expected:
        raise BadInputError(geometry.files[0], f"{geometry.label} ({channel}) is {shape[0]} slices of "
                                               f"{shape[2]}x{shape[1]}; {reference_geometry.label} "
                                               f"({reference_channel}) is {expected[0]} of {expected[2]}x"
                                               f"{expected[1]}: the series of the channels must share one "
                                               "grid (resample them onto one first)")
    offset = float(np.abs(geometry.affine - reference_geometry.affine).max())
    if offset > GRID_TOLERANCE_MM:
        raise BadInputError(geometry.files[0], f"{geometry.label} ({channel}) lies up to {offset:.2f} mm off "
                                               f"{reference_geometry.label} ({reference_channel}) (slice "
                                               "positions, orientation or pixel spacing differ): the "
                                               "series of the channels must share one grid (resample them "
                                               "onto one first)")


def predict_study(predictor: Predictor, study: list[DicomSeries], plan: dict[str, str], where: str | Path,
                  limits: SizeLimits = DEFAULT_LIMITS) -> DicomPrediction:
    """Series of one study fed to the model's channels as `plan` ({channel: selector}, `channel_plan`)
    says -> one prediction on their shared grid. A channel given no series gets the FLAIR one (the
    first given where there is no FLAIR), as kaggle_3m fills a missing sequence, and the note says so.
    The geometry, and so the SEG and NIfTI, are those of that series: LGG masks outline FLAIR
    abnormality."""
    names = channel_names(predictor.slice_channels)
    chosen = {name: select_series(study, plan[name], name, where) for name in names if name in plan}
    if not chosen:
        raise OptionError("--channels: no series given for any channel of this model "
                          f"({', '.join(names)})")
    main = "flair" if "flair" in chosen else next(iter(chosen))
    read: dict[str, tuple[np.ndarray, DicomGeometry]] = {}  # each series decoded once
    for series in chosen.values():
        if series.series_uid not in read:
            read[series.series_uid] = read_series(series, limits)
    reference, geometry = read[chosen[main].series_uid]
    for name, series in chosen.items():
        check_same_grid(*read[series.series_uid], name, reference, geometry, main)
    volumes = [read[chosen.get(name, chosen[main]).series_uid][0] for name in names]
    inputs = np.stack(volumes, axis=-1)
    missing = [name for name in names if name not in chosen]
    note = (f"{', '.join(missing)} given no series: the {main} series is copied in, as kaggle_3m fills a "
            "missing sequence; expect more missed tumour" if missing else "")
    probability = _probability(predictor, inputs, geometry, quiet=bool(missing))
    used = ", ".join(f"{name}={chosen[name].label}" if name in chosen else f"{name}=(the {main} series)"
                     for name in names)
    volume = inputs[..., 0] if len(names) == 1 else inputs
    return DicomPrediction(volume, geometry, probability, predictor.masks(probability).astype(bool), note,
                           used)


def predict_dicom(predictor: Predictor, path: str | Path) -> DicomPrediction:
    """A .dcm file or a folder of one series -> its prediction (with a warning when one series is
    spread over a 3-channel model's channels)."""
    volume, geometry = read_dicom_series(path)
    prediction = predict_series(predictor, volume, geometry)
    if prediction.note:
        warnings.warn(f"{path}: {prediction.note}", stacklevel=2)
    return prediction


def write_dicom_outputs(prediction: DicomPrediction, folder: Path, *, overlays: Path | None = None,
                        probabilities: bool = False, model: str = "brainseg",
                        anonymize: bool = False) -> dict[str, Path]:
    """Write `folder`/seg.dcm (DICOM SEG over the source series; without patient-identifying attributes
    with `anonymize`), `folder`/mask.nii.gz (the series' affine), a mask PNG per slice
    (slice_001_mask.png, in volume order) and, with `overlays`, an overlay PNG per slice in that folder.
    A SEG that cannot be made (such as a series of several multi-frame files) is a BadInputError before
    the other files are written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = {"seg": write_seg(prediction.mask, prediction.geometry, folder / SEG_FILE, model=model,
                                anonymize=anonymize)}
    written["nifti"] = write_nifti(prediction.mask.astype(np.uint8), prediction.geometry, folder / NIFTI_FILE)
    if probabilities:
        written["probability"] = write_nifti(prediction.probability.astype(np.float32), prediction.geometry,
                                             folder / PROBABILITY_FILE)
    for k, (image, mask) in enumerate(zip(prediction.volume, prediction.mask, strict=True), start=1):
        write_png(folder / f"slice_{k:03d}_mask.png", mask.astype(np.uint8) * 255)
        if overlays is not None:
            write_png(overlays / f"slice_{k:03d}.png", overlay_rgb8(image, mask))
    return written


def dicom_case_row(predictor: Predictor, series: DicomSeries | None, name: str, source: Path, out: Path, *,
                   save_probabilities: bool = False, overlays: bool = True,
                   study: list[DicomSeries] | None = None, channels: dict[str, str] | None = None,
                   anonymize: bool = False, limits: SizeLimits = DEFAULT_LIMITS) -> dict:
    """`brainseg predict` on one series, or with `channels` (a `channel_plan`) on the series of `study`
    it maps to the model's channels: outputs under `out`/masks/`name`/ (overlays under
    `out`/overlays/`name`/) and its row of predictions.csv; `note` says how it fed the model, and
    `series` which series fed which channel where they were mapped."""
    if channels is not None:
        prediction = predict_study(predictor, study if study is not None else [series], channels, source,
                                   limits)
    else:
        prediction = predict_series(predictor, *read_series(series, limits))
    folder = out / "masks" / name
    model = str(predictor.identity.get("model", "brainseg"))
    write_dicom_outputs(prediction, folder, overlays=out / "overlays" / name if overlays else None,
                        probabilities=save_probabilities, model=model, anonymize=anonymize)
    return {"case": name, "kind": "dicom", "input": str(source), "slices": len(prediction.mask),
            "tumour_pixels": prediction.tumour_pixels, "tumour_area_mm2": prediction.tumour_area_mm2,
            "tumour_volume_ml": prediction.tumour_volume_ml, "mask": str(folder), "status": "ok",
            "note": prediction.note, "series": prediction.series if channels is not None else ""}
