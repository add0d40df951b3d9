"""Post-processing of binary masks: keep the largest 3D component, drop small components, or drop
components that are small next to the largest (which keeps every part of a multifocal tumour)."""

from __future__ import annotations

import numpy as np


def _label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    from scipy import ndimage

    # Full connectivity (26 in 3D, 8 in 2D): touching corners belong to one lesion.
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    return ndimage.label(mask, structure=structure)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Only the largest connected component of a 2D slice or 3D volume (stacked slices)."""
    labels, count = _label(mask.astype(bool))
    if count <= 1:
        return mask.astype(bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(sizes.argmax())


def remove_small_components(mask: np.ndarray, min_size: int) -> np.ndarray:
    """Drop connected components with fewer than `min_size` pixels (voxels for a volume)."""
    if min_size <= 0:
        return mask.astype(bool)
    labels, count = _label(mask.astype(bool))
    if count == 0:
        return mask.astype(bool)
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_size
    keep[0] = False
    return keep[labels]


def remove_minor_components(mask: np.ndarray, min_fraction: float) -> np.ndarray:
    """Drop connected components smaller than `min_fraction` times the largest one (0: keep all)."""
    if min_fraction <= 0:
        return mask.astype(bool)
    labels, count = _label(mask.astype(bool))
    if count <= 1:
        return mask.astype(bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    keep = sizes >= min_fraction * sizes.max()
    keep[0] = False
    return keep[labels]


def postprocess(mask: np.ndarray, *, largest: bool = False, min_size: int = 0,
                min_fraction: float = 0.0) -> np.ndarray:
    if min_size:
        mask = remove_small_components(mask, min_size)
    if min_fraction:
        mask = remove_minor_components(mask, min_fraction)
    if largest:
        mask = largest_component(mask)
    return mask.astype(bool)
