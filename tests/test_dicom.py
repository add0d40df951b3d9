"""DICOM in, DICOM SEG and NIfTI out: pydicom's bundled files, a synthetic series with a bright disc as
tumour predicted to a SEG that is read back, and every kind of bad input as one line."""

from __future__ import annotations

import io
import json
import logging
import shutil
import warnings
import zipfile
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
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
from brainseg import serve as serve_module
from brainseg.data.dicom import (
    anonymize_dataset,
    find_series,
    read_dicom_series,
    read_series,
    supported_transfer_syntaxes,
    to_nifti_array,
)
from brainseg.errors import BadInputError, OptionError
from brainseg.inference import Predictor
from brainseg.predict import predict_paths
from brainseg.predict_dicom import (
    NIFTI_FILE,
    SEG_FILE,
    channel_plan,
    parse_channels,
    predict_dicom,
    select_series,
    write_dicom_outputs,
)
from brainseg.serve import ServeSettings, create_app
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
                  intercept: float = 0.0, description: str = "FLAIR", number: int = 3) -> Dataset:
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
    ds.Modality, ds.SeriesNumber, ds.SeriesDescription = "MR", number, description
    ds.InstanceNumber = SHAPE[0] - k  # reversed, so that sorting must use the positions
    normal = np.cross(orientation[:3], orientation[3:])
    ds.ImagePositionPatient = [float(v) for v in ORIGIN + normal * step * k]
    ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.PixelSpacing = list(PIXEL)
    ds.SliceThickness = step
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    if pixels.dtype == np.uint8:  # 8-bit slices, as PNG or TIFF slices converted to DICOM are
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = pixels.tobytes()
    else:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = pixels.astype(np.int16).tobytes()
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
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


def test_eight_bit_slices_are_used_as_stored(tmp_path):
    """8-bit slices (PNG or TIFF slices made DICOM) reach the model as the same images would as PNG."""
    values = np.random.default_rng(2).integers(0, 200, SHAPE).astype(np.uint8)
    write_series(tmp_path / "s", values)
    volume, _ = read_dicom_series(tmp_path / "s")
    assert volume.dtype == np.uint8 and np.array_equal(volume, values)
    write_series(tmp_path / "s16", values.astype(np.int16))
    assert not np.array_equal(read_dicom_series(tmp_path / "s16")[0], values)  # 16-bit: percentiles


# --- a study's series fed to a model's channels (--channels) ----------------------------------------

def disc_at(row: int, col: int, radius: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """int16 noise with a bright disc at (row, col) on slices 2-5, and that disc as a mask."""
    values = np.random.default_rng(row * 100 + col).integers(100, 300, SHAPE).astype(np.int16)
    rows, cols = np.mgrid[:SHAPE[1], :SHAPE[2]]
    mask = np.zeros(SHAPE, bool)
    mask[2:6] = (rows - row) ** 2 + (cols - col) ** 2 <= radius ** 2
    values[mask] = 2000
    return values, mask


def channel_predictor(channel: int) -> Predictor:
    """A 3-channel model that sees only input channel `channel`: bright there is tumour."""
    predictor = grey_predictor(3)
    with torch.no_grad():
        predictor.model[0].weight.zero_()
        predictor.model[0].weight[0, channel] = 20.0
    return predictor


DISCS = {"pre": (16, 16), "flair": (32, 40), "post": (48, 20)}
DESCRIPTIONS = {"pre": "T1 pre", "flair": "AX FLAIR", "post": "T1 post Gd"}


def write_study(folder: Path, **options) -> dict[str, str]:
    """Three series on one grid, a disc in a different place in each: {channel: SeriesInstanceUID}."""
    uids = {}
    for number, (channel, centre) in enumerate(DISCS.items(), start=2):
        _, uids[channel] = write_series(folder / channel, disc_at(*centre)[0],
                                        description=DESCRIPTIONS[channel], number=number,
                                        **options.get(channel, {}))
    return uids


def test_channels_are_parsed_and_checked_against_the_model():
    assert parse_channels("pre=T1 pre, FLAIR = AX FLAIR,post=1.2.3") == [
        ("pre", "T1 pre"), ("flair", "AX FLAIR"), ("post", "1.2.3")]
    assert channel_plan(parse_channels("post=b,pre=a"), 3) == {"pre": "a", "post": "b"}
    assert channel_plan(parse_channels("a,b,c"), 3) == {"pre": "a", "flair": "b", "post": "c"}
    assert channel_plan(parse_channels("FLAIR"), 1) == {"image": "FLAIR"}
    for text, channels, message in [("pre=", 3, "expected NAME=SERIES"), ("=x", 3, "expected NAME=SERIES"),
                                    ("pre=a,b", 3, "name every series"), ("pre=a,pre=b", 3, "given twice"),
                                    ("t2=a", 3, "'t2' is not a channel of this model; it takes pre, flair"),
                                    ("a,b", 3, "one per channel"), ("a,b", 1, "2 series for a model of 1")]:
        with pytest.raises(OptionError) as caught:
            channel_plan(parse_channels(text), channels)
        assert message in str(caught.value) and "\n" not in str(caught.value)


def test_series_are_picked_by_description_or_uid_start(tmp_path):
    uids = write_study(tmp_path / "study")
    study = [s for s in find_series(tmp_path / "study") if not isinstance(s, BadInputError)]
    assert select_series(study, "ax flair", "flair", "study").series_uid == uids["flair"]
    assert select_series(study, "Gd", "post", "study").series_uid == uids["post"]
    assert select_series(study, uids["pre"][:-3], "pre", "study").series_uid == uids["pre"]
    with pytest.raises(BadInputError) as caught:
        select_series(study, "T1", "pre", "study")  # 'T1 pre' and 'T1 post Gd'
    assert "'T1' for pre matches 2 series (series 2 'T1 pre'" in str(caught.value)
    with pytest.raises(BadInputError) as caught:
        select_series(study, "T2", "pre", "study")
    message = str(caught.value)
    assert message.startswith("study: no series matches 'T2' for pre")
    assert "series 3 'AX FLAIR' (UID ..." in message
    assert PATIENT not in message and "SECRET" not in message and "\n" not in message


def test_a_study_feeds_the_models_channels_and_says_which_series_fed_which(tmp_path, monkeypatch):
    uids = write_study(tmp_path / "study")
    for channel, index in (("pre", 0), ("flair", 1), ("post", 2)):
        monkeypatch.setattr(predict_module.Predictor, "load",
                            classmethod(lambda cls, *a, _k=index, **k: channel_predictor(_k)))
        lines = []
        out = tmp_path / f"out_{channel}"
        table = predict_paths("model", [tmp_path / "study"], out, progress=False, echo=lines.append,
                              channels="pre=T1 pre,flair=flair,post=T1 post")
        assert list(table["case"]) == ["study"] and list(table["status"]) == ["ok"]
        mask = np.stack([np.asarray(Image.open(p)) > 0 for p in sorted((out / "masks" / "study").glob(
            "slice_*_mask.png"))])
        assert (mask == disc_at(*DISCS[channel])[1]).mean() > 0.99  # the channel's series, in its place
        assert len(lines) == 1 and lines[0].startswith("study: pre=series 2 'T1 pre' (UID ...")
        assert "flair=series 3 'AX FLAIR'" in lines[0] and "post=series 4 'T1 post Gd'" in lines[0]
        seg = pydicom.dcmread(out / "masks" / "study" / SEG_FILE)  # over the FLAIR series
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == uids["flair"]
        assert json.loads((out / "predictions.json").read_text())["channels"]["flair"] == "flair"


def test_a_channel_left_out_gets_flair_with_a_note(tmp_path, monkeypatch):
    write_study(tmp_path / "study")
    use(monkeypatch, channel_predictor(2))
    lines = []
    table = predict_paths("model", [tmp_path / "study"], tmp_path / "out", progress=False, echo=lines.append,
                          channels="flair=FLAIR")
    assert list(table["status"]) == ["ok"]
    assert lines[0] == (f"study: pre=(the flair series), flair=series 3 'AX FLAIR' (UID ..."
                        f"{find_uid(tmp_path / 'study' / 'flair')[-8:]}), post=(the flair series)")
    assert lines[1].startswith("warning: study: pre, post given no series: the flair series is copied in")
    flair_disc = disc_at(*DISCS["flair"])[1]
    assert int(table["tumour_pixels"].iloc[0]) == pytest.approx(flair_disc.sum(), rel=0.05)


def use(monkeypatch, predictor: Predictor) -> None:
    monkeypatch.setattr(predict_module.Predictor, "load", classmethod(lambda cls, *a, **k: predictor))


def find_uid(folder: Path) -> str:
    return str(pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True).SeriesInstanceUID)


def test_a_one_channel_model_takes_the_series_channels_names(tmp_path, monkeypatch):
    write_study(tmp_path / "study")
    monkeypatch.setattr(predict_module.Predictor, "load", classmethod(lambda cls, *a, **k: grey_predictor()))
    lines = []
    table = predict_paths("model", [tmp_path / "study"], tmp_path / "out", progress=False, echo=lines.append,
                          channels="Gd")
    assert list(table["status"]) == ["ok"] and lines[0].startswith("study: image=series 4 'T1 post Gd'")
    assert int(table["tumour_pixels"].iloc[0]) == pytest.approx(disc_at(*DISCS["post"])[1].sum(), rel=0.05)
    with pytest.raises(OptionError, match="'flair' is not a channel of this model; it takes image"):
        predict_paths("model", [tmp_path / "study"], tmp_path / "out2", progress=False, channels="flair=x")
    assert not (tmp_path / "out2").exists()  # refused before anything is written


def test_series_on_different_grids_are_one_line_and_the_batch_goes_on(tmp_path, monkeypatch):
    use(monkeypatch, channel_predictor(1))
    write_study(tmp_path / "shifted", post={"step": 2.5})  # the same size, other slice positions
    small = tmp_path / "small"
    write_study(small)
    shutil.rmtree(small / "pre")
    write_series(small / "pre", disc_at(16, 16)[0][:, :32, :32], description="T1 pre", number=2)
    write_study(tmp_path / "good")
    lines = []
    table = predict_paths("model", [tmp_path / "shifted", small, tmp_path / "good"], tmp_path / "out",
                          progress=False, echo=lines.append, channels="pre=pre,flair=flair,post=post")
    status = table.set_index("case")["status"]
    assert status["good"] == "ok"
    assert "series 4 'T1 post Gd'" in status["shifted"] and "mm off series 3 'AX FLAIR'" in status["shifted"]
    assert "share one grid" in status["shifted"]
    assert "(pre) is 8 slices of 32x32" in status["small"] and "is 8 of 64x64" in status["small"]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 2 and all("\n" not in line and PATIENT not in line for line in errors)
    assert errors[0].startswith(f"error: {tmp_path / 'shifted' / 'post'}/IM") and \
        errors[1].startswith(f"error: {small / 'pre'}/IM")


def test_anonymize_strips_patient_attributes_from_the_seg(tmp_path, monkeypatch):
    monkeypatch.setattr(predict_module.Predictor, "load", classmethod(lambda cls, *a, **k: grey_predictor()))
    _, series_uid = write_series(tmp_path / "series")
    plain = predict_paths("model", [tmp_path / "series"], tmp_path / "plain", progress=False, echo=print)
    anonymous = predict_paths("model", [tmp_path / "series"], tmp_path / "anon", progress=False,
                              anonymize=True, echo=print)
    kept = (Path(plain["mask"].iloc[0]) / SEG_FILE).read_bytes()
    stripped_file = Path(anonymous["mask"].iloc[0]) / SEG_FILE
    stripped = stripped_file.read_bytes()
    for value in (b"Secret^Patient", b"SECRET-ID-42", b"19700101"):
        assert value in kept and value not in stripped  # the SEG copies them unless --anonymize
    seg = pydicom.dcmread(stripped_file)
    assert seg.PatientName == seg.PatientID == seg.PatientBirthDate == seg.StudyDate == ""
    assert seg.PatientIdentityRemoved == "YES"
    assert [item.CodeValue for item in seg.DeidentificationMethodCodeSequence] == ["113100", "113110"]
    assert seg.SeriesDescription == "brainseg tumour"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid  # still over its series
    read = hd.seg.segread(stripped_file)
    assert read.get_pixels_by_source_instance(
        source_sop_instance_uids=[str(pydicom.dcmread(p).SOPInstanceUID) for p in sorted(
            (tmp_path / "series").iterdir())][:1], segment_numbers=[1]).shape[0] == 1


def test_anonymize_dataset_reaches_nested_and_private_attributes():
    ds = Dataset()
    ds.PatientName, ds.PatientAge, ds.InstitutionName = PATIENT, "054Y", "St Elsewhere"
    item = Dataset()
    item.PatientID, item.OtherPatientIDs = "SECRET-ID-42", "OTHER"
    ds.ReferencedImageSequence = [item]
    ds.add_new(0x00091001, "LO", "private note")
    anonymize_dataset(ds)
    assert ds.PatientName == "" and "PatientAge" not in ds and "InstitutionName" not in ds
    nested = ds.ReferencedImageSequence[0]
    assert nested.PatientID == "" and "OtherPatientIDs" not in nested
    assert 0x00091001 not in ds and ds.PatientIdentityRemoved == "YES"


def test_each_bad_input_of_a_batch_is_one_line_and_the_rest_is_predicted(tmp_path, monkeypatch):
    """Mixed series, a gap, another size, another orientation, SR and RT objects and a truncated file in
    one batch: a line each, naming the file, and the good series predicted."""
    monkeypatch.setattr(predict_module.Predictor, "load", classmethod(lambda cls, *a, **k: grey_predictor()))
    study = tmp_path / "study"
    write_series(study / "good", description="AX FLAIR", number=5)
    gap, _ = write_series(study / "gap", description="T2", number=6)
    gap[4].unlink()
    sized, _ = write_series(study / "sized", description="T1", number=7)
    ds = pydicom.dcmread(sized[3])
    ds.Rows = ds.Columns = 32
    ds.PixelData = np.zeros((32, 32), np.int16).tobytes()
    ds.save_as(sized[3])
    turned, _ = write_series(study / "turned", description="DWI", number=8)
    ds = pydicom.dcmread(turned[5])
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    ds.save_as(turned[5])
    for name in ("test-SR.dcm", "rtstruct.dcm", "rtplan.dcm", "MR_truncated.dcm"):
        shutil.copy(get_testdata_file(name), study / name)
    lines = []
    table = predict_paths("model", [study], tmp_path / "out", progress=False, echo=lines.append)
    ok = table[table["status"] == "ok"]
    assert list(ok["case"]) == ["study_s5_AX_FLAIR"]
    failed = table[table["status"] != "ok"]
    problems = {Path(row["input"]).name if Path(row["input"]).is_file() else row["case"]: row["status"]
                for _, row in failed.iterrows()}
    assert "missing slice(s)" in problems["study_s6_T2"]
    assert "32x32 pixels" in problems["study_s7_T1"] and "one size" in problems["study_s7_T1"]
    assert "another orientation" in problems["study_s8_DWI"]
    assert "structured report (SR)" in problems["test-SR.dcm"]
    assert "RT structure set (RTSTRUCT)" in problems["rtstruct.dcm"]
    assert "RT plan (RTPLAN)" in problems["rtplan.dcm"]
    assert "truncated" in problems["MR_truncated.dcm"]
    assert len(lines) == 7 and all(line.startswith("error: ") and "\n" not in line for line in lines)
    assert all(PATIENT not in line and "SECRET" not in line for line in lines)
    named = {gap[5], sized[3], turned[5], *(study / n for n in ("test-SR.dcm", "rtstruct.dcm", "rtplan.dcm",
                                                                   "MR_truncated.dcm"))}
    assert {Path(line[len("error: "):].split(": ")[0]) for line in lines} == named


# --- serve: a zipped DICOM series in, its SEG out ----------------------------------------------------

def zipped(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(folder).as_posix())
    return buffer.getvalue()


@pytest.fixture
def dicom_client(monkeypatch):
    predictors = {"grey": grey_predictor(), "lgg": channel_predictor(1)}
    monkeypatch.setattr(serve_module.Predictor, "load", classmethod(lambda cls, name, **k: predictors[name]))
    return TestClient(create_app(ServeSettings(model="grey", also=("lgg",), max_upload_mb=5)))


def test_serve_takes_a_zipped_series_and_gives_its_seg(tmp_path, dicom_client, caplog):
    caplog.set_level(logging.DEBUG)
    _, disc = disc_volume()
    paths, series_uid = write_series(tmp_path / "series")
    response = dicom_client.post("/api/predict", files={"file": ("series.zip", zipped(tmp_path / "series"))})
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["kind"] == "dicom" and result["slices"] == SHAPE[0]
    assert result["series"] == f"image=series 3 'FLAIR' (UID ...{series_uid[-8:]})"
    assert result["tumour_area_mm2"] == pytest.approx(result["tumour_pixels"] * PIXEL[0] * PIXEL[1], abs=0.01)
    assert result["tumour_pixels"] == pytest.approx(disc.sum(), rel=0.05)
    assert set(result["downloads"]) >= {"seg.dcm", "mask.nii.gz"}
    seg_bytes = dicom_client.get(result["downloads"]["seg.dcm"]).content
    seg = hd.seg.segread(io.BytesIO(seg_bytes))
    frames = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[str(pydicom.dcmread(p).SOPInstanceUID) for p in paths], segment_numbers=[1])
    assert frames[..., 0].astype(bool).sum() == result["tumour_pixels"]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    assert b"Secret^Patient" in seg_bytes  # the SEG belongs with the patient's study...
    assert PATIENT not in response.text and "SECRET" not in response.text  # ...but the page never shows it
    anonymous = dicom_client.post("/api/predict", files={"file": ("series.zip", zipped(tmp_path / "series"))},
                                  data={"anonymize": "true"}).json()
    stripped = dicom_client.get(anonymous["downloads"]["seg.dcm"]).content
    assert b"Secret" not in stripped and b"SECRET-ID-42" not in stripped and anonymous["anonymized"]
    one = dicom_client.post("/api/predict", files={"file": ("IM.dcm", paths[3].read_bytes())})
    assert one.status_code == 200 and one.json()["slices"] == 1
    assert all(PATIENT not in record.getMessage() and "SECRET" not in record.getMessage()
               for record in caplog.records)


def test_serve_maps_a_zipped_study_and_refuses_bad_series_in_one_line(tmp_path, dicom_client):
    uids = write_study(tmp_path / "study")
    upload = {"file": ("study.zip", zipped(tmp_path / "study"))}
    several = dicom_client.post("/api/predict", files=upload, data={"model": "lgg"})
    assert several.status_code == 400
    detail = several.json()["detail"]
    assert detail.startswith("the upload holds 3 series (series 2 'T1 pre' (UID ...")
    assert "channels field (pre=...,flair=...,post=...)" in detail and "SECRET" not in detail
    mapped = dicom_client.post("/api/predict", files=upload,
                               data={"model": "lgg", "channels": "pre=pre,flair=flair,post=post"})
    assert mapped.status_code == 200, mapped.text
    result = mapped.json()
    assert result["series"].startswith("pre=series 2 'T1 pre'") and result["note"] == ""
    assert result["tumour_pixels"] == pytest.approx(disc_at(*DISCS["flair"])[1].sum(), rel=0.05)
    seg = pydicom.dcmread(io.BytesIO(dicom_client.get(result["downloads"]["seg.dcm"]).content))
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == uids["flair"]
    unknown = dicom_client.post("/api/predict", files=upload, data={"model": "lgg", "channels": "t2=x"})
    assert unknown.status_code == 400 and "'t2' is not a channel" in unknown.json()["detail"]
    paths, _ = write_series(tmp_path / "gap")
    paths[4].unlink()
    gap = dicom_client.post("/api/predict", files={"file": ("gap.zip", zipped(tmp_path / "gap"))})
    assert gap.status_code == 400
    assert gap.json()["detail"].startswith(f"{paths[5].name}: missing slice(s) in series 3 'FLAIR'")
    assert str(tmp_path) not in gap.json()["detail"] and "brainseg-upload" not in gap.json()["detail"]
    report = dicom_client.post("/api/predict", files={"file": ("sr.dcm", Path(get_testdata_file(
        "test-SR.dcm")).read_bytes())})
    assert report.status_code == 400
    assert report.json()["detail"] == "upload.dcm: is a DICOM structured report (SR), not an image"
    png = dicom_client.post("/api/predict", files={"file": ("x.png", b"png")}, data={"channels": "a"})
    assert png.status_code == 400 and "not DICOM" in png.json()["detail"]
