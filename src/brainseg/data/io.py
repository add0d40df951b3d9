"""Reading slice images and masks from TIFF, PNG, JPEG and BMP files; the LGG channel layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from brainseg.errors import BadInputError

TIFF_SUFFIXES = frozenset({".tif", ".tiff"})
IMAGE_SUFFIXES = TIFF_SUFFIXES | {".png", ".jpg", ".jpeg", ".bmp"}

# kaggle_3m slices hold (pre-contrast, FLAIR, post-contrast). Where a patient lacked a sequence, FLAIR
# was copied into its place; these are the channels so overwritten, by pattern.
FLAIR_CHANNEL = 1
MISSING_SEQUENCES = {"post": (2,), "pre+post": (0, 2)}


def equal_channel_text(images) -> str:
    """The pairs of :func:`equal_channel_pairs` as one table cell, e.g. "0=1 0=2 1=2" ("" if none)."""
    return " ".join(equal_channel_pairs(images))


def equal_channel_pairs(images) -> list[str]:
    """Channel pairs ("a=b") equal in every one of these (H, W, C) images; [] for single-channel images."""
    channels = images[0].shape[-1] if len(images) and images[0].ndim == 3 else 1
    return [f"{a}={b}" for a in range(channels) for b in range(a + 1, channels)
            if all(np.array_equal(image[..., a], image[..., b]) for image in images)]


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image as uint8, (H, W) for greyscale or (H, W, C) for colour.

    16-bit images are scaled to 0..255 by their maximum; an alpha channel is dropped.
    Raises BadInputError naming the file when it cannot be decoded completely.
    """
    path = Path(path)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise BadInputError(path, f"unsupported file type {path.suffix or '(none)'!r}")
    try:
        array = _read_tiff(path) if path.suffix.lower() in TIFF_SUFFIXES else _read_pillow(path)
    except BadInputError:
        raise
    except Exception as error:  # every decoder raises its own types for corrupt data
        raise BadInputError(path, f"unreadable or truncated image ({_reason(error)})") from None
    return _to_uint8(path, array)


def read_mask(path: str | Path) -> np.ndarray:
    """Decode a mask as a 2D uint8 array of its stored values (not yet binarised)."""
    array = read_image(path)
    if array.ndim == 3:
        if not (array == array[..., :1]).all():
            raise BadInputError(path, "mask has colour channels that differ; expected one channel")
        array = array[..., 0]
    return array


def binarise_mask(mask: np.ndarray) -> np.ndarray:
    """Foreground is the upper of a mask's two levels (255 in 0/255 masks, 1 in 0/1 masks)."""
    top = mask.max(initial=0)
    if top == 0:
        return np.zeros(mask.shape, np.uint8)
    return (mask == top).astype(np.uint8)


def count_levels(mask: np.ndarray) -> int:
    """Number of distinct values in a uint8 mask."""
    return int(np.count_nonzero(np.bincount(mask.ravel(), minlength=256)))


def _read_tiff(path: Path) -> np.ndarray:
    return tifffile.imread(path)


def _read_pillow(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        image.load()  # forces full decoding so truncated files fail here
        if image.mode in ("P", "PA", "LA", "1"):
            image = image.convert("RGB" if image.mode.startswith("P") else "L")
        if image.mode == "RGBA":
            image = image.convert("RGB")
        return np.asarray(image)


def _to_uint8(path: Path, array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[-1] == 4:
        array = array[..., :3]
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] != 3):
        raise BadInputError(path, f"unsupported image shape {array.shape}; expected HxW or HxWx3")
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating):
        top = float(array.max(initial=0))
        if top <= 0:
            return np.zeros(array.shape, np.uint8)
        if np.issubdtype(array.dtype, np.integer) and top <= 255:
            return array.astype(np.uint8)
        return np.clip(array.astype(np.float32) * (255.0 / top), 0, 255).round().astype(np.uint8)
    raise BadInputError(path, f"unsupported pixel type {array.dtype}")


def _reason(error: Exception) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text[:120]
