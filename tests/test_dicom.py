"""DICOM in, DICOM SEG and NIfTI out: pydicom's bundled files, a synthetic series with a bright disc as
tumour predicted to a SEG that is read back, and every kind of bad input as one line."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    JPEGLosslessSV1,
    MRImageStorage,
    generate_uid,
)
from torch import nn

from brainseg import predict as predict_module
from brainseg.data.dicom import (
    find_series,
    read_dicom_series,
    read_series,
    supported_transfer_syntaxes,
    to_nifti_array,
)
from brainseg.errors import BadInputError
from brainseg.inference import Predictor
from brainseg.predict import predict_paths
from brainseg.predict_dicom import NIFTI_FILE, SEG_FILE, predict_dicom, write_dicom_outputs
from test_explain import bright_spot_predictor

PATIENT = "Secret^Patient"  # must never appear in a message
SHAPE = (8, 64, 64)
PIXEL = (0.5, 0.75)  # row spacing, column spacing (mm)
STEP = 2.0  # slice spacing (mm)
ORIGIN = np.array([-20.0, -30.0, 10.0])


def disc_volume() -> tuple[np.ndarray, np.ndarray]:
    """int16 values with a bright disc on slices 2-5 (the tumour), and that disc as a mask."""
    rng = np.random.default_rng(0)
    values = rng.integers(100, 300, SHAPE).astype(np.int16)
    rows, cols = np.mgrid[:SHAPE[1], :SHAPE[2]]
    disc = (rows - 30) ** 2 + (cols - 36) ** 2 <= 8 ** 2
    mask = np.zeros(SHAPE, bool)
    mask[2:6] = disc
    values[mask] = 2000
    return values, mask


def slice_dataset(pixels: np.ndarray, k: int, *, series_uid: str, study_uid: str, frame_uid: str,
                  orientation=(1, 0, 0, 0, 1, 0), step: float = STEP, slope: float = 1.0,
                  intercept: float = 0.0) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID = PATIENT, "SECRET-ID-42"
    ds.PatientBirthDate, ds.PatientSex = "19700101", "O"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240101", "120000", "1", ""
    ds.ReferringPhysicianName = ""
    ds.Modality, ds.SeriesNumber, ds.SeriesDescription = "MR", 3, "FLAIR"
    ds.InstanceNumber = SHAPE[0] - k  # reversed, so that sorting must use the positions
    normal = np.cross(orientation[:3], orientation[3:])
    ds.ImagePositionPatient = [float(v) for v in ORIGIN + normal * step * k]
    ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.PixelSpacing = list(PIXEL)
    ds.SliceThickness = step
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = pixels.astype(np.int16).tobytes()
    return ds


def write_series(folder: Path, values: np.ndarray | None = None, **options) -> tuple[list[Path], str]:
    """A series of single-frame MR files (written in shuffled order), and its SeriesInstanceUID."""
    values = disc_volume()[0] if values is None else values
    folder.mkdir(parents=True, exist_ok=True)
    uids = {"series_uid": generate_uid(), "study_uid": generate_uid(), "frame_uid": generate_uid()}
    paths = []
    for k in np.random.default_rng(1).permutation(len(values)):
        path = folder / f"IM{k:04d}"  # no suffix, as scanners write them
        slice_dataset(values[k], int(k), **uids, **options).save_as(path, enforce_file_format=True)
        paths.append((int(k), path))
    return [path for _, path in sorted(paths)], uids["series_uid"]


def grey_predictor(channels: int = 1) -> Predictor:
    if channels == 1:
        return bright_spot_predictor()
    network = nn.Sequential(nn.Conv2d(channels, 1, 1))
    with torch.no_grad():
        network[0].weight.fill_(20.0 / channels)
        network[0].bias.fill_(-10.0)
    description = {"model": {"name": "custom", "kwargs": {"depth": 2}}, "threshold": 0.5,
                   "preprocessing": {"image_size": 64, "in_channels": channels, "context": 0,
                                     "normalisation": "volume_p99.5"}}
    return Predictor(network.eval(), description)


def problem(path) -> str:
    with pytest.raises(BadInputError) as caught:
        read_dicom_series(path)
    message = str(caught.value)
    assert "\n" not in message and PATIENT not in message and "SECRET" not in message
    return message


# --- reading ---------------------------------------------------------------------------------------

def test_bundled_mr_and_ct_files_read_with_their_spacing():
    volume, geometry = read_dicom_series(get_testdata_file("MR_small.dcm"))
    assert volume.shape == (1, 64, 64) and volume.dtype == np.uint8 and volume.max() == 255
    assert geometry.spacing == pytest.approx((0.8, 0.3125, 0.3125))
    assert geometry.pixel_area_mm2 == pytest.approx(0.3125 ** 2)
    assert geometry.voxel_ml == pytest.approx(0.3125 ** 2 * 0.8 / 1000)
    source = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    assert geometry.series_uid == source.SeriesInstanceUID
    assert geometry.sop_instance_uids == [source.SOPInstanceUID]
    # voxel (0, 0, 0) is ImagePositionPatient, in RAS (NIfTI) rather than DICOM's LPS
    position = [float(v) for v in source.ImagePositionPatient]
    assert geometry.affine[:3, 3] == pytest.approx([-position[0], -position[1], position[2]])

    ct, ct_geometry = read_dicom_series(get_testdata_file("CT_small.dcm"))
    assert ct.shape == (1, 128, 128) and ct_geometry.modality == "CT"
    assert ct_geometry.spacing == pytest.approx((5.0, 0.661468, 0.661468))


def test_compressed_bundled_file_reads_like_the_uncompressed_one():
    plain, _ = read_dicom_series(get_testdata_file("MR_small.dcm"))
    rle, _ = read_dicom_series(get_testdata_file("MR_small_RLE.dcm"))
    assert np.array_equal(plain, rle)
    assert "RLE Lossless" in supported_transfer_syntaxes()


def test_synthetic_series_is_sorted_by_position_with_its_spacing(tmp_path):
    _, mask = disc_volume()
    paths, series_uid = write_series(tmp_path / "series")
    volume, geometry = read_dicom_series(tmp_path / "series")
    assert volume.shape == SHAPE and geometry.sorted_by == "position"
    assert geometry.files == paths  # position order, though InstanceNumber runs the other way
    assert volume[mask].min() == 255 and volume[~mask].max() < 60
    assert geometry.spacing == pytest.approx((STEP, *PIXEL))
    assert geometry.voxel_ml == pytest.approx(STEP * PIXEL[0] * PIXEL[1] / 1000)
    assert geometry.series_uid == series_uid and geometry.description == "FLAIR" and geometry.number == 3
    # the affine maps (column, row, slice) to RAS mm: one column is 0.75 mm along -x (L to R flip)
    corner = geometry.affine @ np.array([1, 2, 3, 1])
    lps = ORIGIN + np.array([0.75 * 1, 0.5 * 2, STEP * 3])
    assert corner[:3] == pytest.approx([-lps[0], -lps[1], lps[2]])


def test_an_oblique_series_is_sorted_along_its_normal(tmp_path):
    angle = np.deg2rad(25)
    orientation = (1.0, 0.0, 0.0, 0.0, float(np.cos(angle)), float(-np.sin(angle)))
    paths, _ = write_series(tmp_path / "oblique", orientation=orientation, step=3.0)
    volume, geometry = read_dicom_series(tmp_path / "oblique")
    assert geometry.files == paths and geometry.spacing[0] == pytest.approx(3.0)
    assert np.linalg.norm(geometry.affine[:3, 2]) == pytest.approx(3.0)
    assert volume[disc_volume()[1]].min() == 255


def test_rescale_and_monochrome1(tmp_path):
    values, mask = disc_volume()
    write_series(tmp_path / "plain", values)
    reference, _ = read_dicom_series(tmp_path / "plain")
    # stored values halved with slope 2: the same real values, so the same volume
    write_series(tmp_path / "rescaled", (values // 2).astype(np.int16), slope=2.0, intercept=0.0)
    rescaled, _ = read_dicom_series(tmp_path / "rescaled")
    assert np.abs(rescaled.astype(int) - reference.astype(int)).max() <= 1
    # MONOCHROME1: high stored values are dark, so the disc comes out dark
    inverted = tmp_path / "inverted"
    shutil.copytree(tmp_path / "plain", inverted)
    for path in inverted.iterdir():
        ds = pydicom.dcmread(path)
        ds.PhotometricInterpretation = "MONOCHROME1"
        ds.save_as(path)
    volume, _ = read_dicom_series(inverted)
    assert volume[mask].max() == 0 and volume[~mask].mean() > 128


def enhanced_mr(path: Path, values: np.ndarray) -> Path:
    """An enhanced (multi-frame) MR file, frames stored top to bottom, geometry in functional groups."""
    ds = slice_dataset(values[0], 0, series_uid=generate_uid(), study_uid=generate_uid(),
                       frame_uid=generate_uid())
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = EnhancedMRImageStorage
    orientation, measures, shared = Dataset(), Dataset(), Dataset()
    orientation.ImageOrientationPatient = ds.ImageOrientationPatient
    measures.PixelSpacing, measures.SliceThickness = ds.PixelSpacing, STEP
    shared.PlaneOrientationSequence, shared.PixelMeasuresSequence = [orientation], [measures]
    ds.SharedFunctionalGroupsSequence = [shared]
    del ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing
    order = list(reversed(range(len(values))))
    ds.NumberOfFrames = len(values)
    ds.PixelData = values[order].astype(np.int16).tobytes()
    frames = []
    for k in order:
        group, position = Dataset(), Dataset()
        position.ImagePositionPatient = [float(v) for v in ORIGIN + np.array([0, 0, STEP * k])]
        group.PlanePositionSequence = [position]
        frames.append(group)
    ds.PerFrameFunctionalGroupsSequence = frames
    ds.save_as(path, enforce_file_format=True)
    return path


def test_multi_frame_file_is_one_volume_in_position_order_and_its_seg_follows_its_frames(tmp_path):
    values, mask = disc_volume()
    path = enhanced_mr(tmp_path / "multi.dcm", values)
    volume, geometry = read_dicom_series(path)
    assert volume.shape == SHAPE and geometry.frame_numbers == list(reversed(range(1, 9)))
    assert np.array_equal(volume[mask], np.full(mask.sum(), 255))
    assert geometry.spacing == pytest.approx((STEP, *PIXEL))
    prediction = predict_dicom(grey_predictor(), path)
    assert prediction.mask[mask].mean() > 0.95
    seg = hd.seg.segread(write_dicom_outputs(prediction, tmp_path / "out")["seg"])
    frames = seg.get_pixels_by_source_frame(geometry.sop_instance_uids[0], geometry.frame_numbers,
                                            segment_numbers=[1])
    assert np.array_equal(frames[..., 0].astype(bool), prediction.mask)


def test_a_folder_of_several_series_gives_one_per_series_uid(tmp_path):
    write_series(tmp_path / "study" / "a")
    write_series(tmp_path / "study" / "b")
    shutil.copy(get_testdata_file("test-SR.dcm"), tmp_path / "study" / "report.dcm")
    found = find_series(tmp_path / "study")
    series = [s for s in found if not isinstance(s, BadInputError)]
    errors = [str(e) for e in found if isinstance(e, BadInputError)]
    assert len(series) == 2 and all(len(s.files) == 8 for s in series)
    assert errors == [f"{tmp_path / 'study' / 'report.dcm'}: is a DICOM structured report (SR), not an image"]
    assert "holds 2 series" in problem(tmp_path / "study")
    for one in series:
        assert read_series(one)[0].shape == SHAPE


# --- bad input: one line naming the file and the problem --------------------------------------------

def test_a_slice_of_another_size_is_refused_by_name(tmp_path):
    paths, _ = write_series(tmp_path / "s")
    ds = pydicom.dcmread(paths[3])
    ds.Rows = ds.Columns = 32
    ds.PixelData = np.zeros((32, 32), np.int16).tobytes()
    ds.save_as(paths[3])
    message = problem(tmp_path / "s")
    assert message.startswith(str(paths[3])) and "32x32 pixels" in message and "one size" in message


def test_a_slice_in_another_orientation_is_refused(tmp_path):
    paths, _ = write_series(tmp_path / "s")
    ds = pydicom.dcmread(paths[5])
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # coronal
    ds.save_as(paths[5])
    message = problem(tmp_path / "s")
    assert str(paths[5]) in message and "orientation" in message


def test_a_missing_slice_is_a_gap(tmp_path):
    paths, _ = write_series(tmp_path / "s")
    paths[4].unlink()
    message = problem(tmp_path / "s")
    assert message.startswith(str(paths[5])) and "missing slice" in message and "4.00 mm" in message


def test_two_slices_at_one_position_are_refused(tmp_path):
    paths, _ = write_series(tmp_path / "s")
    ds = pydicom.dcmread(paths[4])
    ds.SOPInstanceUID = generate_uid()
    ds.save_as(tmp_path / "s" / "copy.dcm")
    assert "same position" in problem(tmp_path / "s")


def test_non_image_dicom_is_refused():
    message = problem(get_testdata_file("test-SR.dcm"))
    assert message.endswith("test-SR.dcm: is a DICOM structured report (SR), not an image")
    assert "RT plan (RTPLAN), not an image" in problem(get_testdata_file("rtplan.dcm"))


def test_truncated_files_are_refused(tmp_path):
    message = problem(get_testdata_file("MR_truncated.dcm"))
    assert "truncated" in message and "8130 vs 8192 bytes" in message
    paths, _ = write_series(tmp_path / "s")
    paths[2].write_bytes(paths[2].read_bytes()[:300])  # cut inside the header
    message = problem(paths[2])
    assert message.startswith(str(paths[2])) and ("truncated" in message or "without an image" in message)
    found = find_series(tmp_path / "s")  # in a folder: that file is a line, the gap it leaves another
    assert any(isinstance(item, BadInputError) and item.path == paths[2] for item in found)


def test_unsupported_transfer_syntax_is_named(tmp_path):
    source = pydicom.dcmread(get_testdata_file("MR_small_jp2klossless.dcm"))
    source.file_meta.TransferSyntaxUID = JPEGLosslessSV1  # no installed handler decodes it
    path = tmp_path / "lossless.dcm"
    source.save_as(path)
    message = problem(path)
    assert message.startswith(str(path)) and "JPEG Lossless" in message
    assert "1.2.840.10008.1.2.4.70" in message
    assert "supported: " in message


def test_a_file_that_is_not_dicom(tmp_path):
    path = tmp_path / "notes.dcm"
    path.write_text("not a scan")
    assert "not a DICOM file" in problem(path)
    assert str(find_series(tmp_path / "nothing")[0]).endswith("does not exist")


# --- prediction and writing -------------------------------------------------------------------------

def test_series_predicts_to_a_seg_that_reads_back(tmp_path):
    _, disc = disc_volume()
    paths, series_uid = write_series(tmp_path / "series")
    prediction = predict_dicom(grey_predictor(), tmp_path / "series")
    assert prediction.mask.shape == SHAPE
    assert (prediction.mask == disc).mean() > 0.99 and prediction.mask[disc].mean() > 0.95
    area = prediction.mask.sum() * PIXEL[0] * PIXEL[1]
    assert prediction.tumour_area_mm2 == pytest.approx(area, abs=0.01)
    assert prediction.tumour_volume_ml == pytest.approx(area * STEP / 1000, abs=1e-3)
    written = write_dicom_outputs(prediction, tmp_path / "out", overlays=tmp_path / "overlays")
    seg = pydicom.dcmread(written["seg"])
    assert seg.Modality == "SEG" and seg.NumberOfFrames == SHAPE[0]
    assert seg.SegmentSequence[0].SegmentLabel == "tumour"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    assert seg.StudyInstanceUID == prediction.geometry.study_uid
    instances = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    referenced = {item.ReferencedSOPInstanceUID for item in instances}
    assert referenced == {str(pydicom.dcmread(p).SOPInstanceUID) for p in paths}
    read = hd.seg.segread(written["seg"])
    frames = read.get_pixels_by_source_instance(
        source_sop_instance_uids=prediction.geometry.sop_instance_uids, segment_numbers=[1])
    assert np.array_equal(frames[..., 0].astype(bool), prediction.mask)
    nifti = nib.load(written["nifti"])
    assert np.allclose(nifti.affine, prediction.geometry.affine)
    assert np.array_equal(np.asarray(nifti.dataobj), to_nifti_array(prediction.mask.astype(np.uint8)))
    assert nifti.header.get_zooms() == pytest.approx((PIXEL[1], PIXEL[0], STEP))
    assert len(list((tmp_path / "out").glob("slice_*_mask.png"))) == SHAPE[0]
    assert len(list((tmp_path / "overlays").glob("slice_*.png"))) == SHAPE[0]


def test_bundled_mr_file_predicts_to_a_seg(tmp_path):
    prediction = predict_dicom(grey_predictor(), get_testdata_file("MR_small.dcm"))
    written = write_dicom_outputs(prediction, tmp_path)
    seg = pydicom.dcmread(written["seg"])
    source = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    assert seg.NumberOfFrames == 1
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID


def test_a_three_channel_model_gets_the_series_in_every_channel_with_a_warning(tmp_path):
    write_series(tmp_path / "series")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prediction = predict_dicom(grey_predictor(3), tmp_path / "series")
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "all 3 channels" in messages[0]
    assert prediction.mask[disc_volume()[1]].mean() > 0.9


def test_predict_verb_writes_seg_nifti_pngs_and_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(predict_module.Predictor, "load", classmethod(lambda cls, *a, **k: grey_predictor()))
    write_series(tmp_path / "study" / "flair")
    write_series(tmp_path / "study" / "other")
    shutil.copy(get_testdata_file("test-SR.dcm"), tmp_path / "study" / "report.dcm")
    shutil.copy(get_testdata_file("MR_truncated.dcm"), tmp_path / "study" / "cut.dcm")
    single = tmp_path / "single" / "MR_small.dcm"
    single.parent.mkdir()
    shutil.copy(get_testdata_file("MR_small.dcm"), single)
    lines = []
    table = predict_paths("model", [tmp_path / "study", single], tmp_path / "out", progress=False,
                          echo=lines.append)
    ok = table[table["status"] == "ok"]
    assert sorted(ok["case"]) == ["MR_small", "study_s3_FLAIR_flair", "study_s3_FLAIR_other"]
    assert set(ok["kind"]) == {"dicom"}
    for _, row in ok.iterrows():
        folder = Path(row["mask"])
        assert (folder / SEG_FILE).is_file() and (folder / NIFTI_FILE).is_file()
        assert len(list(folder.glob("slice_*_mask.png"))) == row["slices"]
    csv = pd.read_csv(tmp_path / "out" / "predictions.csv")
    flair = csv[csv["slices"] == 8].iloc[0]
    pixels = flair["tumour_pixels"]
    assert flair["tumour_area_mm2"] == pytest.approx(pixels * PIXEL[0] * PIXEL[1], abs=0.01)
    assert flair["tumour_volume_ml"] == pytest.approx(pixels * PIXEL[0] * PIXEL[1] * STEP / 1000, abs=1e-3)
    failed = csv[csv["status"] != "ok"].set_index("input")["status"]
    assert "structured report" in failed[str(tmp_path / "study" / "report.dcm")]
    assert "truncated" in failed[str(tmp_path / "study" / "cut.dcm")] and len(failed) == 2
    assert all(PATIENT not in line and "SECRET" not in line for line in lines)
    assert len(lines) == 2 and all(line.startswith("error: ") and "\n" not in line for line in lines)
