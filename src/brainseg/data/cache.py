"""On-disk cache of decoded slices: one flat uint8 file for images and one for masks.

The cache lives outside the data folder (``$BRAINSEG_CACHE`` or ``~/.cache/brainseg``), is
memory-mapped on reading, and is keyed by a fingerprint of every source file's name, size and
modification time, so that any change to the data set rebuilds it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np

CACHE_FORMAT = 1
_OFFSET_COLUMNS = 5  # image offset, height, width, channels, mask offset


def cache_root() -> Path:
    return Path(os.environ.get("BRAINSEG_CACHE") or Path.home() / ".cache" / "brainseg")


def cache_dir_for(root: Path, layout: str) -> Path:
    key = hashlib.sha1(f"{root.resolve()}|{layout}".encode()).hexdigest()[:16]
    return cache_root() / f"{root.resolve().name}-{key}"


def fingerprint(files: Iterable[tuple[str, int, int]]) -> str:
    """Digest of (relative path, size, mtime_ns) triples, order-independent."""
    digest = hashlib.sha256(f"brainseg-cache/{CACHE_FORMAT}".encode())
    for name, size, mtime in sorted(files):
        digest.update(f"{name}\0{size}\0{mtime}\n".encode())
    return digest.hexdigest()


class SliceStore:
    """Decoded images (H, W, C) and binary masks (H, W) looked up by image path."""

    def __init__(self, images: np.ndarray, masks: np.ndarray, offsets: np.ndarray,
                 keys: list[str]) -> None:
        self._images, self._masks, self._offsets = images, masks, offsets
        self.keys = keys
        self._position = {key: i for i, key in enumerate(keys)}

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: object) -> bool:
        return key in self._position

    def position(self, key: str) -> int:
        return self._position[str(key)]

    def image(self, key: str | int) -> np.ndarray:
        image_at, height, width, channels, _ = self._row(key)
        size = height * width * channels
        return self._images[image_at:image_at + size].reshape(height, width, channels)

    def mask(self, key: str | int) -> np.ndarray:
        _, height, width, _, mask_at = self._row(key)
        return self._masks[mask_at:mask_at + height * width].reshape(height, width)

    def stacked(self) -> tuple[np.ndarray, np.ndarray] | None:
        """All images as (N, H, W, C) and masks as (N, H, W) when every slice has one shape."""
        shapes = {tuple(row) for row in self._offsets[:, 1:4]}
        if len(shapes) != 1 or not self.keys:
            return None
        height, width, channels = shapes.pop()
        n = len(self.keys)
        return (self._images[: n * height * width * channels].reshape(n, height, width, channels),
                self._masks[: n * height * width].reshape(n, height, width))

    def _row(self, key: str | int) -> np.ndarray:
        index = key if isinstance(key, (int, np.integer)) else self._position[str(key)]
        return self._offsets[index]


class StoreWriter:
    """Appends decoded pairs to a new cache folder, then moves it into place atomically."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self._offsets: list[tuple[int, int, int, int, int]] = []
        self._image_at = self._mask_at = 0
        if directory is None:  # in memory
            self._image_parts: list[np.ndarray] = []
            self._mask_parts: list[np.ndarray] = []
        else:
            self.staging = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging.mkdir(parents=True)
            self._image_file = open(self.staging / "images.u8", "wb")  # noqa: SIM115
            self._mask_file = open(self.staging / "masks.u8", "wb")  # noqa: SIM115

    def add(self, image: np.ndarray, mask: np.ndarray) -> None:
        height, width, channels = image.shape
        self._offsets.append((self._image_at, height, width, channels, self._mask_at))
        self._image_at += image.size
        self._mask_at += mask.size
        if self.directory is None:
            self._image_parts.append(image.ravel())
            self._mask_parts.append(mask.ravel())
        else:
            self._image_file.write(np.ascontiguousarray(image).tobytes())
            self._mask_file.write(np.ascontiguousarray(mask).tobytes())

    def finish(self, keys: list[str], metadata: dict) -> SliceStore:
        offsets = np.asarray(self._offsets, np.int64).reshape(-1, _OFFSET_COLUMNS)
        if self.directory is None:
            empty = np.zeros(0, np.uint8)
            images = np.concatenate(self._image_parts) if self._image_parts else empty
            masks = np.concatenate(self._mask_parts) if self._mask_parts else empty
            return SliceStore(images, masks, offsets, keys)
        self._image_file.close()
        self._mask_file.close()
        np.save(self.staging / "offsets.npy", offsets)
        manifest = {"format": CACHE_FORMAT, "keys": keys, **metadata}
        (self.staging / "manifest.json").write_text(json.dumps(manifest))
        # Mapped before the move: a process writing the same cache at the same time may replace or
        # delete the folder, but mapped files stay readable until this store is closed.
        store = open_store(self.staging)
        stale = self.directory.with_name(f"{self.directory.name}.old-{os.getpid()}")
        shutil.rmtree(stale, ignore_errors=True)  # left by a crashed process that had our pid
        with contextlib.suppress(FileNotFoundError):
            os.replace(self.directory, stale)
        try:
            os.replace(self.staging, self.directory)
        except OSError:  # another process put its copy in place in between; it holds the same slices
            shutil.rmtree(self.staging, ignore_errors=True)
        shutil.rmtree(stale, ignore_errors=True)
        return store

    def abort(self) -> None:
        if self.directory is not None:
            self._image_file.close()
            self._mask_file.close()
            shutil.rmtree(self.staging, ignore_errors=True)


def read_manifest(directory: Path) -> dict | None:
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    valid = isinstance(manifest, dict) and isinstance(manifest.get("keys"), list)
    return manifest if valid and manifest.get("format") == CACHE_FORMAT else None


class DamagedCacheError(ValueError):
    """A cache folder whose files do not fit together (cut short, edited, or half deleted)."""


def open_store(directory: Path) -> SliceStore:
    """Map a cache folder, checking that its files agree, so that a damaged cache is rebuilt rather
    than read as garbage."""
    manifest = read_manifest(directory)
    if manifest is None:
        raise FileNotFoundError(f"{directory}: no valid slice cache")
    keys = manifest["keys"]
    try:
        offsets = np.load(directory / "offsets.npy", allow_pickle=False)
    except (OSError, ValueError) as error:
        raise DamagedCacheError(f"{directory}: unreadable offsets ({error})") from None
    if offsets.dtype != np.int64 or offsets.shape != (len(keys), _OFFSET_COLUMNS):
        raise DamagedCacheError(f"{directory}: offsets of shape {offsets.shape} for {len(keys)} slices")
    images, masks = _memmap(directory / "images.u8"), _memmap(directory / "masks.u8")
    pixels = offsets[:, 1] * offsets[:, 2]
    if images.size != int((pixels * offsets[:, 3]).sum()) or masks.size != int(pixels.sum()):
        raise DamagedCacheError(f"{directory}: image or mask file does not match its offsets")
    return SliceStore(images, masks, offsets, keys)


def _memmap(path: Path) -> np.ndarray:
    if path.stat().st_size == 0:
        return np.zeros(0, np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r")
