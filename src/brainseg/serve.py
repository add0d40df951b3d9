"""`brainseg serve`: a small web viewer and JSON API over the prediction API.

Uploads live in a temporary folder that is removed when the request ends; results (a few PNGs
and a mask file) are kept in memory for download, oldest first out, within a count, a total size and
an age. Every file's decoded size is checked from its header before decoding (brainseg.data.io), a
body over the upload limit is refused as it streams in, zips are read member by member in chunks with
caps on count and unpacked size, and member names never become paths.

A zipped DICOM series (or a .dcm file) comes back with its DICOM SEG and NIfTI mask to download; a
zipped study with the form field `channels` has the series it names fed to the model's channels. Series
are named by number, description and a shortened UID: no patient attribute reaches a message, the page
or the log, and the form field `anonymize` takes them out of the SEG too.
"""


import base64
import gzip
import io
import os
import tempfile
import threading
import time
import uuid
import zipfile
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import nibabel as nib
import numpy as np
import uvicorn
from fastapi import FastAPI, File, Form, HTTPException, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response

from brainseg import __version__, plots
from brainseg.data.dicom import DicomSeries, find_series, holds_dicom, read_series, write_nifti, write_seg
from brainseg.data.io import (
    IMAGE_SUFFIXES,
    MAX_SLICE_PIXELS,
    SizeLimits,
    TooLargeError,
    VolumeShapeError,
    extract_zip,
    image_header,
    read_image,
)
from brainseg.errors import BadInputError, BrainsegError, OptionError
from brainseg.explain import saliency
from brainseg.files import png_bytes
from brainseg.inference import Predictor
from brainseg.plots import overlay_rgb8
from brainseg.predict import is_nifti, nifti_to_slices, patient_slices, stack_slices
from brainseg.predict_dicom import (
    DicomPrediction,
    channel_names,
    channel_plan,
    parse_channels,
    predict_series,
    predict_study,
)

# What scans a model fits, told by its input channels (the page shows it beside the model picker).
FITS = {3: "3-channel slices: pre-contrast, FLAIR, post-contrast (LGG, kaggle_3m)",
        1: "greyscale slices, e.g. T1-weighted contrast-enhanced (Figshare)"}
MULTIPART_ALLOWANCE = 64 * 1024  # the form's boundaries and headers around the file itself


@dataclass
class ServeSettings:
    model: str = "pretrained"  # the default model
    also: tuple[str, ...] = ()  # more models a request may pick by name (form field `model`)
    max_upload_mb: float = 50.0
    max_slices: int = 200
    max_zip_files: int = 500
    max_zip_uncompressed_mb: float = 400.0
    kept_results: int = 32  # results held for download, at most...
    kept_results_mb: float = 256.0  # ...holding this much in all...
    kept_results_minutes: float = 30.0  # ...for this long
    max_pixels: int = MAX_SLICE_PIXELS  # per decoded slice, told from the header before decoding
    max_voxels: int = 2 ** 26  # per decoded volume (a float32 copy of it is 256 MB)
    max_waiting: int = 8  # uploads waiting while one is processed; more get 503 with Retry-After

    def __post_init__(self) -> None:
        """A limit of 0 or less refuses every upload (NaN none): refused before the model loads."""
        for name in ("max_upload_mb", "max_slices", "max_zip_files", "max_zip_uncompressed_mb",
                     "kept_results", "kept_results_mb", "kept_results_minutes", "max_pixels",
                     "max_voxels", "max_waiting"):
            value = getattr(self, name)
            if not value > 0:
                raise OptionError(f"--{name.replace('_', '-')}: must be more than 0, not {value}")

    @property
    def limits(self) -> SizeLimits:
        return SizeLimits(slice_pixels=int(self.max_pixels), slices=int(self.max_slices),
                          voxels=int(self.max_voxels))


class UploadError(Exception):
    """A client error: status code and a message for the user (and headers to send with it)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


@contextmanager
def _as_upload_errors(folder: str | Path):
    """brainseg's errors about an upload unpacked in `folder` as client errors: 413 for a size told from
    a header (nothing was decoded), 422 for a volume whose slices differ, else 400. Messages name files
    as the upload does, never by their path on the server (a decoder's message may hold one)."""
    def told(message: str) -> str:
        return message.replace(f"{folder}{os.sep}", "").replace(str(folder), "the upload")

    try:
        yield
    except TooLargeError as error:
        raise UploadError(413, told(error.problem)) from None
    except VolumeShapeError as error:
        raise UploadError(422, told(error.problem)) from None
    except BadInputError as error:
        raise UploadError(400, told(error.problem)) from None
    except BrainsegError as error:
        raise UploadError(400, told(str(error))) from None


def _display(image: np.ndarray) -> np.ndarray:
    return image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image


class Service:
    """Holds the model (loaded once) and recent results; safe to call from several threads."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        names = list(dict.fromkeys([settings.model, *settings.also]))
        self.predictors = {name: Predictor.load(name) for name in names}
        self.predictor = self.predictors[settings.model]  # the default
        self.loads = 1
        self._lock = threading.Lock()
        self._results: OrderedDict[str, dict[str, tuple[bytes, str]]] = OrderedDict()
        self._kept: dict[str, tuple[float, int]] = {}  # result id -> (time stored, bytes)
        # One upload is decoded and predicted at a time, so that memory holds one request's arrays;
        # a bounded number wait for it, and the rest are told to come back.
        self._working = threading.Lock()
        self._admitted = threading.BoundedSemaphore(settings.max_waiting + 1)

    def models(self) -> list[dict]:
        """Each model a request may pick: its name, what scans it fits (by its input channels)."""
        return [{"name": name, "default": name == self.settings.model, "channels": p.slice_channels,
                 "fits": FITS.get(p.slice_channels, f"{p.slice_channels}-channel slices"),
                 "model": p.identity.get("model")} for name, p in self.predictors.items()]

    def choose(self, name: str | None):
        if not name:
            return self.predictor
        if name not in self.predictors:
            raise UploadError(400, f"unknown model {name!r}; this server has: "
                                   f"{', '.join(self.predictors)}")
        return self.predictors[name]

    def health(self) -> dict:
        return {"status": "ok", "model": self.predictor.identity, "threshold": self.predictor.cutoff,
                "postprocessing": self.predictor.postprocessing, "models": self.models(),
                "limits": {"max_upload_mb": self.settings.max_upload_mb,
                           "max_slices": self.settings.max_slices, "max_pixels": self.settings.max_pixels}}

    @contextmanager
    def _turn(self, data: bytes):
        """Admits an upload within the size and queue limits and runs it when the one before is done."""
        if len(data) > self.settings.max_upload_mb * 1024 * 1024:
            raise UploadError(413, f"upload is larger than {self.settings.max_upload_mb:g} MB")
        if not self._admitted.acquire(blocking=False):
            raise UploadError(503, f"busy: {self.settings.max_waiting} uploads are waiting; try again "
                                   "shortly", headers={"Retry-After": "2"})
        try:
            with self._working:
                yield
        finally:
            self._admitted.release()

    def predict_upload(self, filename: str, data: bytes, model: str | None = None, *,
                       channels: str | None = None, anonymize: bool = False) -> dict:
        predictor = self.choose(model)
        with self._turn(data):
            return self._predict_upload(predictor, filename, data, channels or None, anonymize)

    def explain_upload(self, filename: str, data: bytes, model: str | None = None) -> dict:
        """Saliency of one slice (`brainseg explain`): the figure image | prediction | gradient x input |
        Grad-CAM as a base64 PNG, and the share of each map inside the predicted tumour."""
        predictor = self.choose(model)
        name = PurePosixPath(filename or "upload").name.lower()
        if Path(name).suffix not in IMAGE_SUFFIXES:
            raise UploadError(415, "saliency maps are drawn for one slice: upload a TIFF, PNG or JPEG image")
        with self._turn(data), tempfile.TemporaryDirectory(prefix="brainseg-upload-") as folder, \
                _as_upload_errors(folder):
            path = Path(folder) / ("upload" + Path(name).suffix)
            path.write_bytes(data)
            image = read_image(path, self.settings.limits)
            maps = saliency(predictor, image, name)
            mask = predictor.masks(maps.probability)
            figure = plots.saliency_figure(image, mask, maps.gradient_x_input, maps.grad_cam,
                                           Path(folder) / "saliency.png", name)
            return {"name": name, "tumour_pixels": int(mask.sum()),
                    "gradient_x_input_inside": round(maps.share_inside(mask), 4),
                    "grad_cam_inside": round(maps.share_inside(mask, "grad_cam"), 4),
                    "figure": base64.b64encode(figure.read_bytes()).decode()}

    def _predict_upload(self, predictor, filename: str, data: bytes, channels: str | None = None,
                        anonymize: bool = False) -> dict:
        name = PurePosixPath(filename or "upload").name.lower()
        with tempfile.TemporaryDirectory(prefix="brainseg-upload-") as folder, _as_upload_errors(folder):
            folder = Path(folder)
            if name.endswith(".zip"):
                return self._predict_zip(predictor, folder, data, channels, anonymize)
            if name.endswith((".dcm", ".dicom")):
                (folder / "dicom").mkdir()
                (folder / "dicom" / "upload.dcm").write_bytes(data)
                return self._predict_dicom(predictor, folder, channels, anonymize)
            if channels:
                raise UploadError(400, "the channels field maps the series of a DICOM upload (a zip of "
                                       "DICOM files); this upload is not DICOM")
            if is_nifti(Path(name)):
                return self._predict_nifti(predictor, folder, name, data)
            if Path(name).suffix in IMAGE_SUFFIXES:
                return self._predict_image(predictor, folder, name, data)
        raise UploadError(415, "unsupported file type: upload a TIFF/PNG/JPEG slice, a NIfTI volume "
                               "(.nii, .nii.gz), a zip of a kaggle_3m patient folder or of a DICOM series, "
                               "or a .dcm file")

    def _predict_image(self, predictor, folder: Path, name: str, data: bytes) -> dict:
        path = folder / ("upload" + Path(name).suffix)
        path.write_bytes(data)
        image = read_image(path, self.settings.limits)
        image = predictor.check_image(image, name)
        probability = predictor.predict_volume(image[None])  # one upload at a time: see _working
        return self._result(predictor, "image", image[None], predictor.masks(probability), name)

    def _predict_nifti(self, predictor, folder: Path, name: str, data: bytes) -> dict:
        path = folder / ("upload.nii.gz" if name.endswith(".gz") else "upload.nii")
        path.write_bytes(data)
        def check_channels(count: int, _: str) -> None:
            predictor.check_channels(count, name)  # the upload's name, not the temp file's

        slices, volume = nifti_to_slices(path, axis=2, limits=self.settings.limits,
                                         check_channels=check_channels)
        self._check_slices(len(slices))
        probability = predictor.predict_volume(slices)  # one upload at a time: see _working
        masks = predictor.masks(probability)
        header = volume.header.copy()
        header.set_data_dtype(np.uint8)
        buffer = io.BytesIO()
        image = nib.Nifti1Image(np.moveaxis(masks.astype(np.uint8), 0, 2), volume.affine, header)
        buffer.write(image.to_bytes())
        voxel_ml = float(np.prod(volume.header.get_zooms()[:3])) / 1000.0
        extra = {"mask.nii.gz": (_gzip(buffer.getvalue()), "application/gzip")}
        result = self._result(predictor, "nifti", slices, masks, name, extra)
        result["tumour_volume_ml"] = round(int(masks.sum()) * voxel_ml, 3)
        return result

    def _predict_zip(self, predictor, folder: Path, data: bytes, channels: str | None = None,
                     anonymize: bool = False) -> dict:
        patient = folder / "patient"
        patient.mkdir()
        limit = int(self.settings.max_zip_uncompressed_mb * 1024 * 1024)
        extract_zip(io.BytesIO(data), patient, max_files=self.settings.max_zip_files, max_bytes=limit)
        slices = patient_slices(patient)
        if not slices and holds_dicom(patient):
            patient.rename(folder / "dicom")
            return self._predict_dicom(predictor, folder, channels, anonymize)
        if channels:
            raise UploadError(400, "the channels field maps the series of a DICOM upload; this zip holds "
                                   "no DICOM files")
        if not slices:
            raise UploadError(400, "the zip holds no kaggle_3m patient folder (<name>_<n>.tif slices) and "
                                   "no DICOM series")
        self._check_slices(len(slices))
        limits = self.settings.limits
        voxels = sum(width * height for width, height in (image_header(p, limits) for p in slices))
        if voxels > limits.voxels:  # from the headers, before any slice is decoded
            raise UploadError(413, f"the slices hold {voxels:,} pixels in all; the limit is "
                                   f"{limits.voxels:,}")
        images = stack_slices([predictor.check_image(read_image(p, limits), p.name) for p in slices],
                              slices)
        probability = predictor.predict_volume(images)  # one upload at a time: see _working
        return self._result(predictor, "patient", images, predictor.masks(probability), "patient")

    def _predict_dicom(self, predictor, folder: Path, channels: str | None, anonymize: bool) -> dict:
        """The DICOM files in `folder`/dicom: one series, or with `channels` the series it maps to the
        model's channels -> the result, with seg.dcm (anonymised with `anonymize`) and mask.nii.gz.
        Problems name a file by its name in the upload, and series by their labels."""
        found = find_series(folder / "dicom")
        series = [item for item in found if isinstance(item, DicomSeries)]
        skipped = [f"{item.path.name}: {item.problem}" for item in found if isinstance(item, BadInputError)]
        try:
            prediction = self._dicom_prediction(predictor, series, skipped, channels)
            model = str(predictor.identity.get("model", "brainseg"))
            seg = write_seg(prediction.mask, prediction.geometry, folder / "result" / "seg.dcm", model=model,
                            anonymize=anonymize)
            nifti = write_nifti(prediction.mask.astype(np.uint8), prediction.geometry,
                                folder / "result" / "mask.nii.gz")
        except OptionError as error:
            raise UploadError(400, str(error)) from None
        except TooLargeError as error:
            raise UploadError(413, error.problem) from None
        except BadInputError as error:
            raise UploadError(400, f"{_upload_name(error.path, folder)}: {error.problem}") from None
        extra = {"seg.dcm": (seg.read_bytes(), "application/dicom"),
                 "mask.nii.gz": (nifti.read_bytes(), "application/gzip")}
        result = self._result(predictor, "dicom", prediction.volume, prediction.mask,
                              prediction.geometry.label, extra)
        result.update(series=prediction.series, note=prediction.note, skipped=skipped,
                      tumour_area_mm2=prediction.tumour_area_mm2,
                      tumour_volume_ml=prediction.tumour_volume_ml, anonymized=anonymize)
        return result

    def _dicom_prediction(self, predictor, series: list[DicomSeries], skipped: list[str],
                          channels: str | None) -> DicomPrediction:
        limits = self.settings.limits
        if channels:
            plan = channel_plan(parse_channels(channels), predictor.slice_channels)
            return predict_study(predictor, series, plan, "upload", limits)
        if not series:
            raise UploadError(400, skipped[0] if skipped else "the upload holds no DICOM image series")
        if len(series) > 1:
            example = ",".join(f"{name}=..." for name in channel_names(predictor.slice_channels))
            labels = "; ".join(s.label for s in series)
            raise UploadError(400, f"the upload holds {len(series)} series ({labels}); upload one, or name "
                                   f"those to use in the channels field ({example})")
        return predict_series(predictor, *read_series(series[0], limits))

    def _check_slices(self, count: int) -> None:
        if count > self.settings.max_slices:
            raise UploadError(413, f"{count} slices; the limit is {self.settings.max_slices}")

    def _result(self, predictor, kind: str, images: np.ndarray, masks: np.ndarray, name: str,
                extra: dict | None = None) -> dict:
        identifier = uuid.uuid4().hex
        mask_pngs = [png_bytes(m.astype(np.uint8) * 255) for m in masks]
        image_pngs = [png_bytes(_display(i)) for i in images]
        best = int(masks.reshape(len(masks), -1).sum(1).argmax())
        files = {"overlay.png": (png_bytes(overlay_rgb8(images[best], masks[best])),
                                 "image/png")}
        if len(masks) == 1:
            files["mask.png"] = (mask_pngs[0], "image/png")
        else:
            files["masks.zip"] = (_zip_pngs(mask_pngs), "application/zip")
        files.update(extra or {})
        with self._lock:
            self._results[identifier] = files
            self._kept[identifier] = (time.monotonic(), sum(len(content) for content, _ in files.values()))
            self._evict()
        areas = [int(m.sum()) for m in masks]
        return {"id": identifier, "kind": kind, "name": name, "slices": len(masks),
                "height": int(masks.shape[1]), "width": int(masks.shape[2]),
                "tumour_pixels": int(sum(areas)), "tumour_pixels_per_slice": areas,
                "threshold": predictor.cutoff, "postprocessing": predictor.postprocessing,
                "model": predictor.identity,
                "images": [base64.b64encode(p).decode() for p in image_pngs],
                "masks": [base64.b64encode(p).decode() for p in mask_pngs],
                "downloads": {file: f"/api/download/{identifier}/{file}" for file in files}}

    def _evict(self) -> None:
        """Drop the oldest results while there are too many, they hold too much, or they have expired
        (the caller holds the lock)."""
        settings = self.settings
        oldest = time.monotonic() - settings.kept_results_minutes * 60
        while self._results:
            first = next(iter(self._results))
            total = sum(size for _, size in self._kept.values())
            if (len(self._results) <= settings.kept_results and total <= settings.kept_results_mb * 2**20
                    and self._kept[first][0] >= oldest):
                break
            self._results.pop(first)
            self._kept.pop(first)

    def download(self, identifier: str, file: str) -> tuple[bytes, str]:
        with self._lock:
            self._evict()
            files = self._results.get(identifier)
        if not files or file not in files:
            raise UploadError(404, "no such result (results are kept for the last few uploads only)")
        return files[file]


def _upload_name(path: Path, folder: Path) -> str:
    """A path in an upload's temporary folder as the user knows it: the file's name, never the folder."""
    inside = folder / "dicom"
    return path.name if path != inside and path.is_relative_to(inside) else "upload"


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=6)


def _zip_pngs(pngs: list[bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for number, png in enumerate(pngs, start=1):
            archive.writestr(f"slice_{number:03d}_mask.png", png)
    return buffer.getvalue()


class BodyLimit:
    """ASGI middleware that refuses a request body as soon as it passes `limit` bytes, with 413: at once
    when its Content-Length says so, else while it streams in, so the rest is never read or spooled."""

    def __init__(self, app, limit: int, message: str) -> None:
        self.app = app
        self.limit = limit
        self.message = message

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            body = JSONResponse({"detail": self.message}, status_code=413, headers={"Connection": "close"})
            await body(scope, receive, send)
            return
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:  # FastAPI passes an HTTPException raised here through as is
                    raise HTTPException(413, self.message, headers={"Connection": "close"})
            return message

        await self.app(scope, limited_receive, send)


def create_app(settings: ServeSettings | None = None, service: Service | None = None):
    """The FastAPI application; the model loads once, here."""

    service = service or Service(settings or ServeSettings())
    app = FastAPI(title="brainseg", version=__version__,
                  description="Brain tumour segmentation: upload a slice or volume, get its mask.")
    app.state.service = service
    upload_mb = service.settings.max_upload_mb
    app.add_middleware(BodyLimit, limit=int(upload_mb * 1024 * 1024) + MULTIPART_ALLOWANCE,
                       message=f"upload is larger than {upload_mb:g} MB")
    page = (Path(__file__).parent / "web" / "index.html").read_text()

    @app.exception_handler(UploadError)
    async def _upload_error(request, error: UploadError):
        return JSONResponse({"detail": error.message}, status_code=error.status, headers=error.headers)

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/api/health")
    def health() -> dict:
        return service.health()

    @app.post("/api/predict")
    def predict(file: UploadFile = File(...), model: str | None = Form(None),
                channels: str | None = Form(None), anonymize: bool = Form(False)) -> dict:
        limit = int(service.settings.max_upload_mb * 1024 * 1024)
        data = file.file.read(limit + 1)
        return service.predict_upload(file.filename or "upload", data, model, channels=channels,
                                      anonymize=anonymize)

    @app.post("/api/explain")
    def explain(file: UploadFile = File(...), model: str | None = Form(None)) -> dict:
        data = file.file.read(int(service.settings.max_upload_mb * 1024 * 1024) + 1)
        return service.explain_upload(file.filename or "upload", data, model)

    @app.get("/api/download/{identifier}/{file}")
    def download(identifier: str, file: str) -> Response:
        content, media = service.download(identifier, file)
        return Response(content, media_type=media,
                        headers={"Content-Disposition": f'attachment; filename="{file}"'})

    return app


def serve(model: str = "pretrained", host: str = "127.0.0.1", port: int = 8000, **limits) -> None:
    """Serve `model`; with the shipped LGG model, the shipped Figshare model is offered beside it."""
    if not 0 <= port <= 65535:  # before the model loads, not as a traceback from the socket
        raise OptionError(f"--port: must be 0 to 65535, not {port}")
    also = ("pretrained:figshare",) if model == "pretrained" else ()
    settings = ServeSettings(model=model, also=also, **limits)
    uvicorn.run(create_app(settings), host=host, port=port, log_level="info")
