"""Reading slice images and masks from TIFF, PNG, JPEG and BMP files; the LGG channel layout; the
decoded-size limits that every reader checks from a file's header before decoding it (images, NIfTI
volumes, zip archives), so that a small file declaring a huge size never reaches memory."""

from __future__ import annotations

import lzma
import math
import warnings
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import nibabel as nib
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


# Sized for real scans: a slice of up to 4096 x 4096 pixels, a volume of up to 512 slices and 512^3 voxels.
MAX_SLICE_PIXELS = 4096 * 4096
MAX_SLICES = 512
MAX_VOXELS = 512 ** 3
MAX_CHANNELS = 4
ZIP_COMPRESSIONS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate",
                    zipfile.ZIP_BZIP2: "bzip2", zipfile.ZIP_LZMA: "lzma"}
_CHUNK = 1 << 20
# Pillow warns of images over 89 million pixels when it opens them; ours refuse far fewer, so the
# warning would only repeat (in the server's log) what the one-line refusal says.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


@dataclass(frozen=True)
class SizeLimits:
    """The most a file may decode to: pixels in one slice, slices in a volume, voxels in a volume."""

    slice_pixels: int = MAX_SLICE_PIXELS
    slices: int = MAX_SLICES
    voxels: int = MAX_VOXELS


DEFAULT_LIMITS = SizeLimits()


class TooLargeError(BadInputError):
    """Decoded, the file would pass a size limit; told from its header, before decoding."""


class VolumeShapeError(BadInputError):
    """A volume that cannot be assembled: no slices, or slices of different sizes."""


def check_slice_size(path: str | Path, width: int, height: int, limits: SizeLimits = DEFAULT_LIMITS) -> None:
    if width * height > limits.slice_pixels:
        raise TooLargeError(path, f"{width}x{height} pixels is more than the limit of "
                                  f"{limits.slice_pixels:,} pixels per slice ({_side(limits.slice_pixels)})")
    if width * height == 0:
        raise VolumeShapeError(path, f"is {width}x{height} pixels: an image with no pixels")


def _side(pixels: int) -> str:
    side = math.isqrt(pixels)
    return f"{side}x{side}" if side * side == pixels else f"{pixels:,} pixels"


@contextmanager
def decoding(path: Path, limits: SizeLimits):
    """Turn what a decoder raises into one-line errors naming `path`: Pillow's bomb guard into
    TooLargeError, anything else into 'unreadable or truncated image'."""
    try:
        yield
    except BadInputError:
        raise
    except Image.DecompressionBombError:
        raise TooLargeError(path, f"more than the limit of {limits.slice_pixels:,} pixels per slice "
                                  f"({_side(limits.slice_pixels)})") from None
    except Exception as error:  # every decoder raises its own types for corrupt data
        raise BadInputError(path, f"unreadable or truncated image ({_reason(error)})") from None


def image_header(path: str | Path, limits: SizeLimits = DEFAULT_LIMITS) -> tuple[int, int]:
    """(width, height) of an image read from its header only; refuses (TooLargeError) one whose decoded
    pixels would pass `limits`, and a file that is not an image it can read (BadInputError)."""
    path = Path(path)
    with decoding(path, limits):
        if path.suffix.lower() in TIFF_SUFFIXES:
            with tifffile.TiffFile(path) as tif:
                return _tiff_size(path, tif, limits)
        with Image.open(path) as image:
            width, height = image.size
            bands = len(image.getbands())
    check_slice_size(path, width, height, limits)
    if bands > MAX_CHANNELS:
        raise BadInputError(path, f"has {bands} channels; expected 1, 3 or 4")
    return width, height


def _tiff_size(path: Path, tif: tifffile.TiffFile, limits: SizeLimits) -> tuple[int, int]:
    if not tif.series:
        raise BadInputError(path, "unreadable or truncated image (a TIFF with no image)")
    page = tif.series[0].keyframe
    width, height = int(page.imagewidth), int(page.imagelength)
    check_slice_size(path, width, height, limits)
    values = math.prod(tif.series[0].shape)
    if values > width * height * MAX_CHANNELS:
        raise TooLargeError(path, f"holds {values // max(width * height, 1):,} planes of {width}x{height} "
                                  f"pixels; expected one slice of up to {MAX_CHANNELS} channels")
    return width, height


def nifti_header(path: str | Path, axis: int, limits: SizeLimits = DEFAULT_LIMITS):
    """A NIfTI image, its header read and checked but its voxels not yet decoded: refuses a volume whose
    slices along `axis` or whose voxels would pass `limits` (TooLargeError), one with no slices
    (VolumeShapeError) and data types that are not numbers."""
    path = Path(path)
    try:
        volume = nib.load(str(path))
        shape = tuple(int(n) for n in volume.header.get_data_shape())
        dtype = np.dtype(volume.header.get_data_dtype())
    except Exception as error:  # nibabel raises many types for corrupt files
        raise BadInputError(path, f"unreadable NIfTI ({type(error).__name__})") from None
    if len(shape) < 3 or len(shape) > 4:
        raise BadInputError(path, f"expected a 3D volume (or 4D with channels last), got shape {shape}")
    if 0 in shape:
        raise VolumeShapeError(path, f"has no slices (its shape is {shape})")
    if dtype.kind not in "biuf":
        raise BadInputError(path, f"unsupported NIfTI data type {dtype}; expected integers or floats")
    if len(shape) == 4 and shape[3] > MAX_CHANNELS:
        raise TooLargeError(path, f"has {shape[3]} volumes in its 4th dimension; expected up to "
                                  f"{MAX_CHANNELS} channels")
    if 0 <= axis <= 2:
        plane = [n for i, n in enumerate(shape[:3]) if i != axis]
        check_slice_size(path, plane[1], plane[0], limits)
        if shape[axis] > limits.slices:
            raise TooLargeError(path, f"{shape[axis]} slices along axis {axis}; the limit is {limits.slices}")
    voxels = math.prod(shape)
    if voxels > limits.voxels:
        raise TooLargeError(path, f"shape {shape} is {voxels:,} voxels; the limit is {limits.voxels:,}")
    return volume


def extract_zip(source: BinaryIO, folder: Path, *, max_files: int, max_bytes: int,
                name: str = "zip") -> list[Path]:
    """Unpack the files of a zip archive into `folder` under their base names (a member's path never
    becomes one; a name already taken gets the member's number in front), skipping hidden files and
    __MACOSX. Refused with a one-line BadInputError naming the
    member: too many files, unsafe paths, encryption, unknown compression, a bad CRC or lying sizes;
    more than `max_bytes` in all, by the declared sizes or while unpacking in chunks, is a TooLargeError.
    Messages name members, never `folder`."""
    try:
        archive = zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        raise BadInputError(name, "not a valid zip file") from None
    with archive:
        members = [m for m in archive.infolist() if not m.is_dir()]
        if len(members) > max_files:
            raise BadInputError(name, f"zip holds {len(members)} files; the limit is {max_files}")
        declared = sum(m.file_size for m in members)
        if declared > max_bytes:
            raise TooLargeError(name, f"zip would unpack to {declared / 2**20:.0f} MB; the limit is "
                                      f"{max_bytes / 2**20:g} MB")
        written, paths = 0, []
        for member in members:
            base = _member_base(name, member)
            if base is None:
                continue
            target = folder / base
            number = len(paths)
            while target.exists():  # the same name in two of the zip's folders (IM0001 of two series)
                target, number = folder / f"{number}_{base}", number + 1
            written += _extract_member(archive, member, target, max_bytes - written, name)
            paths.append(target)
    return paths


def _member_base(name: str, member: zipfile.ZipInfo) -> str | None:
    parts = PurePosixPath(member.filename.replace("\\", "/")).parts
    if member.filename.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
        raise BadInputError(name, f"zip member {member.filename!r} has an unsafe path")
    base = parts[-1] if parts else ""
    if not base or base.startswith(".") or "__MACOSX" in parts:
        return None
    if member.flag_bits & 0x1:
        raise BadInputError(name, f"zip member {member.filename!r} is encrypted")
    if member.compress_type not in ZIP_COMPRESSIONS:
        raise BadInputError(name, f"zip member {member.filename!r} uses compression method "
                                  f"{member.compress_type}, which is not supported (use deflate)")
    return base


def _extract_member(archive: zipfile.ZipFile, member: zipfile.ZipInfo, target: Path, room: int,
                    name: str) -> int:
    """Unpack one member in chunks, stopping as soon as it passes `room` bytes or its declared size."""
    count = 0
    try:
        with archive.open(member) as stream, target.open("wb") as out:
            while chunk := stream.read(_CHUNK):
                count += len(chunk)
                if count > room:
                    raise TooLargeError(name, "zip unpacks to more than the limit")
                if count > member.file_size:
                    raise BadInputError(name, f"zip member {member.filename!r} is larger than it declares")
                out.write(chunk)
    except BadInputError:
        raise
    except (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError, RuntimeError, zlib.error,
            lzma.LZMAError) as error:  # a bad CRC, a truncated or corrupt stream, a password wanted
        raise BadInputError(name, f"zip member {member.filename!r} is damaged ({_reason(error)})") from None
    if count != member.file_size:
        raise BadInputError(name, f"zip member {member.filename!r} is {count} bytes, not the "
                                  f"{member.file_size} it declares")
    return count


def equal_channel_text(images) -> str:
    """The pairs of :func:`equal_channel_pairs` as one table cell, e.g. "0=1 0=2 1=2" ("" if none)."""
    return " ".join(equal_channel_pairs(images))


def equal_channel_pairs(images) -> list[str]:
    """Channel pairs ("a=b") equal in every one of these (H, W, C) images; [] for single-channel images."""
    channels = images[0].shape[-1] if len(images) and images[0].ndim == 3 else 1
    return [f"{a}={b}" for a in range(channels) for b in range(a + 1, channels)
            if all(np.array_equal(image[..., a], image[..., b]) for image in images)]


def read_image(path: str | Path, limits: SizeLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Decode an image as uint8, (H, W) for greyscale or (H, W, C) for colour.

    16-bit images are scaled to 0..255 by their maximum; an alpha channel is dropped.
    Raises BadInputError naming the file when it cannot be decoded completely, and TooLargeError, before
    decoding, when its header declares more pixels than `limits` allows.
    """
    path = Path(path)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise BadInputError(path, f"unsupported file type {path.suffix or '(none)'!r}")
    with decoding(path, limits):
        reader = _read_tiff if path.suffix.lower() in TIFF_SUFFIXES else _read_pillow
        array = reader(path, limits)
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


def _read_tiff(path: Path, limits: SizeLimits) -> np.ndarray:
    with tifffile.TiffFile(path) as tif:
        _tiff_size(path, tif, limits)  # from the header, before decoding
        return tif.asarray()


def _read_pillow(path: Path, limits: SizeLimits) -> np.ndarray:
    with Image.open(path) as image:
        check_slice_size(path, *image.size, limits)  # from the header, before decoding
        if len(image.getbands()) > MAX_CHANNELS:
            raise BadInputError(path, f"has {len(image.getbands())} channels; expected 1, 3 or 4")
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
