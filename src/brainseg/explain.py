"""Saliency maps: which pixels drove a model's tumour prediction (`brainseg explain`).

Two maps per image, for the tumour logit (summed over the predicted tumour, or over the whole image
where nothing is predicted):
- gradient x input: the input gradient times the input, summed over channels, its magnitude
  smoothed with a Gaussian (SmoothGrad-like noise is left out to keep it deterministic);
- Grad-CAM on the last decoder block (the last convolution with a spatial kernel): its activations
  weighted by their mean gradient, rectified.
Both are scaled to [0, 1] and resized to the image. They say where the network looked, not why.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from brainseg import plots
from brainseg.data.dataset import channel_scales, to_input
from brainseg.data.index import ensure_outside
from brainseg.data.io import read_image
from brainseg.errors import BadInputError, BrainsegError
from brainseg.inference import Predictor
from brainseg.progress import progress as progress_bar

SMOOTHING_SIGMA = 2.0  # pixels of the network input


@dataclass
class Saliency:
    probability: np.ndarray  # (H, W) at the image's size
    gradient_x_input: np.ndarray  # (H, W) in [0, 1]
    grad_cam: np.ndarray  # (H, W) in [0, 1]

    def share_inside(self, mask: np.ndarray, which: str = "gradient_x_input") -> float:
        """The share of a map's mass inside `mask` (NaN where the map is empty)."""
        saliency = getattr(self, which)
        total = float(saliency.sum())
        return float(saliency[mask.astype(bool)].sum() / total) if total > 0 else float("nan")


def last_decoder_conv(network: nn.Module) -> nn.Module:
    """The last convolution with a spatial kernel: the decoder's last block before the 1x1 head."""
    convolutions = [m for m in network.modules() if isinstance(m, nn.Conv2d) and max(m.kernel_size) > 1]
    if not convolutions:
        raise BadInputError("model", "has no spatial convolution to take Grad-CAM from")
    return convolutions[-1]


def _scaled(array: np.ndarray) -> np.ndarray:
    array = np.maximum(array, 0)
    top = float(array.max())
    return (array / top).astype(np.float32) if top > 0 else np.zeros_like(array, dtype=np.float32)


def _resized(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    return F.interpolate(tensor, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def saliency(predictor: Predictor, image: np.ndarray, name: str = "image") -> Saliency:
    """Gradient x input and Grad-CAM of one slice (H, W[, C]) uint8 for the tumour logit."""
    network = predictor.model
    if not isinstance(network, nn.Module):
        raise BadInputError(predictor.source, "saliency needs the torch backend, not ONNX Runtime")
    image = predictor.check_image(np.asarray(image), name)
    size = image.shape[:2]
    stacked = np.concatenate([image] * (2 * predictor.context + 1), axis=-1)  # a 2D slice as its own context
    scales = np.tile(channel_scales([image], predictor.normalisation), 2 * predictor.context + 1)
    batch = to_input(stacked, predictor.image_size, scales)[None].to(predictor.device).requires_grad_(True)
    captured: dict[str, torch.Tensor] = {}

    def keep(_module, _inputs, output):
        output.retain_grad()
        captured["activation"] = output

    handle = last_decoder_conv(network).register_forward_hook(keep)
    try:
        with torch.enable_grad():
            logits = network(batch).float()[0, 0]
            predicted = logits > torch.logit(torch.tensor(predictor.cutoff))
            # the evidence for the predicted tumour; where none is predicted, for tumour anywhere
            target = logits[predicted].sum() if predicted.any() else torch.sigmoid(logits).sum()
            target.backward()
    finally:
        handle.remove()
    gradient_x_input = (batch.grad * batch).sum(1)[0].abs().detach().cpu().numpy()
    gradient_x_input = ndimage.gaussian_filter(gradient_x_input, SMOOTHING_SIGMA)
    activation = captured["activation"]
    weights = activation.grad.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * activation).sum(1))[0].detach().cpu().numpy()
    probability = torch.sigmoid(logits).detach().cpu().numpy()
    return Saliency(_resized(probability, size), _scaled(_resized(gradient_x_input, size)),
                    _scaled(_resized(cam, size)))


def explain(model: str | Path, inputs: list[str | Path], out: str | Path, *, progress: bool = True) -> Path:
    """Write, per image, IMAGE_saliency.png (image | prediction | gradient x input | Grad-CAM) and
    explain.csv (where each map's mass lies relative to the prediction); returns the table's path."""
    out = Path(out)
    paths = [Path(p) for p in inputs]
    if not paths:
        raise BadInputError("explain", "give at least one image file")
    for path in paths:
        if not path.is_file():
            raise BadInputError(path, "does not exist or is not an image file")
        ensure_outside(out, path.parent)
    predictor = Predictor.load(model, precision="32")  # gradients in fp32
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for path in progress_bar(paths, desc="explaining", unit="image", enabled=progress):
        try:
            image = read_image(path)
            maps = saliency(predictor, image, str(path))
        except BrainsegError as error:
            rows.append({"image": str(path), "problem": str(error)})
            continue
        mask = predictor.masks(maps.probability)
        figure = out / f"{path.stem}_saliency.png"
        plots.saliency_figure(image, mask, maps.gradient_x_input, maps.grad_cam, figure, path.name)
        rows.append({"image": str(path), "figure": figure.name, "tumour_pixels": int(mask.sum()),
                     "gradient_x_input_inside": round(maps.share_inside(mask), 4),
                     "grad_cam_inside": round(maps.share_inside(mask, "grad_cam"), 4), "problem": ""})
    table = out / "explain.csv"
    with open(table, "w", newline="") as handle:
        fields = ["image", "figure", "tumour_pixels", "gradient_x_input_inside", "grad_cam_inside", "problem"]
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return table
