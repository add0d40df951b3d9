"""Hostile and careless inputs: outputs never replace inputs or earlier results, checkpoints are written
whole, and files whose decoded size would exhaust memory are refused from their headers."""

from __future__ import annotations

import errno
import io
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from PIL import Image

from brainseg.data.synth import (
    jpeg_declaring,
    malformed_zips,
    nifti_declaring,
    png_declaring,
    tiff_declaring,
    zip_of,
)
from brainseg.errors import BadInputError
from brainseg.files import WriteError
from brainseg.predict import predict_paths
from conftest import tree_state, write_png


def _image(path, size=64, seed=0):
    return write_png(path, np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))


# --- outputs never replace inputs or earlier results -------------------------------------------------

def test_an_output_folder_holding_an_input_at_any_depth_is_refused(tiny_run, tmp_path):
    _, run = tiny_run
    scan = _image(tmp_path / "study" / "masks" / "scanA.png")
    before = tree_state(tmp_path / "study")
    for out in (tmp_path / "study", tmp_path / "study" / "masks"):
        with pytest.raises(BadInputError, match=rf"^{out}: holds the input {scan}, which an output could "):
            predict_paths(run, [scan], out, progress=False)
    assert tree_state(tmp_path / "study") == before
    # A link to a file elsewhere is refused too: writing its name would write through it.
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "a.png").symlink_to(scan)
    with pytest.raises(BadInputError, match="holds the input"):
        predict_paths(run, [tmp_path / "links" / "a.png"], tmp_path / "study", progress=False)
    assert tree_state(tmp_path / "study") == before


def test_a_folder_with_earlier_predictions_is_refused_unless_overwrite(tiny_run, tmp_path):
    _, run = tiny_run
    first, second = _image(tmp_path / "in" / "a.png"), _image(tmp_path / "in2" / "b.png", seed=1)
    out = tmp_path / "out"
    predict_paths(run, [first], out, progress=False)
    before = tree_state(out)
    with pytest.raises(BadInputError, match=rf"^{out}: already holds predictions \(predictions.csv, "
                                            r"predictions.json\); pass --overwrite"):
        predict_paths(run, [second], out, progress=False)
    assert tree_state(out) == before
    table = predict_paths(run, [second], out, progress=False, overwrite=True)
    assert table["case"].tolist() == ["b"]
    assert pd.read_csv(out / "predictions.csv")["case"].tolist() == ["b"]


def test_an_input_that_does_not_exist_is_exit_2_before_anything_is_written(tiny_run, tmp_path):
    _, run = tiny_run
    good = _image(tmp_path / "in" / "a.png")
    out = tmp_path / "out"
    with pytest.raises(BadInputError, match=rf"^{tmp_path / 'missing.png'}: does not exist$"):
        predict_paths(run, [good, tmp_path / "missing.png"], out, progress=False)
    assert not out.exists()
    command = ["predict", str(good), str(tmp_path / "nope"), "--model", str(run), "--out", str(out)]
    result = subprocess.run([sys.executable, "-m", "brainseg.cli", *command], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == f"error: {tmp_path / 'nope'}: does not exist"
    assert not out.exists()


def test_a_patient_folder_with_a_slice_of_another_size_is_refused_by_name_and_the_rest_predicted(tiny_run,
                                                                                               tmp_path):
    _, run = tiny_run
    patient = tmp_path / "in" / "P9"
    patient.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for number in (1, 2, 3):
        size = 48 if number == 2 else 64
        tifffile.imwrite(patient / f"P9_{number}.tif", rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    good = _image(tmp_path / "in" / "a.png")
    out = tmp_path / "out"
    messages: list[str] = []
    table = predict_paths(run, [patient, good], out, progress=False, echo=messages.append)
    by_case = table.set_index("case")
    assert by_case.loc["a", "status"] == "ok"
    problem = "slice P9_2.tif is 48x48 pixels; the others are 64x64 (a volume's slices must have one size)"
    assert by_case.loc["P9", "status"] == problem
    assert messages == [f"error: {patient}: {problem}"]
    assert pd.read_csv(out / "predictions.csv")["case"].tolist() == ["P9", "a"]


def test_a_full_disk_names_the_file_and_keeps_the_table_of_the_cases_done(tiny_run, tmp_path, monkeypatch):
    data, run = tiny_run
    patients = sorted(p for p in data.iterdir() if p.is_dir())[:2]
    original = Path.write_bytes  # how brainseg.files.write_png writes each mask

    def full_disk(path, data):
        if patients[1].name in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(path, data)

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    out = tmp_path / "out"
    named = rf"^{out / 'masks' / patients[1].name}/\S+_mask\.png: could not write \(No space left on device\)"
    with pytest.raises(WriteError, match=named):
        predict_paths(run, patients, out, progress=False, overlays=False)
    saved = pd.read_csv(out / "predictions.csv")
    assert saved["case"].tolist() == [patients[0].name] and saved["status"].tolist() == ["ok"]


# --- checkpoints are written whole; --resume finds one that loads ---------------------------------------

@pytest.fixture(scope="module")
def two_epoch_run(tmp_path_factory):
    """A 2-epoch run on 3 synthetic patients, to copy and resume."""
    from brainseg.config import RunConfig
    from brainseg.data.synth import synthesize
    from brainseg.training import train
    from conftest import TINY_TRAINING

    root = tmp_path_factory.mktemp("two-epochs")
    data = synthesize(root / "data", patients=3, seed=0, size=64, slices=(6, 8))
    config = RunConfig().override({**TINY_TRAINING, "data.root": str(data), "data.samples_per_epoch": 16,
                                   "train.threshold": 0.9999})  # epoch 0 stays the best
    train(config, root / "run", progress=False)
    return root / "run"


def test_a_failed_checkpoint_write_leaves_the_old_one_and_names_it(tmp_path):
    from brainseg.training import AtomicCheckpointIO, write_atomically

    target = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"epoch": 1, "weights": torch.ones(3)}, target)
    before = target.read_bytes()

    def full_disk(file):
        file.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(WriteError, match=rf"^{target}: could not write \(No space left on device\)$"):
        write_atomically(target, full_disk)
    assert target.read_bytes() == before
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]  # no temporary file left


def test_resume_skips_a_damaged_last_checkpoint_appends_metrics_and_cleans_up(two_epoch_run, tmp_path):
    from brainseg.training import run_training

    run = tmp_path / "run"
    shutil.copytree(two_epoch_run, run)
    checkpoints = run / "checkpoints"
    assert [p.name for p in checkpoints.glob("best-*")] == ["best-epoch000.ckpt"]
    assert not list(run.rglob("*.partial"))
    metrics_before = pd.read_csv(run / "logs" / "metrics.csv")
    assert set(metrics_before["epoch"].dropna()) == {0, 1, 2}  # 2: the final validation of the best
    (checkpoints / "last.ckpt").write_bytes(b"")  # a kill while it was copied into place
    shutil.copy(checkpoints / "best-epoch000.ckpt", checkpoints / "best-epoch007.ckpt")  # a stale best
    stale_partial = checkpoints / ".last.ckpt.999999999.abc.partial"  # of a killed process
    stale_partial.write_bytes(b"x")
    os.utime(checkpoints / "best-epoch007.ckpt", (0, 0))  # older than the real best
    messages: list[str] = []
    result = run_training(run, overrides={"train.epochs": 3}, resume=True, progress=False,
                          echo=messages.append)
    assert messages == [f"note: skipping {checkpoints / 'last.ckpt'}: damaged checkpoint (empty file)",
                        f"resuming from {checkpoints / 'best-epoch000.ckpt'} (saved at epoch 0)"]
    assert result.resumed_from == checkpoints / "best-epoch000.ckpt"
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["epoch"] == 2
    assert len(list(checkpoints.glob("best-*"))) == 1 and not stale_partial.exists()
    metrics = pd.read_csv(run / "logs" / "metrics.csv")
    assert set(metrics["epoch"].dropna()) == {0, 1, 2, 3}  # epoch 0's rows kept, the rest logged again
    assert len(metrics[metrics["epoch"] == 0]) == len(metrics_before[metrics_before["epoch"] == 0])


def test_resume_with_no_checkpoint_that_loads_is_one_line_naming_it(two_epoch_run, tmp_path):
    from brainseg.training import run_training

    run = tmp_path / "run"
    shutil.copytree(two_epoch_run, run)
    for path in (run / "checkpoints").glob("*.ckpt"):
        path.write_bytes(path.read_bytes()[:1000])  # truncated by a full disk
    with pytest.raises(BadInputError) as error:
        run_training(run, resume=True, progress=False, echo=lambda line: None)
    message = str(error.value)
    assert message.startswith(f"{run / 'checkpoints' / 'last.ckpt'}: damaged checkpoint (")
    assert message.endswith("so the run cannot be resumed") and "\n" not in message


# --- decoded-size limits, told from headers before decoding ------------------------------------------

def test_small_images_declaring_huge_sizes_are_refused_from_their_headers(tmp_path):
    from brainseg.data.io import TooLargeError, read_image

    bombs = {"a.png": png_declaring(13000, 13000), "b.png": png_declaring(20000, 20000),
             "c.jpg": jpeg_declaring(60000, 60000), "d.tif": tiff_declaring(16000, 16000)}
    for name, content in bombs.items():
        assert len(content) < 2000
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(TooLargeError, match=rf"^{path}: .*(more than the limit of 16,777,216 pixels per "
                                                r"slice \(4096x4096\))$"):
            read_image(path)


def test_a_nifti_declaring_a_huge_volume_is_refused_before_decoding(tmp_path):
    from brainseg.data.io import TooLargeError, VolumeShapeError
    from brainseg.predict import nifti_to_slices

    cases = {(2048, 2048, 256): r"is 1,073,741,824 voxels; the limit is 134,217,728$",
             (1024, 1024, 150, 3): r"is 471,859,200 voxels; the limit is 134,217,728$",
             (64, 64, 600): r"600 slices along axis 2; the limit is 512$",
             (8192, 8192, 2): r"8192x8192 pixels is more than the limit"}
    for shape, message in cases.items():
        path = tmp_path / "bomb.nii.gz"
        path.write_bytes(nifti_declaring(shape))
        assert path.stat().st_size < 1000
        with pytest.raises(TooLargeError, match=message):
            nifti_to_slices(path, axis=2)
    path.write_bytes(nifti_declaring((64, 64, 0)))
    with pytest.raises(VolumeShapeError, match=r"has no slices \(its shape is \(64, 64, 0\)\)$"):
        nifti_to_slices(path, axis=2)


def test_predict_reports_a_bomb_as_a_row_and_goes_on(tiny_run, tmp_path):
    _, run = tiny_run
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "bomb.png").write_bytes(png_declaring(13000, 13000))
    _image(tmp_path / "in" / "good.png")
    table = predict_paths(run, [tmp_path / "in"], tmp_path / "out", progress=False, echo=lambda line: None)
    by_case = table.set_index("case")
    assert by_case.loc["good", "status"] == "ok"
    assert by_case.loc["bomb", "status"].startswith("13000x13000 pixels is more than the limit")


# --- the service: 4xx with a reason, no server paths ------------------------------------------------

@pytest.fixture(scope="module")
def client(tiny_run):
    from fastapi.testclient import TestClient

    from brainseg.serve import ServeSettings, Service, create_app

    service = Service(ServeSettings(model=str(tiny_run[1]), max_upload_mb=1, max_slices=12))
    return TestClient(create_app(service=service))


def _post(client, name: str, content: bytes):
    response = client.post("/api/predict", files={"file": (name, content, "application/octet-stream")})
    detail = response.json()["detail"]
    assert "\n" not in detail and "/tmp" not in detail and "brainseg-upload" not in detail, detail
    return response.status_code, detail


def _tif_bytes(size: int, seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))
    return buffer.getvalue()


def test_bombs_and_malformed_containers_get_4xx_with_a_reason(client):
    slice_tif = _tif_bytes(64)
    broken = malformed_zips("p/p_1.tif", slice_tif)
    cases = {
        ("bomb.png", png_declaring(13000, 13000)): (413, "13000x13000 pixels is more than the limit"),
        ("bomb.tif", tiff_declaring(16000, 16000)): (413, "16000x16000 pixels is more than the limit"),
        ("bomb.jpg", jpeg_declaring(60000, 60000)): (413, "more than the limit"),
        ("bomb.nii.gz", nifti_declaring((2048, 2048, 256))): (413, "256 slices along axis 2; the limit is"),
        ("bomb4d.nii.gz", nifti_declaring((2048, 2048, 12, 3))): (413, "voxels; the limit is 67,108,864"),
        ("empty.nii.gz", nifti_declaring((64, 64, 0))): (422, "has no slices"),
        ("broken.png", b"not a png"): (400, "unreadable or truncated image (cannot identify image file "
                                            "'upload.png')"),
        ("crc.zip", broken["bad_crc.zip"]): (400, "zip member 'p/p_1.tif' is damaged (Bad CRC-32"),
        ("encrypted.zip", broken["encrypted.zip"]): (400, "zip member 'p/p_1.tif' is encrypted"),
        ("method99.zip", broken["method99.zip"]):
            (400, "zip member 'p/p_1.tif' uses compression method 99, which is not supported"),
        ("lying.zip", broken["lying.zip"]): (413, "zip would unpack to 2048 MB; the limit is 400 MB"),
        ("short.zip", broken["short.zip"]): (400, "zip member 'p/p_1.tif'"),
        ("bombs.zip", zip_of({"p/p_1.tif": tiff_declaring(16000, 16000)})):
            (413, "16000x16000 pixels is more than the limit"),
        ("mixed.zip", zip_of({"p/p_1.tif": slice_tif, "p/p_2.tif": _tif_bytes(48),
                              "p/p_3.tif": slice_tif})):
            (422, "slice p_2.tif is 48x48 pixels; the others are 64x64"),
    }
    for (name, content), (status, message) in cases.items():
        got, detail = _post(client, name, content)
        assert (got, message in detail) == (status, True), (name, got, detail)


def test_an_upload_over_the_limit_is_refused_while_it_streams_in(client):
    sent = {"chunks": 0}

    def body():
        yield b"--x\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n\r\n"
        for _ in range(64):  # 4 MB in all, with no Content-Length
            sent["chunks"] += 1
            yield b"\0" * 65536
        yield b"\r\n--x--\r\n"

    response = client.post("/api/predict", content=body(),
                           headers={"content-type": "multipart/form-data; boundary=x"})
    assert response.status_code == 413 and response.json()["detail"] == "upload is larger than 1 MB"
    declared = client.post("/api/predict", content=b"\0" * 100,
                           headers={"content-type": "multipart/form-data; boundary=x",
                                    "content-length": str(5 * 2**20)})
    assert declared.status_code == 413 and declared.json()["detail"] == "upload is larger than 1 MB"


def test_results_are_kept_within_a_total_size_and_an_age(tiny_run, monkeypatch):
    from brainseg import serve as serve_module
    from brainseg.serve import ServeSettings, Service, UploadError

    service = Service(ServeSettings(model=str(tiny_run[1]), kept_results_mb=0.05, kept_results_minutes=1))
    clock = {"now": 1000.0}
    monkeypatch.setattr(serve_module.time, "monotonic", lambda: clock["now"])
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    masks = np.zeros((1, 64, 64), np.uint8)
    # ~12 KB of PNG each
    first = service._result(service.predictor, "image", noise[None], masks, "a.png")["id"]
    second = service._result(service.predictor, "image", noise[None], masks, "b.png")["id"]
    assert service.download(first, "overlay.png") and service.download(second, "overlay.png")
    for name in "cdef":
        service._result(service.predictor, "image", noise[None], masks, f"{name}.png")
    with pytest.raises(UploadError):  # pushed out by size: 6 results would hold more than 50 KB
        service.download(first, "overlay.png")
    clock["now"] += 61
    last = service._result(service.predictor, "image", noise[None], masks, "g.png")["id"]
    clock["now"] += 61
    with pytest.raises(UploadError):  # expired
        service.download(last, "overlay.png")
    assert not service._results


def test_refusing_bombs_keeps_memory_small(tmp_path):
    """In a fresh process, every bomb above is refused with its peak memory near the import cost."""
    bombs = {"a.png": png_declaring(13000, 13000), "b.jpg": jpeg_declaring(60000, 60000),
             "c.tif": tiff_declaring(16000, 16000), "d.nii.gz": nifti_declaring((2048, 2048, 256)),
             "e.nii.gz": nifti_declaring((1024, 1024, 150, 3))}
    for name, content in bombs.items():
        (tmp_path / name).write_bytes(content)
    script = f"""
import resource, sys
from pathlib import Path
from brainseg.data.io import TooLargeError, nifti_header, read_image
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for path in sorted(Path({str(tmp_path)!r}).iterdir()):
    try:
        nifti_header(path, 2) if path.name.endswith(".nii.gz") else read_image(path)
    except TooLargeError:
        continue
    sys.exit(f"{{path}} was not refused")
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) < 50  # MB over the imports, where decoding would take 0.5-7 GB


def test_uploads_past_a_bounded_queue_get_503_with_retry_after(tiny_run):
    import threading

    from fastapi.testclient import TestClient

    from brainseg.serve import ServeSettings, Service, create_app

    service = Service(ServeSettings(model=str(tiny_run[1]), max_waiting=1))
    client = TestClient(create_app(service=service))
    upload = {"file": ("a.png", _png_bytes(), "image/png")}
    service._admitted.acquire()  # an upload is being processed
    service._working.acquire()
    waiting = threading.Thread(target=lambda: client.post("/api/predict", files=upload))
    waiting.start()
    try:
        deadline = time.monotonic() + 30
        while service._admitted._value > 0 and time.monotonic() < deadline:  # until it waits in the queue
            time.sleep(0.05)
        assert service._admitted._value == 0  # else the request below would wait for the lock held here
        refused = client.post("/api/predict", files=upload)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "2"
        assert refused.json()["detail"] == "busy: 1 uploads are waiting; try again shortly"
    finally:
        service._working.release()
        service._admitted.release()
        waiting.join(timeout=60)
    assert client.post("/api/predict", files=upload).status_code == 200


def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()
