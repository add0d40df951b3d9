"""Checks on image/mask pairs: what is broken, in which files, and whether the pair is left out."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path

import numpy as np

from brainseg.data.io import binarise_mask, count_levels, read_image, read_mask
from brainseg.errors import BadInputError


class Kind(str, Enum):
    """Problem kinds; `excludes` says whether the pair is left out of the index."""

    MISSING_MASK = "image without mask"
    MISSING_IMAGE = "mask without image"
    SIZE_MISMATCH = "image/mask size mismatch"
    MASK_LEVELS = "mask values other than two levels"
    UNREADABLE = "unreadable or truncated file"
    EMPTY_FOLDER = "empty folder"
    SLICE_GAP = "gaps in slice numbers"
    DUPLICATE_SLICE = "duplicate slice numbers"
    UNRECOGNISED = "unrecognised file name"
    ODD_CHANNELS = "channel count unlike the rest of the data set"

    @property
    def excludes(self) -> bool:
        return self not in (Kind.EMPTY_FOLDER, Kind.SLICE_GAP, Kind.UNRECOGNISED)


@dataclass(frozen=True)
class Problem:
    kind: Kind
    files: tuple[str, ...]
    detail: str = ""

    def line(self) -> str:
        names = ", ".join(self.files)
        return f"{self.kind.value}: {names}" + (f" ({self.detail})" if self.detail else "")

    def to_dict(self) -> dict:
        return {**asdict(self), "kind": self.kind.value, "files": list(self.files)}


@dataclass
class CheckReport:
    """All problems found in one data set, grouped by kind for reporting."""

    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for problem in self.problems:
            counts[problem.kind.value] = counts.get(problem.kind.value, 0) + 1
        return counts

    def excluded_images(self) -> int:
        return sum(1 for p in self.problems if p.kind.excludes)

    def lines(self, per_kind: int = 5) -> list[str]:
        """A heading per kind with its count, then up to `per_kind` examples."""
        out = []
        for kind in Kind:
            found = [p for p in self.problems if p.kind is kind]
            if not found:
                continue
            action = "left out" if kind.excludes else "kept"
            out.append(f"{kind.value}: {len(found)} ({action})")
            out.extend(f"  {p.line()}" for p in found[:per_kind])
            if len(found) > per_kind:
                out.append(f"  ... and {len(found) - per_kind} more")
        return out

    def to_dicts(self) -> list[dict]:
        return [p.to_dict() for p in self.problems]

    @classmethod
    def from_dicts(cls, rows: Iterable[dict]) -> CheckReport:
        return cls([Problem(Kind(r["kind"]), tuple(r["files"]), r.get("detail", "")) for r in rows])


@dataclass
class DecodedPair:
    image: np.ndarray  # (H, W, C) uint8
    mask: np.ndarray  # (H, W) uint8, 0 or 1


def decode_pair(image_path: Path, mask_path: Path, root: Path) -> DecodedPair | Problem:
    """Read one pair and check it; a Problem (files named relative to root) says what is wrong."""
    image_name, mask_name = relative(image_path, root), relative(mask_path, root)
    try:
        image = read_image(image_path)
    except BadInputError as error:
        return Problem(Kind.UNREADABLE, (image_name,), error.problem)
    try:
        mask = read_mask(mask_path)
    except BadInputError as error:
        return Problem(Kind.UNREADABLE, (mask_name,), error.problem)
    if image.shape[:2] != mask.shape:
        return Problem(Kind.SIZE_MISMATCH, (image_name, mask_name),
                       f"image {_size(image)}, mask {_size(mask)}")
    levels = count_levels(mask)
    if levels > 2:
        return Problem(Kind.MASK_LEVELS, (mask_name,), f"{levels} distinct values")
    if image.ndim == 2:
        image = image[..., None]
    return DecodedPair(np.ascontiguousarray(image), binarise_mask(mask))


def odd_channel_counts(channels: Sequence[int], images: Sequence[Path],
                       root: Path) -> tuple[int, list[Problem]]:
    """The usual channel count, and a problem for each image whose count differs (e.g. an RGB or RGBA
    PNG among greyscale ones): a network takes one count, so such images are left out, by name."""
    counts = Counter(int(c) for c in channels)
    usual = max(counts, key=lambda c: (counts[c], c)) if counts else 0  # a tie keeps the larger count
    return usual, [Problem(Kind.ODD_CHANNELS, (relative(Path(image), root),),
                    f"{count} channel(s) where {counts[usual]} of {len(channels)} images have {usual}")
            for count, image in zip(channels, images, strict=True) if int(count) != usual]


def relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _size(array: np.ndarray) -> str:
    return f"{array.shape[0]}x{array.shape[1]}"
