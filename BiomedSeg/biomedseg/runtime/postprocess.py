"""Mask clean-up shared by all models: threshold, largest 3D component, hole filling."""
from __future__ import annotations

import numpy as np
from scipy import ndimage


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the largest 26-connected component (empty masks stay empty)."""
    labels, n = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))
    if n <= 1:
        return mask.astype(bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill cavities not connected to the border (3D)."""
    return ndimage.binary_fill_holes(mask)


def postprocess(probabilities: np.ndarray, threshold: float = 0.5, keep_largest: bool = False,
                fill: bool = False) -> np.ndarray:
    mask = probabilities > threshold
    if keep_largest:
        mask = largest_component(mask)
    if fill:
        mask = fill_holes(mask)
    return mask
