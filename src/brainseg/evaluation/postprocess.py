"""Post-processing of binary masks by connected component: keep the largest 3D component, drop small
components, or drop components that are small next to the largest (which keeps every part of a
multifocal tumour that keeping the largest alone would drop)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from brainseg.errors import OptionError


def components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels of the connected components (0 is background) and the size of each label (sizes[0] = 0)."""
    # Full connectivity (26 in 3D, 8 in 2D): touching corners belong to one lesion.
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    labels, count = ndimage.label(mask.astype(bool), structure=structure)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    sizes[0] = 0
    return labels, sizes


def check_min_fraction(value: float) -> float:
    """`value` if it is a share of the largest component (0..1), else a one-line error."""
    if not 0 <= value <= 1:
        raise OptionError(f"--min-fraction: must be between 0 and 1, not {value:g}")
    return value


def check_min_size(value: int) -> int:
    """`value` if it is a component size in voxels (0: keep all), else a one-line error."""
    if not value >= 0:
        raise OptionError(f"--min-size: must be 0 or more voxels, not {value}")
    return value


def kept_components(sizes: np.ndarray, *, largest: bool = False, min_size: int = 0,
                    min_fraction: float = 0.0) -> np.ndarray:
    """Which labels survive, one boolean per label: first those of at least `min_size` voxels, then
    those of at least `min_fraction` of the largest survivor, then (with `largest`) the largest only."""
    keep = sizes > 0
    if min_size > 0:
        keep &= sizes >= min_size
    if keep.any() and min_fraction > 0:
        keep &= sizes >= min_fraction * sizes[keep].max()
    if keep.any() and largest:
        largest_label = int(np.argmax(np.where(keep, sizes, -1)))  # the first of equally large ones
        keep = np.zeros_like(keep)
        keep[largest_label] = True
    return keep


def postprocess(mask: np.ndarray, *, largest: bool = False, min_size: int = 0,
                min_fraction: float = 0.0) -> np.ndarray:
    if not (largest or min_size > 0 or min_fraction > 0):
        return mask.astype(bool)
    labels, sizes = components(mask)
    return kept_components(sizes, largest=largest, min_size=min_size, min_fraction=min_fraction)[labels]


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Only the largest connected component of a 2D slice or 3D volume (stacked slices)."""
    return postprocess(mask, largest=True)


def remove_small_components(mask: np.ndarray, min_size: int) -> np.ndarray:
    """Drop connected components with fewer than `min_size` pixels (voxels for a volume)."""
    return postprocess(mask, min_size=min_size)


def remove_minor_components(mask: np.ndarray, min_fraction: float) -> np.ndarray:
    """Drop connected components smaller than `min_fraction` times the largest one (0: keep all)."""
    return postprocess(mask, min_fraction=min_fraction)
