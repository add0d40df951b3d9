"""Prediction from a self-describing model file: preprocess -> batch -> network -> resize back.

`Predictor.from_checkpoint(path)` accepts a run folder, its model.pt, or a Lightning checkpoint
written by `brainseg train`. Probabilities come back at each input's own size.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from brainseg.data.dataset import NORMALISATION
from brainseg.errors import BadInputError, BrainsegError, OptionError
from brainseg.postprocess import check_min_fraction, check_min_size, check_threshold, postprocess

MODEL_FILE = "model.pt"
PRECISIONS = ("auto", "32", "bf16")
# Description formats this version reads: training.CHECKPOINT_FORMAT (kept here so that prediction
# does not import lightning). Training and ensemble have written it into every model file, the shipped
# one and ONNX metadata included, so a file without it was not written by brainseg.
READABLE_FORMATS = ("brainseg-checkpoint/1",)


def resolve_model_path(path: str | Path) -> Path:
    """The file or folder a model argument names; 'pretrained' is the model shipped in the package."""
    if str(path) == "pretrained":
        from brainseg.pretrained import pretrained_path

        return pretrained_path()
    return Path(path)


def model_file(path: str | Path) -> Path:
    """The file a model argument names: a run folder's model.pt, or the file itself."""
    path = resolve_model_path(path)
    return path / MODEL_FILE if path.is_dir() else path


def load_model_file(path: str | Path) -> tuple[dict, dict]:
    """(description, state_dict) from a run folder, a model.pt, a Lightning .ckpt or 'pretrained'."""
    path = resolve_model_path(path)
    if path.is_dir():
        if not (path / MODEL_FILE).exists():
            raise BadInputError(path, f"run folder has no {MODEL_FILE} (did training finish?)")
        path = path / MODEL_FILE
    if not path.exists():
        raise BadInputError(path, "model file does not exist")
    try:
        # weights_only: a model file from elsewhere must not be able to run code when loaded.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # every format fails its own way; all mean "not one of ours"
        raise BadInputError(path, "not a brainseg checkpoint (cannot be read as a PyTorch file)") from None
    if not isinstance(state, dict) or "brainseg" not in state or "state_dict" not in state:
        raise BadInputError(path, "not a brainseg checkpoint (no 'brainseg' description)")
    if not isinstance(state["state_dict"], dict) or not all(
            isinstance(v, torch.Tensor) for v in state["state_dict"].values()):
        raise BadInputError(path, "not a brainseg checkpoint (its weights are not a dict of tensors)")
    weights = {k: v.float() if v.is_floating_point() else v for k, v in state["state_dict"].items()}
    if any(k.startswith("model.") for k in weights):  # a Lightning checkpoint of SegmentationModule
        weights = {k.removeprefix("model."): v for k, v in weights.items() if k.startswith("model.")}
    return check_description(path, state["brainseg"]), weights


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _whole(value, low: int) -> bool:
    return _number(value) and isinstance(value, int) and value >= low


def check_description(path: str | Path, description) -> dict:
    """The description of a model file if a hand edit left it usable, else a one-line error naming it.

    Checked once on loading, so that a bad entry is not met later as a KeyError or a torch error."""
    def bad(problem: str) -> BadInputError:
        return BadInputError(path, f"model description: {problem}")

    if not isinstance(description, dict):
        raise bad("not a mapping")
    if description.get("format") not in READABLE_FORMATS:
        found = f"format {description['format']!r}" if "format" in description else "no format"
        raise bad(f"{found}; this version of brainseg reads {', '.join(READABLE_FORMATS)}")
    spec = description.get("model")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) \
            or not isinstance(spec.get("kwargs"), dict):
        raise bad("'model' needs a name and kwargs")
    preprocessing = description.get("preprocessing")
    if not isinstance(preprocessing, dict):
        raise bad("no 'preprocessing' entry")
    context = preprocessing.get("context", 0)
    if not _whole(context, 0):
        raise bad(f"preprocessing.context must be a whole number of 0 or more, not {context!r}")
    channels = preprocessing.get("in_channels")
    if not _whole(channels, 1) or channels % (2 * context + 1):
        raise bad(f"preprocessing.in_channels must be a positive multiple of {2 * context + 1}, "
                  f"not {channels!r}")
    depth = spec["kwargs"].get("depth", 0)
    minimum = 2 ** depth if _whole(depth, 0) and depth < 16 else 1  # each level halves the input
    size = preprocessing.get("image_size")
    if not _whole(size, minimum):
        raise bad(f"preprocessing.image_size must be a whole number of at least {minimum}, not {size!r}")
    threshold = description.get("threshold", 0.5)
    if not _number(threshold) or not 0 < threshold < 1:
        raise bad(f"threshold must be a number between 0 and 1, not {threshold!r}")
    stored = description.get("postprocessing", {})
    if not isinstance(stored, dict):
        raise bad("'postprocessing' must be a mapping")
    checks = {"largest_component": lambda v: isinstance(v, bool),
              "min_size": lambda v: _whole(v, 0),
              "min_fraction": lambda v: _number(v) and 0 <= v <= 1}
    for key, valid in checks.items():
        if stored.get(key) is not None and not valid(stored[key]):
            raise bad(f"postprocessing.{key} cannot be {stored[key]!r}")
    return description


def build_network(path: str | Path, description: dict, weights: dict) -> torch.nn.Module:
    """The network a (checked) description names, with its weights; a mismatch is a one-line error."""
    from brainseg.models import create_model

    spec = description["model"]
    try:
        network = create_model(spec["name"], **spec["kwargs"])
    except BrainsegError as error:
        raise BadInputError(path, f"model description: {error}") from None
    except (TypeError, ValueError, KeyError, RuntimeError) as error:  # kwargs the model cannot take
        detail = f"{type(error).__name__}: {str(error).strip()}".splitlines()[0]
        raise BadInputError(path, f"model description: cannot build {spec['name']!r} from its kwargs "
                                  f"({detail})") from None
    expected = network.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    reshaped = [k for k in expected if k in weights and weights[k].shape != expected[k].shape]
    if missing or unexpected or reshaped:
        if reshaped:
            key = reshaped[0]
            first = (f"{key} is {tuple(weights[key].shape)} in the file, "
                     f"{tuple(expected[key].shape)} in the description")
        else:
            first = f"{missing[0]} missing" if missing else f"{unexpected[0]} unexpected"
        raise BadInputError(path, f"weights do not match the model description ({first}; "
                                  f"{len(missing)} missing, {len(unexpected)} unexpected, "
                                  f"{len(reshaped)} of another shape)")
    network.load_state_dict(weights)
    return network


def check_device(device: str) -> str:
    """`device` if this torch can run on it (cpu, cuda or cuda:N), else a one-line error."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise OptionError(f"--device: must be cpu, cuda or cuda:N, not {device!r}")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionError(f"--device {device}: this torch has no CUDA (or sees no GPU); use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise OptionError(f"--device {device}: there are {torch.cuda.device_count()} CUDA device(s), "
                              f"numbered from 0")
    return device


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


@dataclass
class Predictor:
    """A network with its preprocessing; call `predict` or `predict_volume`."""

    model: torch.nn.Module
    description: dict
    device: str = "cpu"
    precision: str = "32"  # 32 or bf16
    batch_size: int = 16
    tta_flip: bool = False
    threshold: float | None = None  # None: the checkpoint's threshold
    largest_component: bool | None = None  # None: the checkpoint's post-processing (off if it has none)
    min_size: int | None = None  # None: the checkpoint's
    min_fraction: float | None = None  # components under this share of the largest go (None: checkpoint's)
    source: str = ""
    identity: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.min_fraction is not None:
            check_min_fraction(self.min_fraction)
        if self.threshold is not None:
            check_threshold(self.threshold)
        if self.min_size is not None:
            check_min_size(self.min_size)
        if not _whole(self.batch_size, 1):
            raise OptionError(f"--batch-size: must be 1 or more, not {self.batch_size}")
        if self.precision not in PRECISIONS[1:]:
            raise OptionError(f"--precision: must be auto, 32 or bf16, not {self.precision!r}")

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, device: str = "cpu", precision: str = "auto",
                        **options) -> Predictor:
        if precision not in PRECISIONS:  # before the model loads
            raise OptionError(f"--precision: must be auto, 32 or bf16, not {precision!r}")
        check_device(device)
        description, weights = load_model_file(path)
        spec = description["model"]
        resolved = model_file(path)
        model = build_network(resolved, description, weights)
        model.eval().to(device)
        if description.get("preprocessing", {}).get("channels_last", False):
            model = model.to(memory_format=torch.channels_last)
        if precision == "auto":
            from brainseg.training import resolve_precision

            accelerator = "gpu" if device.startswith("cuda") else "cpu"
            precision = "bf16" if resolve_precision("auto", accelerator).startswith("bf16") else "32"
        identity = {"file": str(resolved), "sha256_16": file_digest(resolved), "model": spec["name"],
                    "kwargs": spec["kwargs"], "brainseg_version": description.get("brainseg_version")}
        return cls(model, description, device, precision, source=str(resolved), identity=identity,
                   **options)

    @classmethod
    def load(cls, path: str | Path, *, backend: str = "torch", device: str = "cpu", precision: str = "auto",
             **options) -> Predictor:
        """A predictor on the torch or the ONNX Runtime backend ('pretrained' is the shipped model)."""
        path = resolve_model_path(path)
        if backend == "torch":
            if Path(path).suffix == ".onnx":
                raise BadInputError(path, "an ONNX model needs --backend onnx")
            return cls.from_checkpoint(path, device=device, precision=precision, **options)
        if backend != "onnx":
            raise BadInputError("--backend", f"must be torch or onnx, not {backend!r}")
        if device != "cpu":
            raise OptionError(f"--device {device}: the onnx backend runs on the CPU; use --device cpu "
                              "or --backend torch")
        if Path(path).suffix == ".onnx":
            return cls.from_onnx(path, **options)
        return cls._from_export(Path(path), **options)

    @classmethod
    def _from_export(cls, path: Path, **options) -> Predictor:
        """ONNX Runtime on a torch model file: the model.onnx beside it if that was exported from this
        very file, else a fresh export in a temporary folder, removed once the session has read it."""
        import tempfile

        from brainseg.export import export_model, exported_from

        source = model_file(path)
        load_model_file(source)  # a bad model file is reported as such, not as a failed export
        digest = file_digest(source)
        beside = source.parent / "model.onnx"
        if beside.exists() and exported_from(beside) == digest:
            return cls.from_onnx(beside, **options)
        with tempfile.TemporaryDirectory(prefix="brainseg-onnx-") as folder:
            predictor = cls.from_onnx(export_model(source, Path(folder) / "model.onnx")["path"], **options)
        predictor.source = str(source)
        predictor.identity.update(file=str(source), sha256_16=digest, exported="on the fly")
        return predictor

    @classmethod
    def from_onnx(cls, path: str | Path, **options) -> Predictor:
        from brainseg.export import OnnxNetwork

        path = Path(path)
        if not path.exists():
            raise BadInputError(path, "model file does not exist")
        network = OnnxNetwork(path)
        description = check_description(path, network.description())
        identity = {"file": str(path), "sha256_16": file_digest(path), "model": description["model"]["name"],
                    "kwargs": description["model"]["kwargs"], "backend": "onnxruntime",
                    "brainseg_version": description.get("brainseg_version")}
        return cls(network, description, "cpu", "32", source=str(path), identity=identity,
                   **options)

    @property
    def preprocessing(self) -> dict:
        return self.description["preprocessing"]

    @property
    def image_size(self) -> int:
        return int(self.preprocessing["image_size"])

    @property
    def context(self) -> int:
        return int(self.preprocessing.get("context", 0))

    @property
    def in_channels(self) -> int:
        return int(self.preprocessing["in_channels"])

    @property
    def slice_channels(self) -> int:
        return self.in_channels // (2 * self.context + 1)

    @property
    def cutoff(self) -> float:
        return float(self.threshold if self.threshold is not None else self.description.get("threshold", 0.5))

    @property
    def postprocessing(self) -> dict:
        """The post-processing in force: the caller's choices over the checkpoint's recommendation."""
        stored = self.description.get("postprocessing", {})
        largest, min_size, min_fraction = self.largest_component, self.min_size, self.min_fraction
        return {"largest_component": bool(stored.get("largest_component") if largest is None else largest),
                "min_size": int((stored.get("min_size") if min_size is None else min_size) or 0),
                "min_fraction": float((stored.get("min_fraction") if min_fraction is None else min_fraction)
                                      or 0.0)}

    def masks(self, probability: np.ndarray) -> np.ndarray:
        """Probabilities of one volume (N, H, W) or image (H, W) -> binary mask: threshold, then the
        post-processing in force (largest component in 3D over a volume's slices)."""
        settings = self.postprocessing
        return postprocess(probability >= self.cutoff, largest=settings["largest_component"],
                           min_size=settings["min_size"], min_fraction=settings["min_fraction"])

    def check_image(self, image: np.ndarray, name: str = "image") -> np.ndarray:
        """(H, W) or (H, W, C) uint8 -> (H, W, C) with the channel count the model expects."""
        if image.ndim == 2:
            image = image[..., None]
        if image.shape[-1] != self.slice_channels:
            raise BadInputError(name, f"has {image.shape[-1]} channel(s); the model expects "
                                      f"{self.slice_channels}")
        minimum = 2 ** int(self.description["model"]["kwargs"].get("depth", 4))
        if min(image.shape[:2]) < minimum:
            raise BadInputError(name, f"is {image.shape[0]}x{image.shape[1]}, too small for the network "
                                      f"(at least {minimum}x{minimum})")
        return image

    @torch.inference_mode()
    def _logits(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(self.device)
        if self.preprocessing.get("channels_last", False):
            batch = batch.contiguous(memory_format=torch.channels_last)
        device_type = "cuda" if self.device.startswith("cuda") else "cpu"
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            logits = self.model(batch).float()
            if self.tta_flip:
                flipped = self.model(torch.flip(batch, dims=[-1])).float()
                logits = (logits + torch.flip(flipped, dims=[-1])) / 2
        return logits

    def probabilities(self, inputs, sizes: list[tuple[int, int]], scales=None) -> list[np.ndarray]:
        """Network inputs, (H, W, C') uint8 each and already context-stacked -> probabilities per size.

        `inputs` is an (N, H, W, C') array or a list of arrays of different sizes; `scales` are the
        channel scales of the volume they come from (None: each image's own).
        """
        from brainseg.data.dataset import to_input

        normalisation = self.preprocessing.get("normalisation")
        if normalisation != NORMALISATION:
            raise BadInputError(self.source, f"model uses normalisation {normalisation!r}; this brainseg "
                                             f"supports {NORMALISATION!r} (retrain the model)")
        out = []
        for start in range(0, len(inputs), self.batch_size):
            chunk = inputs[start:start + self.batch_size]
            batch = torch.stack([to_input(image, self.image_size, scales) for image in chunk])
            logits = self._logits(batch).cpu()
            for i, logit in enumerate(logits):
                size = sizes[start + i]
                if tuple(logit.shape[-2:]) != tuple(size):
                    logit = F.interpolate(logit[None], size=size, mode="bilinear", align_corners=False)[0]
                out.append(torch.sigmoid(logit[0]).numpy())
        return out

    def predict_volume(self, slices: np.ndarray, names: list[str] | None = None) -> np.ndarray:
        """(N, H, W[, C]) uint8 slices of one volume, in order -> (N, H, W) float32 probabilities.

        Intensities are normalised over the whole volume, and with a 2.5D model the neighbours of
        each slice are stacked, as in training. `names` (the slices' files) name a bad slice.
        """
        from brainseg.data.dataset import channel_scales

        names = names or [f"slice {i}" for i in range(len(slices))]
        slices = np.stack([self.check_image(s, name) for s, name in zip(slices, names, strict=True)])
        scales = np.tile(channel_scales(slices), 2 * self.context + 1)
        if self.context:
            n = len(slices)
            picks = [np.clip(np.arange(i - self.context, i + self.context + 1), 0, n - 1) for i in range(n)]
            inputs = np.stack([np.concatenate(list(slices[p]), axis=-1) for p in picks])
        else:
            inputs = slices
        sizes = [s.shape[:2] for s in slices]
        return np.stack(self.probabilities(inputs, sizes, scales)).astype(np.float32)

    def predict(self, image: np.ndarray) -> np.ndarray:
        """One slice (H, W[, C]) uint8 -> binary mask (H, W) uint8 at the input's size."""
        return self.masks(self.predict_volume(np.asarray(image)[None])[0]).astype(np.uint8)

