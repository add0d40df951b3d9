"""`brainseg serve`: a small web viewer and JSON API over the prediction API.

Uploads live in a temporary folder that is removed when the request ends; results (a few PNGs
and a mask file) are kept in memory for download, oldest first out. Zip uploads are read member
by member with caps on count and uncompressed size, and member names never become paths.
"""


import base64
import gzip
import io
import tempfile
import threading
import uuid
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import nibabel as nib
import numpy as np
import uvicorn
from fastapi import FastAPI, File, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image

from brainseg import __version__
from brainseg.data.io import IMAGE_SUFFIXES, read_image
from brainseg.errors import BadInputError, BrainsegError, OptionError
from brainseg.inference import Predictor
from brainseg.plots import overlay
from brainseg.predict import is_nifti, nifti_to_slices, patient_slices


@dataclass
class ServeSettings:
    model: str = "pretrained"
    max_upload_mb: float = 50.0
    max_slices: int = 200
    max_zip_files: int = 500
    max_zip_uncompressed_mb: float = 400.0
    kept_results: int = 32  # results held for download

    def __post_init__(self) -> None:
        """A limit of 0 or less refuses every upload (NaN none): refused before the model loads."""
        for name in ("max_upload_mb", "max_slices", "max_zip_files", "max_zip_uncompressed_mb",
                     "kept_results"):
            value = getattr(self, name)
            if not value > 0:
                raise OptionError(f"--{name.replace('_', '-')}: must be more than 0, not {value}")


class UploadError(Exception):
    """A client error: status code and a message for the user."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _display(image: np.ndarray) -> np.ndarray:
    return image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image


class Service:
    """Holds the model (loaded once) and recent results; safe to call from several threads."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.predictor = Predictor.load(settings.model)
        self.loads = 1
        self._lock = threading.Lock()
        self._results: OrderedDict[str, dict[str, tuple[bytes, str]]] = OrderedDict()

    def health(self) -> dict:
        return {"status": "ok", "model": self.predictor.identity, "threshold": self.predictor.cutoff,
                "postprocessing": self.predictor.postprocessing,
                "limits": {"max_upload_mb": self.settings.max_upload_mb,
                           "max_slices": self.settings.max_slices}}

    def predict_upload(self, filename: str, data: bytes) -> dict:
        if len(data) > self.settings.max_upload_mb * 1024 * 1024:
            raise UploadError(413, f"upload is larger than {self.settings.max_upload_mb:g} MB")
        name = PurePosixPath(filename or "upload").name.lower()
        with tempfile.TemporaryDirectory(prefix="brainseg-upload-") as folder:
            folder = Path(folder)
            try:
                if is_nifti(Path(name)):
                    return self._predict_nifti(folder, name, data)
                if name.endswith(".zip"):
                    return self._predict_zip(folder, data)
                if Path(name).suffix in IMAGE_SUFFIXES:
                    return self._predict_image(folder, name, data)
            except BadInputError as error:
                raise UploadError(400, error.problem) from None
            except BrainsegError as error:
                raise UploadError(400, str(error)) from None
        raise UploadError(415, "unsupported file type: upload a TIFF/PNG/JPEG slice, a NIfTI volume "
                               "(.nii, .nii.gz) or a zip of a kaggle_3m patient folder")

    def _predict_image(self, folder: Path, name: str, data: bytes) -> dict:
        path = folder / ("upload" + Path(name).suffix)
        path.write_bytes(data)
        image = read_image(path)
        image = self.predictor.check_image(image, name)
        with self._lock:
            probability = self.predictor.predict_volume(image[None])
        return self._result("image", image[None], self.predictor.masks(probability), name)

    def _predict_nifti(self, folder: Path, name: str, data: bytes) -> dict:
        path = folder / ("upload.nii.gz" if name.endswith(".gz") else "upload.nii")
        path.write_bytes(data)
        slices, volume = nifti_to_slices(path, axis=2)
        self._check_slices(len(slices))
        with self._lock:
            probability = self.predictor.predict_volume(slices)
        masks = self.predictor.masks(probability)
        header = volume.header.copy()
        header.set_data_dtype(np.uint8)
        buffer = io.BytesIO()
        image = nib.Nifti1Image(np.moveaxis(masks.astype(np.uint8), 0, 2), volume.affine, header)
        buffer.write(image.to_bytes())
        voxel_ml = float(np.prod(volume.header.get_zooms()[:3])) / 1000.0
        extra = {"mask.nii.gz": (_gzip(buffer.getvalue()), "application/gzip")}
        result = self._result("nifti", slices, masks, name, extra)
        result["tumour_volume_ml"] = round(int(masks.sum()) * voxel_ml, 3)
        return result

    def _predict_zip(self, folder: Path, data: bytes) -> dict:
        patient = folder / "patient"
        patient.mkdir()
        try:
            archive = zipfile.ZipFile(io.BytesIO(data))
        except zipfile.BadZipFile:
            raise UploadError(400, "not a valid zip file") from None
        members = [m for m in archive.infolist() if not m.is_dir()]
        if len(members) > self.settings.max_zip_files:
            raise UploadError(400, f"zip holds {len(members)} files; the limit is "
                                   f"{self.settings.max_zip_files}")
        declared = sum(m.file_size for m in members)
        limit = self.settings.max_zip_uncompressed_mb * 1024 * 1024
        if declared > limit:
            raise UploadError(400, f"zip would unpack to {declared / 2**20:.0f} MB; the limit is "
                                   f"{self.settings.max_zip_uncompressed_mb:g} MB")
        written = 0
        for member in members:
            parts = PurePosixPath(member.filename.replace("\\", "/")).parts
            if member.filename.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
                raise UploadError(400, f"zip member {member.filename!r} has an unsafe path")
            base = parts[-1] if parts else ""
            if not base or base.startswith(".") or "__MACOSX" in parts:
                continue
            # Read with a hard cap: the declared sizes in a zip can lie.
            with archive.open(member) as source:
                content = source.read(int(limit - written) + 1)
            written += len(content)
            if written > limit:
                raise UploadError(400, "zip unpacks to more than the limit")
            (patient / base).write_bytes(content)  # the base name only: nothing can leave the folder
        slices = patient_slices(patient)
        if not slices:
            raise UploadError(400, "the zip holds no kaggle_3m patient folder (<name>_<n>.tif slices)")
        self._check_slices(len(slices))
        images = np.stack([self.predictor.check_image(read_image(p), p.name) for p in slices])
        with self._lock:
            probability = self.predictor.predict_volume(images)
        return self._result("patient", images, self.predictor.masks(probability), "patient")

    def _check_slices(self, count: int) -> None:
        if count > self.settings.max_slices:
            raise UploadError(400, f"{count} slices; the limit is {self.settings.max_slices}")

    def _result(self, kind: str, images: np.ndarray, masks: np.ndarray, name: str,
                extra: dict | None = None) -> dict:
        identifier = uuid.uuid4().hex
        mask_pngs = [_png(m.astype(np.uint8) * 255) for m in masks]
        image_pngs = [_png(_display(i)) for i in images]
        best = int(masks.reshape(len(masks), -1).sum(1).argmax())
        files = {"overlay.png": (_png((overlay(images[best], masks[best]) * 255).round().astype(np.uint8)),
                                 "image/png")}
        if len(masks) == 1:
            files["mask.png"] = (mask_pngs[0], "image/png")
        else:
            files["masks.zip"] = (_zip_pngs(mask_pngs), "application/zip")
        files.update(extra or {})
        with self._lock:
            self._results[identifier] = files
            while len(self._results) > self.settings.kept_results:
                self._results.popitem(last=False)
        areas = [int(m.sum()) for m in masks]
        return {"id": identifier, "kind": kind, "name": name, "slices": len(masks),
                "height": int(masks.shape[1]), "width": int(masks.shape[2]),
                "tumour_pixels": int(sum(areas)), "tumour_pixels_per_slice": areas,
                "threshold": self.predictor.cutoff, "postprocessing": self.predictor.postprocessing,
                "model": self.predictor.identity,
                "images": [base64.b64encode(p).decode() for p in image_pngs],
                "masks": [base64.b64encode(p).decode() for p in mask_pngs],
                "downloads": {file: f"/api/download/{identifier}/{file}" for file in files}}

    def download(self, identifier: str, file: str) -> tuple[bytes, str]:
        with self._lock:
            files = self._results.get(identifier)
        if not files or file not in files:
            raise UploadError(404, "no such result (results are kept for the last few uploads only)")
        return files[file]


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=6)


def _zip_pngs(pngs: list[bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for number, png in enumerate(pngs, start=1):
            archive.writestr(f"slice_{number:03d}_mask.png", png)
    return buffer.getvalue()


def create_app(settings: ServeSettings | None = None, service: Service | None = None):
    """The FastAPI application; the model loads once, here."""

    service = service or Service(settings or ServeSettings())
    app = FastAPI(title="brainseg", version=__version__,
                  description="Brain tumour segmentation: upload a slice or volume, get its mask.")
    app.state.service = service
    page = (Path(__file__).parent / "web" / "index.html").read_text()

    @app.exception_handler(UploadError)
    async def _upload_error(request, error: UploadError):
        return JSONResponse({"detail": error.message}, status_code=error.status)

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/api/health")
    def health() -> dict:
        return service.health()

    @app.post("/api/predict")
    def predict(file: UploadFile = File(...)) -> dict:
        limit = int(service.settings.max_upload_mb * 1024 * 1024)
        data = file.file.read(limit + 1)
        return service.predict_upload(file.filename or "upload", data)

    @app.get("/api/download/{identifier}/{file}")
    def download(identifier: str, file: str) -> Response:
        content, media = service.download(identifier, file)
        return Response(content, media_type=media,
                        headers={"Content-Disposition": f'attachment; filename="{file}"'})

    return app


def serve(model: str = "pretrained", host: str = "127.0.0.1", port: int = 8000, **limits) -> None:
    if not 0 <= port <= 65535:  # before the model loads, not as a traceback from the socket
        raise OptionError(f"--port: must be 0 to 65535, not {port}")
    settings = ServeSettings(model=model, **limits)
    uvicorn.run(create_app(settings), host=host, port=port, log_level="info")
