"""`brainseg predict`: masks, overlays and tumour areas for image files, folders, patient folders
and NIfTI volumes. Cases stream through one at a time (slices in batches), so memory stays flat
however many files there are. A bad file is reported and skipped; the rest are written.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from brainseg import plots
from brainseg.config import normalise_device
from brainseg.data.dicom import DicomSeries, find_series, holds_dicom, is_dicom_file
from brainseg.data.index import SLICE_NAME, ensure_outside
from brainseg.data.io import (
    DEFAULT_LIMITS,
    IMAGE_SUFFIXES,
    TIFF_SUFFIXES,
    SizeLimits,
    VolumeShapeError,
    equal_channel_text,
    nifti_header,
    read_image,
)
from brainseg.errors import BadInputError, BrainsegError, OptionError
from brainseg.files import WriteError, write_png, writing
from brainseg.inference import Predictor
from brainseg.plots import overlay_rgb8
from brainseg.predict_dicom import channel_plan, dicom_case_row, parse_channels
from brainseg.progress import counter
from brainseg.runs.model_file import whole

NIFTI_SUFFIXES = (".nii", ".nii.gz")
TABLE_FILE = "predictions.csv"
SETTINGS_FILE = "predictions.json"
COLUMNS = ["case", "kind", "input", "slices", "tumour_pixels", "tumour_volume_ml", "tumour_area_mm2", "mask",
           "equal_channels", "status"]


@dataclass
class Case:
    """One unit of prediction: a single image, a kaggle_3m patient folder, or a NIfTI volume."""

    kind: str  # image, patient, nifti or dicom
    name: str
    paths: list[Path]
    series: DicomSeries | None = None  # a DICOM case's series (headers only)
    source: Path | None = None  # a DICOM case's input: the file or folder given
    study: list[DicomSeries] | None = None  # with --channels: the series of a DICOM input, one case


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _nifti_stem(path: Path) -> str:
    name = path.name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else path.stem


def patient_slices(folder: Path) -> list[Path] | None:
    """The numbered slice images of a kaggle_3m patient folder in order, or None if it is not one."""
    slices = []
    for path in folder.iterdir():
        match = SLICE_NAME.match(path.stem)
        if path.suffix.lower() in TIFF_SUFFIXES and match and not match["mask"]:
            slices.append((int(match["number"]), path))
    others = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
              and not p.stem.lower().endswith("_mask") and p not in {s for _, s in slices}]
    if not slices or others:
        return None
    return [path for _, path in sorted(slices)]


def discover(inputs: list[Path], *, studies: bool = False) -> Iterator[Case | BadInputError]:
    """Cases from the inputs in order; an unusable input yields its error instead. With `studies`
    (--channels), the DICOM series of an input are one case, whose series feed the model's channels."""
    for item in inputs:
        if not item.exists():
            yield BadInputError(item, "does not exist")
        elif item.is_file():
            if is_nifti(item):
                yield Case("nifti", _nifti_stem(item), [item])
            elif item.suffix.lower() not in IMAGE_SUFFIXES and is_dicom_file(item):
                yield from discover_dicom(item, studies=studies)
            elif item.suffix.lower() in IMAGE_SUFFIXES:
                yield Case("image", item.stem, [item])
            else:
                yield BadInputError(item, f"unsupported file type {item.suffix or '(none)'!r}")
        else:
            yield from _discover_folder(item, studies)


def _discover_folder(folder: Path, studies: bool = False) -> Iterator[Case | BadInputError]:
    slices = patient_slices(folder)
    if slices:
        yield Case("patient", folder.name, slices)
        return
    entries = sorted((p for p in folder.iterdir() if not p.name.startswith(".")), key=lambda p: p.name)
    subfolders = [p for p in entries if p.is_dir() and patient_slices(p)]
    files = [p for p in entries if p.is_file() and not p.stem.lower().endswith("_mask")
             and (p.suffix.lower() in IMAGE_SUFFIXES or is_nifti(p))]
    if not subfolders and not files:
        if holds_dicom(folder):
            yield from discover_dicom(folder, studies=studies)
            return
        yield BadInputError(folder, "empty folder: no images, NIfTI volumes, DICOM or patient folders")
        return
    for sub in subfolders:
        yield Case("patient", sub.name, patient_slices(sub))
    for path in files:
        yield Case("nifti", _nifti_stem(path), [path]) if is_nifti(path) else Case("image", path.stem, [path])


def discover_dicom(path: Path, *, studies: bool = False) -> Iterator[Case | BadInputError]:
    """A case per DICOM series under `path` (a .dcm file or a folder), named after the file or folder,
    with the series' number and description where the folder holds several; each unusable file is an
    error. With `studies`, all the series under `path` are one case named after it."""
    found = find_series(path)
    series = [item for item in found if isinstance(item, DicomSeries)]
    base = path.stem if path.is_file() else path.name
    if studies and series:
        yield Case("dicom", base, [file for item in series for file in item.files], source=path, study=series)
        series = []
    slugs = Counter(item.slug for item in series)
    for item in series:
        name = base if len(series) == 1 else f"{base}_{item.slug}"
        if slugs[item.slug] > 1:  # series alike in number and description: their folder or UID tells them
            folder = item.files[0].parent
            name += f"_{folder.name}" if folder != path else f"_{item.series_uid.replace('.', '')[-6:]}"
        source = Path(os.path.commonpath(item.files)) if len(item.files) > 1 else item.files[0]
        yield Case("dicom", name, item.files, series=item, source=source)
    yield from (item for item in found if isinstance(item, BadInputError))


def name_uniquely(cases: list[Case]) -> list[Case]:
    """Give cases that share a name (x.tif in two folders, x.tif and x.png) names of their own, as every
    output is named after its case: the folder it came from first, then a number where still needed.
    A name that no other case has is kept."""
    counts = Counter(case.name for case in cases)
    taken = {name for name, count in counts.items() if count == 1}
    for case in cases:
        if counts[case.name] == 1:
            continue
        base = f"{_case_input(case).parent.name}_{case.name}"
        name, number = base, 2
        while name in taken:
            name, number = f"{base}_{number}", number + 1
        taken.add(name)
        case.name = name
    return cases


def _labelled_slices(folder: Path) -> bool:
    """Whether `folder` holds numbered _mask slices, as a kaggle_3m patient folder does."""
    try:
        return any(p.suffix.lower() in TIFF_SUFFIXES and (m := SLICE_NAME.match(p.stem)) and m["mask"]
                   for p in folder.iterdir())
    except OSError:  # an unreadable folder is no data set we can tell
        return False


def data_set_root(folder: Path) -> Path | None:
    """The data set that `folder` is part of, found from `folder` upwards (None: none): the folder
    holding an images_masks set's images/ and masks/, or the parent of a kaggle_3m patient folder.

    A patient folder is told by its _mask slices, so that a folder of unlabelled slices given to predict
    is none; its parent is the data set when it holds another one, else (a patient copied out on its
    own) only the patient folder is, so that writing beside that copy stays allowed."""
    for part in (folder, *folder.parents):
        if part.name in ("images", "masks") and (part.parent / "images").is_dir() \
                and (part.parent / "masks").is_dir():
            return part.parent
        if _labelled_slices(part):
            others = (p for p in part.parent.iterdir() if p != part and p.is_dir() and _labelled_slices(p))
            root = part.parent if next(others, None) else part
            # As in index.detect_layout, the folder that holds kaggle_3m/ is the data set too.
            return root.parent if root.name == "kaggle_3m" else root
    return None


def data_folders(item: Path) -> list[Path]:
    """Folders that outputs must stay out of: a folder given as input, the folder of a file that
    belongs to a data set (a kaggle_3m patient's slice, or an image of an images/ + masks/ pair), and
    the whole data set that either lies in."""
    if item.is_dir():
        folders = [item]
    elif item.suffix.lower() in TIFF_SUFFIXES and patient_slices(item.parent):
        folders = [item.parent]
    else:
        folders = []
    root = data_set_root(item if item.is_dir() else item.parent)
    return [*folders, root] if root else folders


def nifti_to_slices(path: Path, axis: int, limits: SizeLimits = DEFAULT_LIMITS,
                    check_channels=None) -> tuple[np.ndarray, object]:
    """A NIfTI volume as (N, H, W, C) uint8 slices along `axis`, scaled by its 0.5-99.5 percentiles.
    Its header is checked against `limits`, and its channel count with `check_channels(count, name)`
    (e.g. Predictor.check_channels), before any voxel is decoded. Scaled in place: the peak is about
    two float32 copies of the volume."""
    if not 0 <= axis <= 2:
        raise BadInputError("--axis", "must be 0, 1 or 2")
    volume = nifti_header(path, axis, limits)
    shape = volume.header.get_data_shape()
    if check_channels is not None:
        check_channels(int(shape[3]) if len(shape) == 4 else 1, str(path.name))
    try:
        data = np.asarray(volume.dataobj, dtype=np.float32)
    except Exception as error:  # nibabel raises many types for corrupt files
        raise BadInputError(path, f"unreadable NIfTI ({type(error).__name__})") from None
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim not in (3, 4):
        raise BadInputError(path, f"expected a 3D volume (or 4D with channels last), got shape {data.shape}")
    data = np.moveaxis(data, axis, 0)
    if np.isfinite(data).all():
        low, high = np.percentile(data, [0.5, 99.5])
    else:
        finite = data[np.isfinite(data)]
        low, high = (np.percentile(finite, [0.5, 99.5]) if finite.size else (0.0, 1.0))
        del finite
        np.nan_to_num(data, copy=False)
    data -= low
    data *= 255 / max(high - low, 1e-6)
    np.clip(data, 0, 255, out=data)
    slices = np.rint(data, out=data).astype(np.uint8)
    return (slices[..., None] if slices.ndim == 3 else slices), volume


def check_outputs(inputs: list[Path], out: Path, *, overwrite: bool = False) -> None:
    """Refuse, before anything is read or written: an input that does not exist, an `out` inside a data
    folder or holding any input (at any depth: its masks could replace it), and an `out` that holds
    earlier predictions unless `overwrite`."""
    for item in inputs:
        if not item.exists():
            raise BadInputError(item, "does not exist")
    for item in inputs:
        for folder in data_folders(item):
            ensure_outside(out, folder)
        _ensure_not_holding(out, item)
    earlier = [name for name in (TABLE_FILE, SETTINGS_FILE) if (out / name).exists()]
    if earlier and not overwrite:
        raise BadInputError(out, f"already holds predictions ({', '.join(earlier)}); pass --overwrite to "
                                 "replace them, or choose another --out")


def _ensure_not_holding(out: Path, item: Path) -> None:
    try:
        folder = out.resolve()
        # The input as named (a link is replaced where it stands) and the file it leads to.
        places = {item.parent.resolve() / item.name, item.resolve()}
    except (RuntimeError, OSError):  # Python 3.11 raises RuntimeError on a symbolic link loop
        raise BadInputError(item, "is a symbolic link loop") from None
    if any(folder == place or folder in place.parents for place in places):
        raise BadInputError(out, f"holds the input {item}, which an output could replace; write outputs "
                                 "to a folder of their own")


class _Table:
    """predictions.csv, written a row at a time, so that the cases done are on disk whatever stops the
    batch."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict] = []
        with writing(path), path.open("w", newline="") as file:
            csv.writer(file).writerow(COLUMNS)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        with writing(self.path), self.path.open("a", newline="") as file:
            csv.DictWriter(file, COLUMNS, restval="").writerow({key: _cell(row.get(key)) for key in COLUMNS})

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows).reindex(columns=COLUMNS)


def _cell(value):
    return "" if value is None or (isinstance(value, float) and value != value) else value


def predict_paths(model: str | Path, inputs: list[str | Path], out: str | Path, *, backend: str = "torch",
                  device: str = "auto", batch_size: int = 16, save_probabilities: bool = False,
                  overlays: bool = True, largest_component: bool | None = None, min_size: int | None = None,
                  min_fraction: float | None = None,
                  tta_flip: bool = False, threshold: float | None = None, axis: int = 2,
                  progress: bool = True, overwrite: bool = False, channels: str | None = None,
                  anonymize: bool = False, shard: str | None = None,
                  max_pixels: int = DEFAULT_LIMITS.slice_pixels, echo=print) -> pd.DataFrame:
    """Predict every case found in `inputs`, write masks/overlays under `out`, and predictions.csv (a
    row per case as it is done) and predictions.json.

    `shard` ("K/N") predicts only the K-th of N shares of the cases (see :func:`take_shard`) and records
    it in predictions.json, for `brainseg merge` (predict_merge) to join the N folders.

    `channels` ("pre=T1,flair=FLAIR,post=T1 post", see `predict_dicom.parse_channels`) makes the DICOM
    series of each input one case, the series it names feeding the model's channels; `anonymize`
    writes DICOM SEGs without patient-identifying attributes.

    Refused before anything is written: see :func:`check_outputs`. A case that fails is a row with its
    problem and the batch goes on; a file that cannot be written (a full disk) stops it with an error
    naming that file, the table of the cases done already on disk."""
    out = Path(out)
    normalise_device(device)  # option errors before any input is looked at
    if not whole(max_pixels, 1):
        raise OptionError(f"--max-pixels: must be a whole number of at least 1, not {max_pixels}")
    limits = replace(DEFAULT_LIMITS, slice_pixels=int(max_pixels))
    share = parse_shard(shard) if shard is not None else None
    entries = parse_channels(channels) if channels is not None else None
    check_outputs([Path(p) for p in inputs], out, overwrite=overwrite)
    predictor = Predictor.load(model, backend=backend, device=device, batch_size=batch_size,
                               tta_flip=tta_flip, threshold=threshold, largest_component=largest_component,
                               min_size=min_size, min_fraction=min_fraction)
    plan = channel_plan(entries, predictor.slice_channels) if entries is not None else None
    dicom = {"channels": plan, "anonymize": anonymize}
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        (out / SETTINGS_FILE).unlink(missing_ok=True)  # an earlier run's, until this one's is written
    table = _Table(out / TABLE_FILE)
    pending: list[Case] = []  # single images wait here to go through the network as one batch

    def flush() -> None:
        start = bar.n
        for row in _predict_images(predictor, pending, out, save_probabilities, overlays, echo, limits):
            table.add(row)
        bar.update(max(0, start + len(pending) - bar.n))  # images refused before the network
        pending.clear()

    found = list(discover([Path(p) for p in inputs], studies=plan is not None))
    name_uniquely([case for case in found if isinstance(case, Case)])
    total, batch = len(found), batch_id(found)  # of all the shards together
    if share is not None:
        found = take_shard(found, *share)
    expected = [_slices_in(case, axis) for case in found]
    bar = counter(sum(expected), desc="predicting", unit="slice", enabled=progress, echo=echo)
    echo, predictor.on_slices = bar.say, bar.update  # messages on their own line above the bar
    try:  # a write that fails stops the batch; the bar is closed all the same
        for case, slices in zip(found, expected, strict=True):
            bar.set_postfix_str(case.name if isinstance(case, Case) else case.path.name)
            start = bar.n
            if isinstance(case, BadInputError):
                bar.update(slices)
                echo(f"error: {case}")
                table.add({"case": case.path.name, "input": str(case.path), "status": case.problem})
                continue
            if case.kind == "image":
                pending.append(case)
                if len(pending) >= batch_size:
                    flush()
                continue
            try:
                row = _predict_volume_case(predictor, case, out, save_probabilities, overlays, axis, limits,
                                           **dicom)
            except WriteError:
                raise
            except BrainsegError as error:
                echo(f"error: {error}")
                row = {"case": case.name, "kind": case.kind, "input": str(_case_input(case)),
                       "status": _problem(error)}
            table.add(row)
            bar.update(max(0, start + slices - bar.n))  # a volume that failed, or held fewer slices
            if row.get("equal_channels"):
                echo(f"note: {case.name}: channels {row['equal_channels']} are identical in every "
                     "slice (a sequence replaced by FLAIR?); the model may miss tumour on such scans")
            if row.get("series"):
                echo(f"{case.name}: {row['series']}")
            if row.get("note"):
                echo(f"warning: {case.name}: {row['note']}")
        flush()
    finally:
        bar.close()
    frame = table.frame()
    failed = int((frame["status"] != "ok").sum())
    settings = {"model": predictor.identity, "threshold": predictor.cutoff, **predictor.postprocessing,
                "tta_flip": predictor.tta_flip, "cases": len(frame), "failed": failed,
                **({"channels": plan} if plan else {}), **({"anonymize": True} if anonymize else {})}
    if share is not None:  # what merge checks: which share, of how many cases, masks written under `out`
        settings |= {"shard": f"{share[0]}/{share[1]}", "shard_of": total, "batch": batch, "out": str(out)}
    with writing(out / SETTINGS_FILE):
        (out / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")
    return frame


def _slices_in(case: Case | BadInputError, axis: int) -> int:
    """Slices a case holds, from its file list or a header (1 where a header cannot tell)."""
    if isinstance(case, BadInputError):
        return 1
    if case.kind == "nifti":
        try:
            shape = nifti_header(case.paths[0], axis).shape
            return int(shape[axis]) if len(shape) > axis else 1
        except BrainsegError:
            return 1
    if case.kind == "dicom":
        series = case.study[0] if case.study else case.series
        return len(series.files) if series is not None else 1
    return len(case.paths)


def parse_shard(text: str) -> tuple[int, int]:
    """A shard given as K/N (whole numbers, 1 <= K <= N) as (K, N); else a one-line OptionError."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        raise OptionError(f"--shard must be K/N with whole numbers 1 <= K <= N, e.g. 2/4; got {text!r}")
    return int(match[1]), int(match[2])


def shard_key(item: Case | BadInputError) -> tuple[str, str]:
    """What shares are dealt by: the case's name (unique in a batch), then its input."""
    if isinstance(item, Case):
        return item.name, str(_case_input(item))
    return item.path.name, str(item.path)


def take_shard(items: list, k: int, n: int) -> list:
    """The K-th of N shares of the cases (and unusable inputs) found: in order of :func:`shard_key`,
    every N-th from the K-th on, so that N runs over the same inputs, on any machines, each take a share
    of their own (sizes differ by one at most) and together take every case once. Kept in the order
    found."""
    chosen = {id(item) for item in sorted(items, key=shard_key)[k - 1::n]}
    return [item for item in items if id(item) in chosen]


def batch_id(items: list) -> str:
    """A digest of the names of every case of a batch, the same for all its shards wherever they ran."""
    names = "\n".join(sorted(shard_key(item)[0] for item in items))
    return hashlib.sha256(names.encode()).hexdigest()[:16]


def _case_input(case: Case) -> Path:
    if case.source is not None:
        return case.source
    return case.paths[0].parent if case.kind == "patient" else case.paths[0]


def _problem(error: BrainsegError) -> str:
    return error.problem if isinstance(error, BadInputError) else str(error)


def _probability_png(probability: np.ndarray) -> np.ndarray:
    return (probability * 255).round().astype(np.uint8)


def _predict_images(predictor, cases: list[Case], out: Path, save_probabilities: bool, overlays: bool,
                    echo, limits: SizeLimits = DEFAULT_LIMITS) -> list[dict]:
    """Single images, read, checked and predicted as one batch; each bad one becomes an error row."""
    rows, good, images = [], [], []
    for case in cases:
        try:
            images.append(predictor.check_image(read_image(case.paths[0], limits), str(case.paths[0])))
            good.append(case)
        except WriteError:
            raise
        except BrainsegError as error:
            echo(f"error: {error}")
            rows.append({"case": case.name, "kind": "image", "input": str(case.paths[0]),
                         "status": _problem(error)})
    if predictor.context:  # a 2.5D model sees a single image as a volume of one slice
        probabilities = [predictor.predict_volume(image[None])[0] for image in images]
    else:
        probabilities = predictor.probabilities(images, [image.shape[:2] for image in images])
    for case, image, probability in zip(good, images, probabilities, strict=True):
        mask = predictor.masks(probability)
        target = out / "masks" / f"{case.name}.png"
        write_png(target, mask.astype(np.uint8) * 255)
        if overlays:
            write_png(out / "overlays" / f"{case.name}.png", overlay_rgb8(image, mask))
        if save_probabilities:
            write_png(out / "probabilities" / f"{case.name}.png", _probability_png(probability))
        rows.append({"case": case.name, "kind": "image", "input": str(case.paths[0]), "slices": 1,
                     "tumour_pixels": int(mask.sum()), "mask": str(target), "status": "ok"})
    return rows


def _predict_volume_case(predictor, case: Case, out: Path, save_probabilities: bool, overlays: bool,
                         axis: int, limits: SizeLimits = DEFAULT_LIMITS,
                         channels: dict[str, str] | None = None, anonymize: bool = False) -> dict:
    if case.kind == "dicom":
        return dicom_case_row(predictor, case.series, case.name, _case_input(case), out,
                              save_probabilities=save_probabilities, overlays=overlays, study=case.study,
                              channels=channels, anonymize=anonymize, limits=limits)
    if case.kind == "nifti":
        return _predict_nifti(predictor, case, out, save_probabilities, overlays, axis, limits)
    images = stack_slices([_checked(predictor, path, limits) for path in case.paths], case.paths)
    probability = predictor.predict_volume(images)
    masks = predictor.masks(probability)  # post-processed in 3D
    folder = out / "masks" / case.name
    for path, image, mask, prob in zip(case.paths, images, masks, probability, strict=True):
        write_png(folder / f"{path.stem}_mask.png", mask.astype(np.uint8) * 255)
        if overlays:
            write_png(out / "overlays" / case.name / f"{path.stem}.png", overlay_rgb8(image, mask))
        if save_probabilities:
            write_png(out / "probabilities" / case.name / f"{path.stem}.png", _probability_png(prob))
    return {"case": case.name, "kind": "patient", "input": str(_case_input(case)), "slices": len(case.paths),
            "tumour_pixels": int(masks.sum()), "mask": str(folder),
            "equal_channels": equal_channel_text(images), "status": "ok"}


def stack_slices(images: list[np.ndarray], paths: list[Path]) -> np.ndarray:
    """The slices of a patient folder as one volume; a slice of another size than most is refused by name
    (VolumeShapeError naming the folder), and so is a folder of none."""
    if not images:
        raise VolumeShapeError(paths[0].parent if paths else "patient", "has no slices")
    sizes = Counter(image.shape for image in images)
    if len(sizes) > 1:
        common = sizes.most_common(1)[0][0]
        odd = next(index for index, image in enumerate(images) if image.shape != common)
        height, width = images[odd].shape[:2]
        raise VolumeShapeError(paths[odd].parent, f"slice {paths[odd].name} is {width}x{height} pixels; the "
                                                  f"others are {common[1]}x{common[0]} (a volume's slices "
                                                  "must have one size)")
    return np.stack(images)


def _checked(predictor, path: Path, limits: SizeLimits = DEFAULT_LIMITS) -> np.ndarray:
    return predictor.check_image(read_image(path, limits), str(path))


def _predict_nifti(predictor, case: Case, out: Path, save_probabilities: bool, overlays: bool,
                   axis: int, limits: SizeLimits = DEFAULT_LIMITS) -> dict:
    path = case.paths[0]
    slices, volume = nifti_to_slices(path, axis, limits, check_channels=predictor.check_channels)
    predictor.check_image(slices[0], str(path))
    probability = predictor.predict_volume(slices)
    masks = predictor.masks(probability)
    header = volume.header.copy()
    header.set_data_dtype(np.uint8)
    target = out / "masks" / f"{case.name}_mask.nii.gz"
    target.parent.mkdir(parents=True, exist_ok=True)
    spatial = np.moveaxis(masks.astype(np.uint8), 0, axis)
    with writing(target):
        nib.save(nib.Nifti1Image(spatial, volume.affine, header), str(target))
    if save_probabilities:
        prob_header = volume.header.copy()
        prob_header.set_data_dtype(np.float32)
        (out / "probabilities").mkdir(parents=True, exist_ok=True)
        spatial_probability = np.moveaxis(probability, 0, axis).astype(np.float32)
        probability_file = out / "probabilities" / f"{case.name}_probability.nii.gz"
        with writing(probability_file):
            nib.save(nib.Nifti1Image(spatial_probability, volume.affine, prob_header), str(probability_file))
    if overlays:
        with_tumour = np.flatnonzero(masks.reshape(len(masks), -1).any(1))
        shown = with_tumour if len(with_tumour) else np.array([len(masks) // 2])
        shown = shown[np.linspace(0, len(shown) - 1, min(len(shown), 32)).round().astype(int)]
        montage = out / "overlays" / f"{case.name}.png"
        with writing(montage):
            plots.volume_montage(slices[shown], None, masks[shown], montage,
                                 f"{case.name} (slices with tumour)", numbers=(shown + 1).tolist())
    zooms = volume.header.get_zooms()[:3]
    voxel_ml = float(np.prod(zooms)) / 1000.0
    return {"case": case.name, "kind": "nifti", "input": str(path), "slices": len(slices),
            "tumour_pixels": int(masks.sum()), "tumour_volume_ml": round(int(masks.sum()) * voxel_ml, 3),
            "mask": str(target), "equal_channels": equal_channel_text(slices), "status": "ok"}
