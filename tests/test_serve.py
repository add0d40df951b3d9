"""The web service: uploads of every kind, limits, zip attacks, concurrency, and the page in Chromium."""

from __future__ import annotations

import base64
import io
import shutil
import socket
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from brainseg.data.synth import zip_of
from brainseg.serve import ServeSettings, Service, create_app


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def service(tiny_run):
    _, run = tiny_run
    return Service(ServeSettings(model=str(run), max_upload_mb=2, max_slices=12, max_zip_files=30,
                                 max_zip_uncompressed_mb=1))


@pytest.fixture(scope="module")
def client(service):
    return TestClient(create_app(service=service))


@pytest.fixture(scope="module")
def patient(tiny_run) -> Path:
    data, _ = tiny_run
    return sorted(p for p in data.iterdir() if p.is_dir())[0]


def slice_png(patient: Path) -> bytes:
    image = np.asarray(Image.open(sorted(patient.glob("*_[0-9].tif"))[3]))
    return png_bytes(image)


def test_health_and_page(client):
    health = client.get("/api/health").json()
    assert health["status"] == "ok" and health["model"]["model"] == "unet"
    assert health["postprocessing"] == {"largest_component": False, "min_size": 0,
                                        "min_fraction": 0.0}  # none stored in this run
    page = client.get("/")
    assert page.status_code == 200 and "brainseg viewer" in page.text
    assert "/api/predict" in client.get("/openapi.json").json()["paths"]


def test_predict_a_slice_and_download(client, patient):
    response = client.post("/api/predict", files={"file": ("slice.png", slice_png(patient), "image/png")})
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["kind"] == "image" and result["slices"] == 1
    assert (result["height"], result["width"]) == (64, 64)
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(result["masks"][0]))))
    assert mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 255}
    assert result["tumour_pixels"] == int((mask > 0).sum())
    for name, url in result["downloads"].items():
        download = client.get(url)
        assert download.status_code == 200 and len(download.content) > 0, name
    assert client.get("/api/download/nope/mask.png").status_code == 404


def test_predict_nifti_volume_and_patient_zip(client, patient):
    volume = np.stack([np.asarray(Image.open(p)) for p in sorted(patient.glob("*_[0-9].tif"))[:5]], axis=2)
    image = nib.Nifti1Image(volume.astype(np.float32), np.diag([1.0, 1.0, 3.0, 1.0]))
    upload = ("scan.nii.gz", _gz(image.to_bytes()), "application/gzip")
    nifti = client.post("/api/predict", files={"file": upload})
    assert nifti.status_code == 200, nifti.text
    result = nifti.json()
    assert result["kind"] == "nifti" and result["slices"] == 5 and "tumour_volume_ml" in result
    mask_file = client.get(result["downloads"]["mask.nii.gz"]).content
    assert nib.Nifti1Image.from_bytes(_gunzip(mask_file)).shape == (64, 64, 5)

    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        for number in range(1, 6):
            for suffix in ("", "_mask"):
                name = f"{patient.name}_{number}{suffix}.tif"
                z.write(patient / name, f"{patient.name}/{name}")
    upload = ("patient.zip", archive.getvalue(), "application/zip")
    zipped = client.post("/api/predict", files={"file": upload})
    assert zipped.status_code == 200, zipped.text
    assert zipped.json()["kind"] == "patient" and zipped.json()["slices"] == 5


def _gz(data: bytes) -> bytes:
    import gzip

    return gzip.compress(data)


def _gunzip(data: bytes) -> bytes:
    import gzip

    return gzip.decompress(data)


def _zip(entries: dict[str, bytes]) -> bytes:
    return zip_of(entries, zipfile.ZIP_DEFLATED)


@pytest.mark.parametrize("name, content, status, message", [
    ("broken.png", b"\x89PNG not really", 400, "unreadable"),
    ("notes.txt", b"hello", 415, "unsupported file type"),
    ("grey.png", png_bytes(np.zeros((64, 64), np.uint8)), 400, "1 channel"),
    ("tiny.png", png_bytes(np.zeros((4, 4, 3), np.uint8)), 400, "too small"),
    ("big.png", b"0" * (3 * 1024 * 1024), 413, "larger than 2 MB"),
    ("scan.nii", b"not nifti", 400, "unreadable NIfTI"),
    ("bad.zip", b"PK not a zip", 400, "not a valid zip"),
    ("traversal.zip", _zip({"../../evil_1.tif": b"x"}), 400, "unsafe path"),
    ("absolute.zip", _zip({"/etc/evil_1.tif": b"x"}), 400, "unsafe path"),
    ("bomb.zip", _zip({"p/p_1.tif": b"\0" * (2 * 1024 * 1024)}), 413, "unpack to"),
    ("many.zip", _zip({f"p/p_{i}.tif": b"x" for i in range(40)}), 400, "holds 40 files"),
    ("empty.zip", _zip({"readme.txt": b"x"}), 400, "no kaggle_3m patient folder"),
])
def test_bad_uploads_get_clear_4xx(client, name, content, status, message, tmp_path):
    response = client.post("/api/predict", files={"file": (name, content, "application/octet-stream")})
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]


def test_slice_limit_and_nothing_written_outside_temp(client, patient, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    volume = np.zeros((64, 64, 20, 3), np.float32)
    response = client.post("/api/predict", files={"file": ("v.nii.gz", _gz(nib.Nifti1Image(
        volume, np.eye(4)).to_bytes()), "application/gzip")})
    assert response.status_code == 413 and "limit is 12" in response.json()["detail"]
    client.post("/api/predict", files={"file": ("slice.png", slice_png(patient), "image/png")})
    assert list(tmp_path.iterdir()) == []  # each upload's temporary folder is gone


def test_concurrent_requests_share_one_model(client, service, patient):
    payload = slice_png(patient)

    def call(_):
        return client.post("/api/predict", files={"file": ("s.png", payload, "image/png")}).json()["masks"][0]

    with ThreadPoolExecutor(4) as pool:
        masks = list(pool.map(call, range(8)))
    assert len(set(masks)) == 1 and service.loads == 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_page_in_headless_chromium(service, patient, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    playwright = pytest.importorskip("playwright.sync_api")
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(service=service), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(100):
            if server.started:
                break
            time.sleep(0.05)
        upload = tmp_path / "slice.png"
        upload.write_bytes(slice_png(patient))
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=[
                "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"])
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            page.set_input_files("#file", str(upload))
            page.click("#go")
            page.wait_for_selector("#area", timeout=30000)
            assert "pixels" in page.inner_text("#area")
            assert page.is_visible("#canvas")
            drawn = page.evaluate("document.getElementById('canvas').width")
            assert drawn == 64
            page.screenshot(path=str(tmp_path / "viewer.png"))
            browser.close()
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.mark.parametrize("options, message", [
    ({"port": 99999}, "--port: must be 0 to 65535, not 99999"),
    ({"port": -1}, "--port: must be 0 to 65535, not -1"),
    ({"max_upload_mb": -1.0}, "--max-upload-mb: must be more than 0, not -1.0"),
    ({"max_upload_mb": 0.0}, "--max-upload-mb: must be more than 0, not 0.0"),
    ({"max_slices": 0}, "--max-slices: must be more than 0, not 0"),
])
def test_bad_serve_options_are_refused_before_the_model_loads(options, message, monkeypatch):
    from brainseg.errors import OptionError
    from brainseg.serve import serve

    monkeypatch.setattr(Service, "__init__", lambda *a: pytest.fail("the model was loaded"))
    with pytest.raises(OptionError) as error:
        serve("/no/such/model", **options)
    assert str(error.value) == message


def test_a_request_picks_one_of_the_served_models(tiny_run, tmp_path):
    _, run = tiny_run
    app = create_app(ServeSettings(model=str(run), also=("pretrained:figshare",)))
    client = TestClient(app)
    models = client.get("/api/health").json()["models"]
    assert [m["name"] for m in models] == [str(run), "pretrained:figshare"]
    assert models[0]["default"] and models[0]["channels"] == 3 and "FLAIR" in models[0]["fits"]
    assert models[1]["channels"] == 1 and "greyscale" in models[1]["fits"]
    grey = io.BytesIO()
    Image.fromarray(np.full((64, 64), 40, np.uint8)).save(grey, format="PNG")
    picked = client.post("/api/predict", files={"file": ("g.png", grey.getvalue(), "image/png")},
                         data={"model": "pretrained:figshare"})
    assert picked.status_code == 200 and picked.json()["model"]["model"] == "unet"
    default = client.post("/api/predict", files={"file": ("g.png", grey.getvalue(), "image/png")})
    assert default.status_code == 400 and "pretrained:figshare" in default.json()["detail"]  # names the fit
    unknown = client.post("/api/predict", files={"file": ("g.png", grey.getvalue(), "image/png")},
                          data={"model": "nope"})
    assert unknown.status_code == 400 and "unknown model 'nope'" in unknown.json()["detail"]


def test_explain_draws_saliency_for_one_slice_and_refuses_other_uploads(client, patient):
    response = client.post("/api/explain", files={"file": ("slice.png", slice_png(patient), "image/png")})
    assert response.status_code == 200, response.text
    result = response.json()
    figure = Image.open(io.BytesIO(base64.b64decode(result["figure"])))
    assert figure.format == "PNG" and figure.size[0] > 2 * figure.size[1]  # four panels side by side
    assert 0 <= result["gradient_x_input_inside"] <= 1 and 0 <= result["grad_cam_inside"] <= 1
    volume = client.post("/api/explain", files={"file": ("scan.nii.gz", b"\x1f\x8b", "application/gzip")})
    assert volume.status_code == 415 and "one slice" in volume.json()["detail"]
    broken = client.post("/api/explain", files={"file": ("slice.png", b"not a png", "image/png")})
    assert broken.status_code == 400 and "/tmp" not in broken.json()["detail"]
    assert "also show where the model looked" in client.get("/").text
