"""DICOM in and out: series read into the uint8 volume the Predictor takes, with their geometry; masks
written back as DICOM SEG (highdicom) and as NIfTI with the affine of the DICOM geometry.

`find_series(path)` reads only headers: a .dcm file, a folder of one series or of several (any depth)
becomes one `DicomSeries` per SeriesInstanceUID, and each file that cannot be used (truncated, not
DICOM, a structured report or an RT object) a `BadInputError`. `read_series(series)` decodes one
series: rescale slope/intercept, MONOCHROME1 inverted, multi-frame files, slices sorted along the
slice normal (by InstanceNumber where positions are missing), and checks it is one regular volume;
8-bit slices are used as stored, others scaled to 0..255 by the series' percentiles.
`read_dicom_series(path)` does both for a path that holds one series. `write_seg(..., anonymize=True)`
writes a SEG without the patient-identifying attributes (`anonymize_dataset`).

Patient-identifying tags are never put into a message: errors name the file and the problem, and a
series is named by its number, description and a shortened UID.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder
from pydicom.sr.codedict import codes
from pydicom.uid import UID, generate_uid

from brainseg import __version__
from brainseg.data.io import DEFAULT_LIMITS, SizeLimits, TooLargeError, check_slice_size
from brainseg.errors import BadInputError
from brainseg.files import writing

DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
# Modalities that carry no image to segment (reports, RT plans and structures, presentation states,
# other segmentations...); an RT dose grid has pixels but is not an MR/CT image either.
NON_IMAGE_MODALITIES = {"SR": "structured report", "RTSTRUCT": "RT structure set", "RTPLAN": "RT plan",
                        "RTDOSE": "RT dose", "RTRECORD": "RT treatment record", "SEG": "segmentation",
                        "PR": "presentation state", "KO": "key object selection", "DOC": "document",
                        "REG": "registration", "ECG": "ECG waveform", "AU": "audio", "PLAN": "plan"}
ORIENTATION_TOLERANCE = 1e-3  # direction cosines that differ by less are the same orientation
SPACING_TOLERANCE = 0.1  # slice gaps more than 10% off the typical one are missing or uneven slices
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # DICOM patient space is LPS, NIfTI's world space RAS
# Attributes that identify the patient, the visit or the staff, from DICOM PS3.15 Table E.1-1 (Basic
# Application Level Confidentiality Profile), as far as a SEG can carry them: those its modules require
# (type 2) are emptied, the rest removed. UIDs are kept (the profile's Retain UIDs Option), so that an
# anonymised SEG still lies over its series.
EMPTIED_TAGS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                "ReferringPhysicianName", "StudyID", "AccessionNumber", "ContentCreatorName")
REMOVED_TAGS = (
    "PatientBirthTime", "PatientAge", "PatientSize", "PatientWeight", "PatientAddress",
    "PatientTelephoneNumbers", "PatientMotherBirthName", "PatientBirthName", "OtherPatientIDs",
    "OtherPatientNames", "OtherPatientIDsSequence", "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence", "MedicalRecordLocator", "MilitaryRank", "BranchOfService",
    "EthnicGroup", "Occupation", "PatientReligiousPreference", "CountryOfResidence", "RegionOfResidence",
    "PatientInsurancePlanCodeSequence",
    "MedicalAlerts", "Allergies", "SmokingStatus", "PregnancyStatus", "LastMenstrualDate", "PatientState",
    "AdditionalPatientHistory", "PatientComments", "ResponsiblePerson", "ResponsibleOrganization",
    "PatientSpeciesDescription", "PatientBreedDescription", "ReferencedPatientSequence",
    "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers",
    "ReferringPhysicianIdentificationSequence", "ConsultingPhysicianName", "PhysiciansOfRecord",
    "PhysiciansOfRecordIdentificationSequence", "NameOfPhysiciansReadingStudy",
    "PhysiciansReadingStudyIdentificationSequence", "PerformingPhysicianName",
    "PerformingPhysicianIdentificationSequence", "RequestingPhysician", "OperatorsName",
    "OperatorIdentificationSequence", "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName",
    "InstitutionCodeSequence", "StationName", "AdmissionID", "AdmittingDiagnosesDescription",
    "AdmittingDiagnosesCodeSequence", "ServiceEpisodeID", "ServiceEpisodeDescription", "StudyDescription",
    "RequestAttributesSequence", "RequestedProcedureDescription", "PerformedProcedureStepDescription",
    "PerformedProcedureStepID", "ScheduledProcedureStepDescription", "ClinicalTrialSponsorName",
    "ClinicalTrialProtocolID", "ClinicalTrialProtocolName", "ClinicalTrialSiteID", "ClinicalTrialSiteName",
    "ClinicalTrialSubjectID", "ClinicalTrialSubjectReadingID", "ClinicalTrialTimePointID",
    "ClinicalTrialTimePointDescription", "ClinicalTrialCoordinatingCenterName", "ImageComments",
    "AcquisitionComments", "StudyComments", "VisitComments", "CurrentPatientLocation",
)


@dataclass
class DicomSeries:
    """One series found by `find_series`, headers only: its files and what names it in messages."""

    series_uid: str
    files: list[Path]
    description: str = ""
    number: int | None = None
    modality: str = ""

    @property
    def label(self) -> str:
        """A name for messages and outputs that identifies no patient: number, description, short UID."""
        parts = [f"series {self.number}" if self.number is not None else "series",
                 f"{self.description!r}" if self.description else "", f"(UID ...{self.series_uid[-8:]})"]
        return " ".join(part for part in parts if part)

    @property
    def slug(self) -> str:
        """`label` made safe as a file name: s<number>_<description> or the UID's end."""
        text = f"s{self.number}" if self.number is not None else f"uid{self.series_uid[-8:]}"
        if self.description:
            text += "_" + self.description
        return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:60] or "series"


@dataclass
class DicomGeometry:
    """Where a volume of (N, H, W) slices lies in the patient, and what it came from.

    `affine` maps a voxel index (column, row, slice) to RAS millimetres, as a NIfTI affine does (the
    volume's array index is (slice, row, column); `to_nifti_array` reorders it). `spacing` is (slice,
    row, column) spacing in mm; an entry is None where the files do not say it (no PixelSpacing; a
    single slice without SliceThickness), and areas or volumes that need it are then None too.
    """

    affine: np.ndarray
    spacing: tuple[float | None, float | None, float | None]
    series_uid: str
    study_uid: str
    frame_of_reference_uid: str
    sop_instance_uids: list[str]  # per slice, in volume order
    frame_numbers: list[int]  # per slice: 1-based frame of a multi-frame file, else 1
    files: list[Path]  # per slice, in volume order
    description: str = ""
    number: int | None = None
    modality: str = ""
    sorted_by: str = "position"  # position (along the slice normal), instance number, or frames
    datasets: list[Dataset] = field(default_factory=list, repr=False)  # headers of the source files

    @property
    def pixel_area_mm2(self) -> float | None:
        row, column = self.spacing[1], self.spacing[2]
        return None if row is None or column is None else row * column

    @property
    def voxel_ml(self) -> float | None:
        area = self.pixel_area_mm2
        return None if area is None or self.spacing[0] is None else area * self.spacing[0] / 1000.0

    @property
    def label(self) -> str:
        return DicomSeries(self.series_uid, [], self.description, self.number, self.modality).label


def supported_transfer_syntaxes() -> list[str]:
    """Names of the transfer syntaxes that the installed pydicom pixel data handlers decode."""
    names = []
    for uid in pydicom.uid.AllTransferSyntaxes:
        try:
            if get_decoder(uid).is_available:
                names.append(uid.name)
        except NotImplementedError:
            continue
    return names


def is_dicom_file(path: Path) -> bool:
    """A DICOM suffix, or the 'DICM' marker after the 128-byte preamble (files often have no suffix)."""
    if path.name.upper() == "DICOMDIR":
        return False
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with path.open("rb") as file:
            file.seek(128)
            return file.read(4) == b"DICM"
    except OSError:
        return False


def _dicom_files(folder: Path) -> Iterator[Path]:
    return (p for p in folder.rglob("*") if p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(folder).parts) and is_dicom_file(p))


def dicom_files(folder: Path) -> list[Path]:
    """The DICOM files under `folder` at any depth, hidden files and folders left out, in name order."""
    return sorted(_dicom_files(folder))


def holds_dicom(folder: Path) -> bool:
    """Whether `folder` holds a DICOM file at any depth (it stops at the first)."""
    return next(_dicom_files(folder), None) is not None


@contextmanager
def _quiet() -> Iterator[None]:
    """pydicom's warnings and log records kept in: they can quote element values, a patient's name too."""
    logger = logging.getLogger("pydicom")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _read(path: Path, *, pixels: bool) -> Dataset:
    """One file, with pydicom's warnings kept quiet (they can quote element values, patient names too)."""
    try:
        with _quiet():
            return pydicom.dcmread(path, stop_before_pixels=not pixels, force=path.suffix.lower()
                                   in DICOM_SUFFIXES)
    except InvalidDicomError:
        raise BadInputError(path, "is not a DICOM file (no DICM marker)") from None
    except (EOFError, OSError, ValueError, TypeError, KeyError, AttributeError) as error:
        problem = f"unreadable DICOM (truncated or corrupt: {type(error).__name__})"
        raise BadInputError(path, problem) from None


def _check_image_object(path: Path, ds: Dataset, *, pixels: bool) -> None:
    if "SOPClassUID" not in ds and "Rows" not in ds:  # forced reading of a .dcm that is no DICOM
        raise BadInputError(path, "is not a DICOM file (no DICOM header)")
    modality = str(ds.get("Modality", "")).upper()
    if modality in NON_IMAGE_MODALITIES:
        raise BadInputError(path, f"is a DICOM {NON_IMAGE_MODALITIES[modality]} ({modality}), not an image")
    if "Rows" not in ds or "Columns" not in ds or (pixels and "PixelData" not in ds):
        kind = f" ({modality})" if modality else ""
        raise BadInputError(path, f"is a DICOM object without an image{kind}")


def find_series(path: str | Path) -> list[DicomSeries | BadInputError]:
    """The series under `path` (a file or a folder at any depth), read as headers only, one per
    SeriesInstanceUID in order of series number; each unusable file is a BadInputError in the list."""
    path = Path(path)
    if not path.exists():
        return [BadInputError(path, "does not exist")]
    files = [path] if path.is_file() else dicom_files(path)
    if not files:
        return [BadInputError(path, "holds no DICOM files")]
    found: dict[str, DicomSeries] = {}
    problems: list[DicomSeries | BadInputError] = []
    for file in files:
        try:
            ds = _read(file, pixels=False)
            _check_image_object(file, ds, pixels=False)
        except BadInputError as error:
            problems.append(error)
            continue
        uid = str(ds.get("SeriesInstanceUID", "")) or f"no-series-uid:{file.parent}"
        if uid not in found:
            number = ds.get("SeriesNumber")
            found[uid] = DicomSeries(uid, [], str(ds.get("SeriesDescription", "") or ""),
                                     int(number) if number not in (None, "") else None,
                                     str(ds.get("Modality", "")))
        found[uid].files.append(file)
    ordered = sorted(found.values(), key=lambda s: (s.number is None, s.number or 0, s.series_uid))
    return [*ordered, *problems]


def read_dicom_series(path: str | Path,
                      limits: SizeLimits = DEFAULT_LIMITS) -> tuple[np.ndarray, DicomGeometry]:
    """A .dcm file or a folder holding one series -> ((N, H, W) uint8 volume, its geometry).

    A folder with several series is refused (naming them); use `find_series` and `read_series` for it.
    """
    found = find_series(path)
    series = [item for item in found if isinstance(item, DicomSeries)]
    errors = [item for item in found if isinstance(item, BadInputError)]
    if not series:
        raise errors[0]
    if len(series) > 1:
        names = "; ".join(s.label for s in series)
        raise BadInputError(path, f"holds {len(series)} series ({names}); give one series folder")
    return read_series(series[0], limits)


@dataclass
class _Frame:
    file: Path
    index: int  # 0-based frame in its file
    dataset: Dataset
    position: np.ndarray | None
    orientation: np.ndarray | None
    pixel_spacing: tuple[float, float] | None
    instance: int | None
    slope: float
    intercept: float


def _floats(value) -> np.ndarray | None:
    try:
        return None if value is None else np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None


def _group_item(ds: Dataset, index: int, sequence: str, keyword: str):
    """An attribute of an enhanced multi-frame file: the frame's own functional group, else the shared."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    shared = ds.get("SharedFunctionalGroupsSequence") or []
    for group in ([per_frame[index]] if index < len(per_frame) else []) + list(shared[:1]):
        items = group.get(sequence)
        if items and keyword in items[0]:
            return items[0].get(keyword)
    return None


def _frames(path: Path, ds: Dataset) -> list[_Frame]:
    count = int(ds.get("NumberOfFrames", 1) or 1)
    instance = ds.get("InstanceNumber")
    instance = int(instance) if instance not in (None, "") else None
    frames = []
    for index in range(count):
        position = _floats(_group_item(ds, index, "PlanePositionSequence", "ImagePositionPatient"))
        orientation = _floats(_group_item(ds, index, "PlaneOrientationSequence", "ImageOrientationPatient"))
        spacing = _floats(_group_item(ds, index, "PixelMeasuresSequence", "PixelSpacing"))
        slope = _group_item(ds, index, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = _group_item(ds, index, "PixelValueTransformationSequence", "RescaleIntercept")
        if position is None and count == 1:
            position = _floats(ds.get("ImagePositionPatient"))
        if orientation is None:
            orientation = _floats(ds.get("ImageOrientationPatient"))
        if spacing is None:
            spacing = _floats(ds.get("PixelSpacing"))
        slope = ds.get("RescaleSlope", 1) if slope is None else slope
        intercept = ds.get("RescaleIntercept", 0) if intercept is None else intercept
        position = position if position is not None and len(position) == 3 else None
        orientation = orientation if orientation is not None and len(orientation) == 6 else None
        pixel_spacing = (float(spacing[0]), float(spacing[1])) if spacing is not None and len(spacing) == 2 \
            else None
        frames.append(_Frame(path, index, ds, position, orientation, pixel_spacing, instance,
                             float(slope or 1), float(intercept or 0)))
    if count > 1 and all(f.position is None for f in frames) and "ImagePositionPatient" in ds:
        _legacy_frame_positions(ds, frames)
    return frames


def _legacy_frame_positions(ds: Dataset, frames: list[_Frame]) -> None:
    """A multi-frame file without per-frame positions: frames one SpacingBetweenSlices apart along
    the normal from ImagePositionPatient (none is set where the file does not give the spacing)."""
    origin = _floats(ds.get("ImagePositionPatient"))
    orientation = _floats(ds.get("ImageOrientationPatient"))
    step = ds.get("SpacingBetweenSlices") or ds.get("SliceThickness")
    if origin is None or orientation is None or len(origin) != 3 or len(orientation) != 6 or not step:
        return
    normal = np.cross(orientation[:3], orientation[3:])
    for frame in frames:
        frame.position = origin + normal * float(step) * frame.index


def _check_decodable(path: Path, ds: Dataset) -> None:
    syntax = UID(str(ds.file_meta.get("TransferSyntaxUID", pydicom.uid.ImplicitVRLittleEndian)))
    name = syntax.name if syntax.is_transfer_syntax else str(syntax)
    try:
        available = get_decoder(syntax).is_available
    except NotImplementedError:
        available = False
    if not available:
        raise BadInputError(path, f"transfer syntax {name} ({syntax}) cannot be decoded here; supported: "
                                  f"{', '.join(supported_transfer_syntaxes())}")


def _pixels(path: Path, ds: Dataset) -> np.ndarray:
    """The stored values of every frame, (F, H, W), before rescaling."""
    _check_decodable(path, ds)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if samples != 1 or not photometric.startswith("MONOCHROME"):
        raise BadInputError(path, f"is a colour image ({photometric}, {samples} samples per pixel); "
                                  "expected a greyscale MR/CT series")
    try:
        with _quiet():
            array = ds.pixel_array
    except Exception as error:  # pydicom and its handlers raise many types for bad pixel data
        detail = str(error).splitlines()[0].split(" - ")[0][:160] if str(error) else type(error).__name__
        raise BadInputError(path, f"pixel data cannot be decoded (truncated file?): {detail}") from None
    return array.reshape(-1, *array.shape[-2:])


def _unit(vector: np.ndarray) -> np.ndarray:
    length = np.linalg.norm(vector)
    return vector / length if length else vector


def read_series(series: DicomSeries, limits: SizeLimits = DEFAULT_LIMITS) -> tuple[np.ndarray, DicomGeometry]:
    """One series -> ((N, H, W) uint8 volume, geometry); a series that is not one regular volume
    (sizes, orientations or pixel spacings that differ, missing or duplicate slices) is refused naming
    the file where it breaks."""
    datasets = {path: _read(path, pixels=True) for path in series.files}
    for path, ds in datasets.items():
        _check_image_object(path, ds, pixels=True)
        check_slice_size(path, int(ds.Columns), int(ds.Rows), limits)
    frames = [frame for path, ds in datasets.items() for frame in _frames(path, ds)]
    _check_consistent(series, frames)
    frames, sorted_by, slice_step = _sort(series, frames)
    rows, columns = int(frames[0].dataset.Rows), int(frames[0].dataset.Columns)
    if len(frames) > limits.slices or len(frames) * rows * columns > limits.voxels:
        raise TooLargeError(frames[0].file.parent, f"series of {len(frames)} slices of {columns}x{rows} is "
                                                   f"more than the limits ({limits.slices} slices, "
                                                   f"{limits.voxels:,} voxels)")
    stored = {path: _pixels(path, ds) for path, ds in datasets.items()}
    values = np.empty((len(frames), rows, columns), np.float32)
    for k, frame in enumerate(frames):
        values[k] = stored[frame.file][frame.index].astype(np.float32) * frame.slope + frame.intercept
        if str(frame.dataset.get("PhotometricInterpretation", "")) == "MONOCHROME1":
            values[k] = -values[k]  # MONOCHROME1: low values are bright; negate so bright is high
    geometry = _geometry(series, frames, sorted_by, slice_step)
    return (values.astype(np.uint8) if stored_as_uint8(frames) else to_uint8(values)), geometry


def stored_as_uint8(frames: list[_Frame]) -> bool:
    """Whether the slices are 8-bit unsigned MONOCHROME2 values without rescaling: already the 0..255
    images the model takes, used as stored (as the same slices saved as PNG or TIFF would be) rather
    than stretched by percentiles."""
    return all(int(f.dataset.get("BitsStored") or f.dataset.get("BitsAllocated") or 16) <= 8
               and int(f.dataset.get("PixelRepresentation") or 0) == 0 and f.slope == 1 and f.intercept == 0
               and str(f.dataset.get("PhotometricInterpretation", "")) == "MONOCHROME2" for f in frames)


def to_uint8(values: np.ndarray) -> np.ndarray:
    """Rescaled values (modality units: MR arbitrary, CT Hounsfield) -> uint8, per volume.

    The volume's 0.5th and 99.5th percentiles map to 0 and 255 and values outside are clipped, as
    `brainseg predict` scales NIfTI volumes: one scale for the whole series keeps slices comparable
    (the Predictor normalises over the volume too), and percentiles rather than min/max keep a few
    very bright voxels (vessels, fat, artefacts) from squeezing brain tissue into a few grey levels.
    """
    finite = values[np.isfinite(values)]
    low, high = np.percentile(finite, [0.5, 99.5]) if finite.size else (0.0, 1.0)
    scaled = np.clip((np.nan_to_num(values) - low) / max(high - low, 1e-6), 0, 1) * 255
    return scaled.round().astype(np.uint8)


def _check_consistent(series: DicomSeries, frames: list[_Frame]) -> None:
    first = frames[0]
    size = (int(first.dataset.Rows), int(first.dataset.Columns))
    for frame in frames[1:]:
        other = (int(frame.dataset.Rows), int(frame.dataset.Columns))
        if other != size:
            raise BadInputError(frame.file, f"is {other[1]}x{other[0]} pixels; {first.file.name} in the same "
                                            f"{series.label} is {size[1]}x{size[0]} (one series must have "
                                            "one size)")
        if (frame.orientation is None) != (first.orientation is None) or (
                frame.orientation is not None
                and np.abs(frame.orientation - first.orientation).max() > ORIENTATION_TOLERANCE):
            raise BadInputError(frame.file, f"has another orientation (ImageOrientationPatient) than "
                                            f"{first.file.name} in the same {series.label}")
        if frame.pixel_spacing is not None and first.pixel_spacing is not None and not np.allclose(
                frame.pixel_spacing, first.pixel_spacing, rtol=1e-3):
            raise BadInputError(frame.file, f"has pixel spacing {frame.pixel_spacing} mm; {first.file.name} "
                                            f"in the same {series.label} has {first.pixel_spacing} mm")


def _name(frame: _Frame) -> str:
    return frame.file.name if frame.dataset.get("NumberOfFrames", 1) in (None, "", 1, "1") \
        else f"{frame.file.name} frame {frame.index + 1}"


def _sort(series: DicomSeries, frames: list[_Frame]) -> tuple[list[_Frame], str, float | None]:
    """Frames in volume order: by position along the slice normal where every frame has one, else by
    InstanceNumber (frame order within a multi-frame file); also the slice step in mm (None unknown)."""
    if len(frames) == 1:
        ds = frames[0].dataset
        step = ds.get("SpacingBetweenSlices") or ds.get("SliceThickness")
        return frames, "position", float(step) if step else None
    if all(f.position is not None and f.orientation is not None for f in frames):
        normal = _unit(np.cross(frames[0].orientation[:3], frames[0].orientation[3:]))
        frames = sorted(frames, key=lambda f: float(f.position @ normal))
        distances = np.array([float(f.position @ normal) for f in frames])
        steps = np.diff(distances)
        _check_steps(series, frames, steps)
        return frames, "position", float(np.median(steps))
    if len({f.file for f in frames}) == 1:  # one multi-frame file without positions: its frame order
        ds = frames[0].dataset
        step = ds.get("SpacingBetweenSlices") or ds.get("SliceThickness")
        return frames, "frames", float(step) if step else None
    if any(f.instance is None for f in frames):
        missing = next(f for f in frames if f.instance is None)
        raise BadInputError(missing.file, f"has neither ImagePositionPatient nor InstanceNumber, so the "
                                          f"slices of {series.label} cannot be ordered")
    frames = sorted(frames, key=lambda f: (f.instance, f.index))
    numbers = Counter((f.instance, f.index) for f in frames)
    repeated = next((f for f in frames if numbers[(f.instance, f.index)] > 1), None)
    if repeated is not None:
        raise BadInputError(repeated.file, f"has InstanceNumber {repeated.instance}, as another file of "
                                           f"{series.label} has (several acquisitions in one series?)")
    ds = frames[0].dataset
    step = ds.get("SpacingBetweenSlices") or ds.get("SliceThickness")
    return frames, "instance number", float(step) if step else None


def _check_steps(series: DicomSeries, frames: list[_Frame], steps: np.ndarray) -> None:
    """Slices must be evenly spaced along the normal: two at one position or a gap is refused."""
    for k, step in enumerate(steps):
        if step < 1e-3:
            raise BadInputError(frames[k + 1].file, f"lies at the same position as {_name(frames[k])} in "
                                                    f"{series.label} (several acquisitions or echoes in one "
                                                    "series?)")
    typical = float(np.median(steps))
    for k, step in enumerate(steps):
        if abs(step - typical) > SPACING_TOLERANCE * typical:
            kind = "missing slice(s)" if step > typical else "uneven slice spacing"
            raise BadInputError(frames[k + 1].file, f"{kind} in {series.label}: {step:.2f} mm from "
                                                    f"{_name(frames[k])}, while slices are {typical:.2f} mm "
                                                    "apart")


def _geometry(series: DicomSeries, frames: list[_Frame], sorted_by: str,
              slice_step: float | None) -> DicomGeometry:
    first = frames[0]
    row_spacing, column_spacing = first.pixel_spacing or (None, None)
    orientation = first.orientation if first.orientation is not None else np.array([1.0, 0, 0, 0, 1, 0])
    along_row, along_column = _unit(orientation[:3]), _unit(orientation[3:])
    normal = _unit(np.cross(along_row, along_column))
    lps = np.eye(4)
    lps[:3, 0] = along_row * (column_spacing or 1.0)  # the column index moves along a row
    lps[:3, 1] = along_column * (row_spacing or 1.0)
    if len(frames) > 1 and frames[-1].position is not None and first.position is not None:
        lps[:3, 2] = (frames[-1].position - first.position) / (len(frames) - 1)
    else:
        lps[:3, 2] = normal * (slice_step or 1.0)
    lps[:3, 3] = first.position if first.position is not None else 0.0
    ds = first.dataset
    return DicomGeometry(
        affine=LPS_TO_RAS @ lps, spacing=(slice_step, row_spacing, column_spacing),
        series_uid=series.series_uid, study_uid=str(ds.get("StudyInstanceUID", "")),
        frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "")),
        sop_instance_uids=[str(f.dataset.get("SOPInstanceUID", "")) for f in frames],
        frame_numbers=[f.index + 1 for f in frames], files=[f.file for f in frames],
        description=series.description, number=series.number, modality=series.modality, sorted_by=sorted_by,
        datasets=list({f.file: f.dataset for f in frames}.values()))


def to_nifti_array(volume: np.ndarray) -> np.ndarray:
    """(N, H, W) slices -> the (column, row, slice) array that `DicomGeometry.affine` indexes."""
    return np.ascontiguousarray(np.transpose(volume, (2, 1, 0)))


def write_nifti(volume: np.ndarray, geometry: DicomGeometry, path: Path) -> Path:
    """A mask or probability volume (N, H, W) as NIfTI with the series' affine (scanner RAS, mm)."""
    image = nib.Nifti1Image(to_nifti_array(volume), geometry.affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(geometry.affine, code=1)
    image.set_sform(geometry.affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    with writing(path):
        nib.save(image, str(path))
    return path


def write_seg(mask: np.ndarray, geometry: DicomGeometry, path: Path, *, model: str = "brainseg",
              anonymize: bool = False) -> Path:
    """A binary (N, H, W) mask as a DICOM Segmentation with one segment, "tumour", referencing the
    source series' instances (frame by frame), so a viewer shows it over the series. The SEG copies the
    source's patient and study attributes, as DICOM requires; `anonymize` empties or removes the
    identifying ones (`anonymize_dataset`)."""
    mask = np.asarray(mask).astype(bool)
    if len(geometry.datasets) == 1 and len(mask) > 1:
        # One multi-frame source: SEG frames follow the source's own frame order.
        order = np.argsort(np.asarray(geometry.frame_numbers))
        sources, pixels = geometry.datasets, mask[order]
    elif len(geometry.datasets) == len(mask):
        sources, pixels = geometry.datasets, mask
    else:
        raise BadInputError(geometry.files[0].parent, "a series of several multi-frame files cannot be "
                                                      "written as DICOM SEG")
    algorithm = hd.AlgorithmIdentificationSequence(name="brainseg", version=__version__,
                                                   family=codes.cid7162.ArtificialIntelligence)
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label="tumour",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            seg = hd.seg.Segmentation(
                source_images=sources, pixel_array=pixels,
                segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=[segment],
                series_instance_uid=generate_uid(),
                series_number=(geometry.number or 0) + 1000, sop_instance_uid=generate_uid(),
                instance_number=1, manufacturer="brainseg", manufacturer_model_name=model[:64] or "brainseg",
                software_versions=__version__, device_serial_number="none", omit_empty_frames=False,
                series_description=f"brainseg tumour {geometry.description}"[:64])
    except (ValueError, TypeError, AttributeError, KeyError) as error:
        detail = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise BadInputError(geometry.files[0], f"cannot be referenced by a DICOM SEG: {detail}") from None
    if anonymize:
        anonymize_dataset(seg)
        seg.SeriesDescription = "brainseg tumour"  # the source's description could name the patient
    path.parent.mkdir(parents=True, exist_ok=True)
    with writing(path):
        seg.save_as(path)
    return path


def anonymize_dataset(ds: Dataset) -> Dataset:
    """Empty or remove the patient-, visit- and staff-identifying attributes (`EMPTIED_TAGS`,
    `REMOVED_TAGS`) at any depth, and private ones, keeping UIDs; record that this was done
    (PatientIdentityRemoved, DeidentificationMethod and its codes: PS3.15 basic profile, Retain UIDs)."""

    def clean(dataset: Dataset) -> None:
        for keyword in REMOVED_TAGS:
            if keyword in dataset:
                del dataset[keyword]
        for keyword in EMPTIED_TAGS:
            if keyword in dataset:
                dataset[keyword].value = ""
        for element in dataset:
            if element.VR == "SQ":
                for item in element.value:
                    clean(item)

    ds.remove_private_tags()
    clean(ds)
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "brainseg: PS3.15 basic profile subset, UIDs kept"
    methods = []
    for code in (codes.DCM.BasicApplicationConfidentialityProfile, codes.DCM.RetainUidsOption):
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code.value, code.scheme_designator, \
            code.meaning
        methods.append(item)
    ds.DeidentificationMethodCodeSequence = methods
    return ds
