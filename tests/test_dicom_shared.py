"""A real LGG patient as a hospital would store it: its three sequences written as three DICOM series
of one study, predicted with `--channels`, give the masks that its kaggle_3m TIFF folder gives; the SEG
read back with highdicom holds them too. Skipped where ../shared/data is absent."""

from __future__ import annotations

import io
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from brainseg.data.io import read_image
from brainseg.data.synth import zip_of
from brainseg.predict import patient_slices, predict_paths
from brainseg.predict_dicom import SEG_FILE

pytestmark = pytest.mark.shared

PATIENT = "TCGA_CS_4944_20010208"  # 20 slices, tumour on several, three distinct sequences
PIXEL_MM = 0.9375
SLICE_MM = 3.0
SEQUENCES = {0: ("T1 pre-contrast", 2), 1: ("AX FLAIR", 3), 2: ("T1 post-contrast", 4)}


def write_sequence(folder: Path, slices: list[np.ndarray], channel: int, study_uid: str,
                   frame_uid: str) -> list[str]:
    """One channel of the patient's slices as an 8-bit MR series (files in reverse order, no suffix):
    slice k at k * SLICE_MM along the axial normal. Returns the SOPInstanceUIDs in slice order."""
    description, number = SEQUENCES[channel]
    series_uid = generate_uid()
    folder.mkdir(parents=True)
    uids = []
    for k, image in enumerate(slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Patient", "LGG-1", "", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = \
            "20010208", "120000", "1", "", ""
        ds.Modality, ds.SeriesNumber, ds.SeriesDescription = "MR", number, description
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [-120.0, -120.0, float(k * SLICE_MM)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing, ds.SliceThickness = [PIXEL_MM, PIXEL_MM], SLICE_MM
        ds.Rows, ds.Columns = image.shape[:2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = np.ascontiguousarray(image[..., channel]).tobytes()
        ds.save_as(folder / f"IM{len(slices) - k:04d}", enforce_file_format=True)
        uids.append(str(ds.SOPInstanceUID))
    return uids


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


def test_a_patient_as_three_dicom_series_predicts_as_its_tiff_folder(shared_data, tmp_path, capsys):
    patient = shared_data / "lgg" / "kaggle_3m" / PATIENT
    if not patient.is_dir():
        pytest.skip(f"{patient} is not in the shared data")
    paths = patient_slices(patient)
    slices = [read_image(path) for path in paths]
    assert all(not np.array_equal(s[..., 0], s[..., 1]) for s in slices[5:15])  # no sequence copied
    study, frame = generate_uid(), generate_uid()
    flair_uids = []
    for channel, (description, _) in SEQUENCES.items():
        uids = write_sequence(tmp_path / "study" / description.replace(" ", "_"), slices, channel, study,
                              frame)
        flair_uids = uids if channel == 1 else flair_uids

    tiff = predict_paths("pretrained", [patient], tmp_path / "tiff", progress=False, echo=print)
    lines = []
    dicom = predict_paths("pretrained", [tmp_path / "study"], tmp_path / "dicom", progress=False,
                          echo=lines.append, channels="pre=pre-contrast,flair=FLAIR,post=post-contrast")
    assert list(tiff["status"]) == ["ok"] and list(dicom["status"]) == ["ok"], (tiff, dicom)
    assert lines[0].startswith("study: pre=series 2 'T1 pre-contrast'") and "flair=series 3 'AX FLAIR'" \
        in lines[0] and "post=series 4 'T1 post-contrast'" in lines[0] and len(lines) == 1

    tiff_masks = np.stack([np.asarray(Image.open(tmp_path / "tiff" / "masks" / PATIENT /
                                                 f"{p.stem}_mask.png")) > 0 for p in paths])
    dicom_masks = np.stack([np.asarray(Image.open(tmp_path / "dicom" / "masks" / "study" /
                                                  f"slice_{k:03d}_mask.png")) > 0
                            for k in range(1, len(paths) + 1)])
    truth = np.stack([read_image(p.with_name(f"{p.stem}_mask.tif")) > 0 for p in paths])
    differing = int((tiff_masks != dicom_masks).sum())
    pixels = int(tiff_masks.sum())
    with capsys.disabled():
        print(f"\n{PATIENT}: {len(paths)} slices; tumour pixels TIFF {pixels}, "
              f"DICOM {int(dicom_masks.sum())}, differing {differing}; "
              f"Dice with the reference mask {overlap(tiff_masks, truth):.3f}")
    assert pixels > 1000 and differing == 0  # the same masks, pixel for pixel
    assert int(dicom["tumour_pixels"].iloc[0]) == int(tiff["tumour_pixels"].iloc[0]) == pixels
    assert dicom["tumour_area_mm2"].iloc[0] == pytest.approx(pixels * PIXEL_MM ** 2, abs=0.01)
    millilitres = pixels * PIXEL_MM ** 2 * SLICE_MM / 1000
    assert dicom["tumour_volume_ml"].iloc[0] == pytest.approx(millilitres, abs=1e-3)

    seg = hd.seg.segread(tmp_path / "dicom" / "masks" / "study" / SEG_FILE)
    frames = seg.get_pixels_by_source_instance(source_sop_instance_uids=flair_uids, segment_numbers=[1])
    assert np.array_equal(frames[..., 0].astype(bool), tiff_masks)

    # The same study zipped and uploaded to `brainseg serve`: the same areas, volume and SEG.
    from fastapi.testclient import TestClient

    from brainseg.serve import ServeSettings, create_app

    client = TestClient(create_app(ServeSettings(model="pretrained")))
    response = client.post("/api/predict", files={"file": ("study.zip", zip_of(
        {path.relative_to(tmp_path / "study").as_posix(): path.read_bytes()
         for path in sorted((tmp_path / "study").rglob("IM*"))}))},
        data={"channels": "pre=pre-contrast,flair=FLAIR,post=post-contrast"})
    assert response.status_code == 200, response.text
    served = response.json()
    assert served["tumour_pixels"] == pixels and "Test^Patient" not in response.text
    assert served["tumour_area_mm2"] == pytest.approx(dicom["tumour_area_mm2"].iloc[0], abs=0.01)
    assert served["tumour_volume_ml"] == pytest.approx(millilitres, abs=1e-3)
    served_seg = hd.seg.segread(io.BytesIO(client.get(served["downloads"]["seg.dcm"]).content))
    frames = served_seg.get_pixels_by_source_instance(source_sop_instance_uids=flair_uids,
                                                      segment_numbers=[1])
    assert np.array_equal(frames[..., 0].astype(bool), tiff_masks)

    # Stored as a scanner would, 12 bits in 16 (x * 16 + 7): the series is scaled by its percentiles
    # rather than used as stored, so the masks differ by a few edge pixels only.
    for path in (tmp_path / "study").rglob("IM*"):
        ds = pydicom.dcmread(path)
        stored = ds.pixel_array.astype(np.uint16) * 16 + 7
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelData = 16, 12, 11, stored.tobytes()
        ds.save_as(path)
    wide = predict_paths("pretrained", [tmp_path / "study"], tmp_path / "wide", progress=False,
                         echo=lines.append, channels="pre=pre-contrast,flair=FLAIR,post=post-contrast")
    wide_masks = np.stack([np.asarray(Image.open(tmp_path / "wide" / "masks" / "study" /
                                                 f"slice_{k:03d}_mask.png")) > 0
                           for k in range(1, len(paths) + 1)])
    with capsys.disabled():
        print(f"12-bit series: tumour pixels {int(wide_masks.sum())}, differing "
              f"{int((wide_masks != tiff_masks).sum())}, Dice with the TIFF route "
              f"{overlap(wide_masks, tiff_masks):.4f}")
    assert list(wide["status"]) == ["ok"] and overlap(wide_masks, tiff_masks) > 0.98
