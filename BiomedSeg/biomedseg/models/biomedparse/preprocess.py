"""Image preprocessing of BiomedParse v1 (the authors' ``process_intensity_image``), and its inverse.

Reference steps for one 2-D slice of intensities:
1. CT: clip to the site's HU window; other modalities: clip to the 0.5 / 99.5 percentiles of the
   pixels > 0.
2. Min-max scale *the clipped image's own* min and max to 0..255.
3. Pad to square with zeros, ``(long - short) // 2`` on both sides of the short axis.
4. Resize to 1024x1024 with an order-3 spline (``skimage.transform.resize(order=3, mode='constant',
   anti_aliasing=True, preserve_range=True)``; the anti-aliasing is a no-op when upsampling),
   clipped to the input range.
5. Three identical channels, ``astype(uint8)`` (truncation, not rounding).
The model then normalises with ImageNet mean/std (``BiomedParseV1.normalize``).

``resize="spline"`` reproduces step 4 exactly with ``scipy.ndimage.zoom`` (what scikit-image
calls; no scikit-image needed). ``resize="torch"`` is a faster bicubic (a=-0.75) resize for GPU
use; it is *not* the reference spline and may differ by a few grey levels.
``restore_geometry`` maps model-grid probabilities back onto the original slice (the authors
never un-pad; the engine must).
"""
from __future__ import annotations

import numpy as np

MODEL_SIZE = 1024
CT_WINDOWS = {
    "abdomen": (-150, 250),
    "lung": (-1000, 1000),
    "pelvis": (-55, 200),
    "liver": (-25, 230),
    "colon": (-68, 187),
    "pancreas": (-100, 200),
}
RESIZE_MODES = ("spline", "torch")


def intensity_bounds(image: np.ndarray, is_ct: bool, site: str | None = None) -> tuple[float, float]:
    """CT window of ``site`` or the (0.5, 99.5) percentiles of the positive pixels."""
    if is_ct:
        if site not in CT_WINDOWS:
            raise ValueError(f"CT site must be one of {sorted(CT_WINDOWS)}, not {site!r}")
        return CT_WINDOWS[site]
    positive = image[image > 0]
    if positive.size == 0:
        return 0.0, 0.0
    return np.percentile(positive, 0.5), np.percentile(positive, 99.5)


def scale_to_255(image: np.ndarray, lower: float, upper: float) -> np.ndarray:
    """Clip, then min-max of the clipped image to 0..255 (float64). A constant image gives zeros."""
    clipped = np.clip(image, lower, upper)
    lo, hi = clipped.min(), clipped.max()
    if hi == lo:  # the reference divides by zero here (NaN); a blank slice is the sane answer
        return np.zeros_like(clipped, dtype=np.float64)
    return (clipped - lo) / (hi - lo) * 255.0


def square_padding(shape: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """((top, bottom), (left, right)) zero padding of the reference (equal on both sides, floor)."""
    h, w = shape
    if h > w:
        p = (h - w) // 2
        return (0, 0), (p, p)
    if w > h:
        p = (w - h) // 2
        return (p, p), (0, 0)
    return (0, 0), (0, 0)


def pad_to_square(image: np.ndarray) -> np.ndarray:
    pad = square_padding(image.shape[:2])
    if pad == ((0, 0), (0, 0)):
        return image
    return np.pad(image, pad + ((0, 0),) * (image.ndim - 2), "constant", constant_values=0)


def resize_spline(image: np.ndarray, size: int = MODEL_SIZE) -> np.ndarray:
    """Order-3 spline resize exactly as ``skimage.transform.resize(order=3, mode='constant', preserve_range=True,
    anti_aliasing=True)``: Gaussian pre-filter (sigma = (factor - 1) / 2, only when downsampling), zoom, clip."""
    from scipy import ndimage

    image = np.asarray(image, dtype=np.float64)
    factors = np.divide(image.shape, (size, size))
    sigma = np.maximum(0, (factors - 1) / 2)
    filtered = ndimage.gaussian_filter(image, sigma, cval=0.0, mode="grid-constant") if np.any(sigma > 0) else image
    out = ndimage.zoom(filtered, [1 / f for f in factors], order=3, mode="grid-constant", cval=0.0, grid_mode=True)
    lo, hi = image.min(), image.max()
    if not (lo <= 0.0 <= hi) and out.min() <= 0.0 <= out.max():
        lo, hi = min(lo, 0.0), max(hi, 0.0)
    return np.clip(out, lo, hi, out=out)


def resize_torch(image: np.ndarray, size: int = MODEL_SIZE, device="cpu") -> np.ndarray:
    """Bicubic (a=-0.75) resize with torch, clipped to the input range. Fast on GPU; NOT the reference spline
    (a few grey levels apart inside the image). Upsampling samples with zeros outside the image, like the
    reference's constant mode; downsampling uses antialiased ``interpolate``."""
    import torch
    import torch.nn.functional as F

    x = torch.as_tensor(np.asarray(image, dtype=np.float32), device=device)[None, None]
    if size < max(image.shape):
        y = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    else:
        centres = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size * 2 - 1
        gy, gx = torch.meshgrid(centres, centres, indexing="ij")
        grid = torch.stack((gx, gy), dim=-1)[None]
        y = F.grid_sample(x, grid, mode="bicubic", padding_mode="zeros", align_corners=False)
    return y.clamp(float(image.min()), float(image.max()))[0, 0].double().cpu().numpy()


def process_intensity_image(image: np.ndarray, is_ct: bool, site: str | None = None,
                            resize: str = "spline") -> np.ndarray:
    """One 2-D slice (HU for CT) -> uint8 RGB [1024, 1024, 3] model image."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}")
    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D slice, got shape {image.shape}")
    scaled = pad_to_square(scale_to_255(image, *intensity_bounds(image, is_ct, site)))
    resized = resize_spline(scaled) if resize == "spline" else resize_torch(scaled)
    return np.stack([resized] * 3, axis=-1).astype(np.uint8)


def read_dicom_hu(path) -> np.ndarray:
    """Pixel data * RescaleSlope + RescaleIntercept as float64 (the reference's ``read_dicom``)."""
    import pydicom

    ds = pydicom.dcmread(path)
    slope = float(getattr(ds, "RescaleSlope", 1.0))
    intercept = float(getattr(ds, "RescaleIntercept", 0.0))
    return ds.pixel_array.astype(np.float64) * slope + intercept


def restore_geometry(probs, original_shape: tuple[int, int]):
    """Model-grid probabilities [P, 1024, 1024] (torch) -> [P, H, W] on the original slice: resize to the
    padded square's size (bilinear), then remove the padding that ``pad_to_square`` added."""
    import torch.nn.functional as F

    h, w = original_shape
    (top, bottom), (left, right) = square_padding((h, w))
    ph, pw = h + top + bottom, w + left + right
    out = F.interpolate(probs[None].float(), size=(ph, pw), mode="bilinear", align_corners=False)[0]
    return out[:, top:top + h, left:left + w]
