"""Prediction on DICOM series: a series in, a DICOM SEG, a NIfTI mask and PNGs out.

    volume, geometry = read_dicom_series("study/series_3")
    result = predict_dicom(predictor, "study/series_3")      # or predict_series(predictor, volume, geometry)
    write_dicom_outputs(result, Path("out/series_3"))         # seg.dcm, mask.nii.gz, slice PNGs

A greyscale series feeds a 1-channel model as it is. A 3-channel model (LGG's pre-contrast, FLAIR and
post-contrast) gets the one series in all three channels, with a warning, since it was trained on three
different sequences and will miss more tumour.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from brainseg.data.dicom import (
    DicomGeometry,
    DicomSeries,
    read_dicom_series,
    read_series,
    write_nifti,
    write_seg,
)
from brainseg.errors import BadInputError
from brainseg.files import writing
from brainseg.inference import Predictor
from brainseg.plots import overlay

SEG_FILE = "seg.dcm"
NIFTI_FILE = "mask.nii.gz"
PROBABILITY_FILE = "probability.nii.gz"


@dataclass
class DicomPrediction:
    """One series predicted: the uint8 volume the network saw, probabilities, the binary mask."""

    volume: np.ndarray  # (N, H, W) uint8
    geometry: DicomGeometry
    probability: np.ndarray  # (N, H, W) float32
    mask: np.ndarray  # (N, H, W) bool, post-processed in 3D
    note: str = ""  # how the series was fed to the model where that needs saying

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
            "pre-contrast, FLAIR and post-contrast slices; expect it to miss tumour (a 1-channel model "
            "such as pretrained:figshare fits a single series)")


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
    names = [f"{path.name} frame {frame}" if geometry.files.count(path) > 1 else path.name
             for path, frame in zip(geometry.files, geometry.frame_numbers, strict=True)]
    with warnings.catch_warnings():
        if note:  # the note says it better than the Predictor's warning about equal channels
            warnings.filterwarnings("ignore", message=".*channels are equal.*")
        probability = predictor.predict_volume(inputs, names)
    return DicomPrediction(volume, geometry, probability, predictor.masks(probability).astype(bool), note)


def predict_dicom(predictor: Predictor, path: str | Path) -> DicomPrediction:
    """A .dcm file or a folder of one series -> its prediction (with a warning when one series is
    spread over a 3-channel model's channels)."""
    volume, geometry = read_dicom_series(path)
    prediction = predict_series(predictor, volume, geometry)
    if prediction.note:
        warnings.warn(f"{path}: {prediction.note}", stacklevel=2)
    return prediction


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with writing(path):
        Image.fromarray(array).save(path)


def write_dicom_outputs(prediction: DicomPrediction, folder: Path, *, overlays: Path | None = None,
                        probabilities: bool = False, model: str = "brainseg") -> dict[str, Path]:
    """Write `folder`/seg.dcm (DICOM SEG over the source series), `folder`/mask.nii.gz (the series'
    affine), a mask PNG per slice (slice_001_mask.png, in volume order) and, with `overlays`, an
    overlay PNG per slice in that folder. A SEG that cannot be made (such as a series of several
    multi-frame files) is a BadInputError after the other files are written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = {"seg": write_seg(prediction.mask, prediction.geometry, folder / SEG_FILE, model=model)}
    written["nifti"] = write_nifti(prediction.mask.astype(np.uint8), prediction.geometry, folder / NIFTI_FILE)
    if probabilities:
        written["probability"] = write_nifti(prediction.probability.astype(np.float32), prediction.geometry,
                                             folder / PROBABILITY_FILE)
    for k, (image, mask) in enumerate(zip(prediction.volume, prediction.mask, strict=True), start=1):
        _png(folder / f"slice_{k:03d}_mask.png", mask.astype(np.uint8) * 255)
        if overlays is not None:
            _png(overlays / f"slice_{k:03d}.png", (overlay(image, mask) * 255).round().astype(np.uint8))
    return written


def dicom_case_row(predictor: Predictor, series: DicomSeries, name: str, source: Path, out: Path, *,
                   save_probabilities: bool = False, overlays: bool = True) -> dict:
    """`brainseg predict` on one series: outputs under `out`/masks/`name`/ (overlays under
    `out`/overlays/`name`/) and its row of predictions.csv; `note` says how it fed the model."""
    volume, geometry = read_series(series)
    prediction = predict_series(predictor, volume, geometry)
    folder = out / "masks" / name
    model = str(predictor.identity.get("model", "brainseg"))
    write_dicom_outputs(prediction, folder, overlays=out / "overlays" / name if overlays else None,
                        probabilities=save_probabilities, model=model)
    return {"case": name, "kind": "dicom", "input": str(source), "slices": len(volume),
            "tumour_pixels": prediction.tumour_pixels, "tumour_area_mm2": prediction.tumour_area_mm2,
            "tumour_volume_ml": prediction.tumour_volume_ml, "mask": str(folder), "status": "ok",
            "note": prediction.note}
