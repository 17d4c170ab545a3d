"""MedSAM2's input pipeline for CT, step for step as the authors' ``medsam2_infer_3D_CT.py``.

1. ``window_to_uint8``: clip to the window, min-max with the clipped volume's own extremes, x255,
   ``np.uint8`` (truncation, not rounding).
2. ``resize_rgb_512``: Pillow grey -> RGB -> 512x512 with Pillow's default bicubic filter (torch's
   bicubic differs by up to 21 grey levels, so Pillow it is).
3. ``normalise``: /255 and ImageNet mean/std in float64, with the mean and std rounded to float32
   first (the authors hold them in float32 tensors), then cast to float32 (the model's ``.float()``).
   Doing this in float32 moves 43% of the values by an ulp.
"""
from __future__ import annotations

import numpy as np

from biomedseg.errors import InputError

IMAGE_SIZE = 512
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def window_to_uint8(hu: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Grey levels 0..255 of a slice or volume of HU in the window [lo, hi].

    The scaling uses the clipped array's own min and max (as the authors do), so a volume that does
    not reach both window edges is stretched. A constant array gives zeros instead of NaN.
    """
    hu = np.asarray(hu)
    if hu.ndim not in (2, 3) or hu.size == 0:
        raise InputError(f"MedSAM2 windowing needs a 2-D slice or 3-D volume, got shape {hu.shape}.")
    if not (np.issubdtype(hu.dtype, np.integer) or np.issubdtype(hu.dtype, np.floating)):
        raise InputError(f"MedSAM2 windowing needs numeric intensities, got dtype {hu.dtype}.")
    lo, hi = float(lo), float(hi)
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise InputError(f"The CT window must be two finite values with lower < upper, got [{lo}, {hi}].")
    clipped = np.clip(hu.astype(np.float64), lo, hi)
    if not np.isfinite(clipped).all():
        raise InputError("The image has NaN values; MedSAM2 cannot window it.")
    low, high = clipped.min(), clipped.max()
    if high == low:
        return np.zeros(hu.shape, dtype=np.uint8)
    return np.uint8((clipped - low) / (high - low) * 255.0)


def resize_rgb_512(slice_u8: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """(H, W) uint8 grey slice -> (3, size, size) uint8, through Pillow (RGB, default bicubic resize)."""
    from PIL import Image

    slice_u8 = np.asarray(slice_u8)
    if slice_u8.ndim != 2 or 0 in slice_u8.shape:
        raise InputError(f"MedSAM2 resizes one 2-D slice at a time, got shape {slice_u8.shape}.")
    if slice_u8.dtype != np.uint8:
        raise InputError(f"MedSAM2 resizes uint8 grey levels (window_to_uint8 first), got dtype {slice_u8.dtype}.")
    rgb = Image.fromarray(np.ascontiguousarray(slice_u8)).convert("RGB").resize((size, size))
    return np.asarray(rgb).transpose(2, 0, 1).copy()


def normalise(u8_rgb: np.ndarray):
    """(..., 3, 512, 512) uint8 -> float32 torch tensor, normalised with float64 arithmetic."""
    import torch

    u8_rgb = np.asarray(u8_rgb)
    if u8_rgb.ndim < 3 or u8_rgb.shape[-3:] != (3, IMAGE_SIZE, IMAGE_SIZE):
        raise InputError(f"MedSAM2 frames must be (..., 3, {IMAGE_SIZE}, {IMAGE_SIZE}), got shape {u8_rgb.shape}.")
    if u8_rgb.dtype != np.uint8:
        raise InputError(f"MedSAM2 frames must be uint8 (resize_rgb_512 gives them), got dtype {u8_rgb.dtype}.")
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32).astype(np.float64)[:, None, None]
    std = np.asarray(IMAGENET_STD, dtype=np.float32).astype(np.float64)[:, None, None]
    frames = (u8_rgb.astype(np.float64) / 255.0 - mean) / std
    return torch.from_numpy(frames.astype(np.float32))


def frames_from_volume(hu: np.ndarray, lo: float, hi: float):
    """(D, H, W) HU -> (D, 3, 512, 512) float32 model input, the three steps above; one slice at a time
    through float64 so a long volume does not hold a float64 copy of itself."""
    import torch

    grey = window_to_uint8(hu, lo, hi)
    if grey.ndim != 3:
        raise InputError(f"frames_from_volume needs a (D, H, W) volume, got shape {grey.shape}.")
    out = torch.empty((grey.shape[0], 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.float32)
    for z in range(grey.shape[0]):
        out[z] = normalise(resize_rgb_512(grey[z]))
    return out
