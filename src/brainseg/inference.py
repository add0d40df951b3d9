"""Inference from a self-describing model file: preprocess -> batch -> network -> resize back.

`Predictor.load(path)` accepts a run folder, its model file, a Lightning checkpoint written by
`brainseg train`, an exported ONNX model or 'pretrained', on the torch or the ONNX Runtime backend.
Probabilities come back at each input's own size. No Lightning here: serve and predict load fast.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from brainseg.config import check_threshold
from brainseg.data.dataset import NORMALISATIONS, channel_scales, to_input
from brainseg.devices import check_device, inference_precision, normalise_device, normalise_precision
from brainseg.errors import BadInputError, OptionError
from brainseg.evaluation.postprocess import check_min_fraction, check_min_size, postprocess
from brainseg.runs.folder import ONNX_FILE, model_file, resolve_model_path
from brainseg.runs.model_file import build_network, check_description, file_digest, load_model_file, whole

PRECISIONS = ("auto", "32", "bf16")


def _equal_channels(image: np.ndarray) -> bool:
    return bool(np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 0], image[..., 2]))


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
    warned_single_sequence: bool = field(default=False, repr=False)
    on_slices: Callable[[int], None] | None = field(default=None, repr=False)  # told of each batch done

    def __post_init__(self) -> None:
        if self.min_fraction is not None:
            check_min_fraction(self.min_fraction)
        if self.threshold is not None:
            check_threshold(self.threshold)
        if self.min_size is not None:
            check_min_size(self.min_size)
        if not whole(self.batch_size, 1):
            raise OptionError(f"--batch-size: must be 1 or more, not {self.batch_size}")
        if self.precision not in PRECISIONS[1:]:
            raise OptionError(f"--precision: must be auto, 32 or bf16, not {self.precision!r}")

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, device: str = "cpu", precision: str = "auto",
                        **options) -> Predictor:
        precision = normalise_precision(precision, allowed=PRECISIONS)  # before the model loads
        device = check_device(device)
        description, weights = load_model_file(path)
        spec = description["model"]
        resolved = model_file(path)
        model = build_network(resolved, description, weights)
        model.eval().to(device)
        if description.get("preprocessing", {}).get("channels_last", False):
            model = model.to(memory_format=torch.channels_last)
        precision = inference_precision(precision, device)
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
        if normalise_device(device) not in ("auto", "cpu"):
            raise OptionError(f"--device {device}: the onnx backend runs on the CPU; use --device cpu "
                              "or --backend torch")
        if Path(path).suffix == ".onnx":
            return cls.from_onnx(path, **options)
        return cls._from_export(Path(path), **options)

    @classmethod
    def _from_export(cls, path: Path, **options) -> Predictor:
        """ONNX Runtime on a torch model file: the model.onnx beside it if that was exported from this
        very file, else a fresh export in a temporary folder, removed once the session has read it."""
        from brainseg.export import export_model, exported_from  # onnx is slow to import: only for ONNX

        source = model_file(path)
        load_model_file(source)  # a bad model file is reported as such, not as a failed export
        digest = file_digest(source)
        beside = source.parent / ONNX_FILE
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
    def normalisation(self) -> str:
        """How the model's inputs were scaled (a model file records it); one this version knows."""
        normalisation = self.preprocessing.get("normalisation")
        if normalisation not in NORMALISATIONS.values():
            known = ", ".join(NORMALISATIONS.values())
            raise BadInputError(self.source, f"model uses normalisation {normalisation!r}; this brainseg "
                                             f"supports {known} (retrain the model)")
        return normalisation

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

    def check_channels(self, channels: int, name: str = "image", maybe_grey: bool = True) -> None:
        """Refuses a channel count the model cannot take, naming the shipped model that fits such scans;
        known from a header, this spares decoding a volume the model would refuse. `maybe_grey`: 3 or
        4 channels may still be equal, which a 1-channel model takes as greyscale (decided from pixels)."""
        grey_rgb = maybe_grey and channels in (3, 4) and self.slice_channels == 1
        if channels == self.slice_channels or grey_rgb:
            return
        hint = ""
        if channels == 1 and self.slice_channels == 3:
            hint = (" (pre-contrast, FLAIR, post-contrast, as in LGG); for greyscale T1-CE slices "
                    "(Figshare) use --model pretrained:figshare")
        elif self.slice_channels == 1:
            hint = " (greyscale T1-CE, as in Figshare); for LGG's 3-channel slices use --model pretrained"
        raise BadInputError(name, f"has {channels} channel(s); the model expects {self.slice_channels}{hint}")

    def check_image(self, image: np.ndarray, name: str = "image") -> np.ndarray:
        """(H, W) or (H, W, C) uint8 -> (H, W, C) with the channel count the model expects.

        A greyscale image stored as equal RGB channels is taken as greyscale by a 1-channel model; a
        mismatch names the shipped model that fits such scans."""
        if image.ndim == 2:
            image = image[..., None]
        channels = image.shape[-1]
        if channels in (3, 4) and self.slice_channels == 1 and _equal_channels(image[..., :3]):
            image = image[..., :1]
        elif channels != self.slice_channels:
            self.check_channels(channels, name, maybe_grey=False)
        elif channels == 3 and not self.warned_single_sequence and _equal_channels(image):
            self.warned_single_sequence = True  # once: a volume's slices would each repeat it
            warnings.warn(f"{name}: its 3 channels are equal, so it looks like a single sequence; this "
                          "model expects pre-contrast, FLAIR and post-contrast (for greyscale T1-CE "
                          "slices use --model pretrained:figshare)", stacklevel=2)
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
        normalisation = self.normalisation
        out = []
        for start in range(0, len(inputs), self.batch_size):
            chunk = inputs[start:start + self.batch_size]
            batch = torch.stack([to_input(image, self.image_size, scales if scales is not None
                                          else channel_scales([image], normalisation)) for image in chunk])
            logits = self._logits(batch).cpu()
            for i, logit in enumerate(logits):
                size = sizes[start + i]
                if tuple(logit.shape[-2:]) != tuple(size):
                    logit = F.interpolate(logit[None], size=size, mode="bilinear", align_corners=False)[0]
                out.append(torch.sigmoid(logit[0]).numpy())
            if self.on_slices is not None:
                self.on_slices(len(chunk))
        return out

    def predict_volume(self, slices: np.ndarray, names: list[str] | None = None) -> np.ndarray:
        """(N, H, W[, C]) uint8 slices of one volume, in order -> (N, H, W) float32 probabilities.

        Intensities are normalised over the whole volume, and with a 2.5D model the neighbours of
        each slice are stacked, as in training. `names` (the slices' files) name a bad slice.
        """
        names = names or [f"slice {i}" for i in range(len(slices))]
        slices = np.stack([self.check_image(s, name) for s, name in zip(slices, names, strict=True)])
        scales = np.tile(channel_scales(slices, self.normalisation), 2 * self.context + 1)
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



def load_pretrained(name: str = "pretrained", **options) -> Predictor:
    """A Predictor for a shipped model, 'pretrained' (LGG) or 'pretrained:NAME' (see MODEL_CARD.md)."""
    return Predictor.load(name if str(name).startswith("pretrained") else f"pretrained:{name}", **options)
