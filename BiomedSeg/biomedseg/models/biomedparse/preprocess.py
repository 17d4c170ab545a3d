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

The engine runs these steps on the slices of a volume (a CT window or percentiles, grey or
colour) in one of two ways, and ``process_intensity_image`` goes through the same two:
``prepare_exact`` (one slice at a time; step 4 exactly, with ``scipy.ndimage.zoom`` as
scikit-image calls it, no scikit-image needed; the CPU default) and ``prepare_torch`` (a batch
on the device with the same anti-aliasing and a bicubic (a=-0.75) resize instead of the
spline; much faster on a GPU, a few grey levels apart; the GPU default).
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


def process_intensity_image(image: np.ndarray, is_ct: bool, site: str | None = None,
                            resize: str = "spline") -> np.ndarray:
    """One 2-D slice (HU for CT) -> uint8 RGB [1024, 1024, 3] model image, through the engine's own
    ``prepare_exact`` (``resize="spline"``, the reference) or ``prepare_torch`` (``"torch"``, on the CPU)."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}")
    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D slice, got shape {image.shape}")
    window = intensity_bounds(image, is_ct, site) if is_ct else None
    if resize == "spline":
        return prepare_exact(image, MODEL_SIZE, window=window)
    return prepare_torch(image[None], MODEL_SIZE, window=window)[0].permute(1, 2, 0).numpy()


def resize_to_model(image_rgb: np.ndarray, size: int = MODEL_SIZE) -> np.ndarray:
    """Bicubic (PIL) resize of a uint8 RGB image to size x size, as the reference's torchvision ``Resize``
    for images given directly as RGB; a no-op at that size."""
    if image_rgb.shape[:2] == (size, size):
        return image_rgb
    from PIL import Image

    return np.asarray(Image.fromarray(image_rgb).resize((size, size), Image.BICUBIC))


# ---- the engine's slices: exact (one slice, numpy) and batched (torch, on the device) ---------------
def prepare_exact(image: np.ndarray, size: int = MODEL_SIZE, window: tuple | None = None,
                  rgb: bool = False) -> np.ndarray:
    """One slice -> uint8 [S, S, 3] with the reference's numpy/scipy steps.

    ``window``: the CT window (HU), or None for the 0.5 / 99.5 percentiles of the positive pixels.
    Grey slices with one or two channels are averaged. ``rgb``: a colour slice (first three channels);
    min-max scaled to 0..255 unless already 8-bit, then padded and spline-resized per channel."""
    if rgb:
        colour = np.asarray(image[..., :3])
        if colour.dtype != np.uint8:
            colour = scale_to_255(colour.astype(np.float64), float(colour.min()), float(colour.max()))
        padded = pad_to_square(colour.astype(np.float64))
        return np.stack([resize_spline(padded[..., c], size) for c in range(3)], axis=-1).astype(np.uint8)
    image = np.asarray(image, dtype=np.float64)
    if image.ndim == 3:
        image = image.mean(axis=-1)
    lo, hi = window if window is not None else intensity_bounds(image, is_ct=False)
    resized = resize_spline(pad_to_square(scale_to_255(image, lo, hi)), size)
    return np.repeat(resized[..., None], 3, axis=-1).astype(np.uint8)  # three channels, truncated


def prepare_torch(slices: np.ndarray, size: int = MODEL_SIZE, window: tuple | None = None, rgb: bool = False,
                  device="cpu"):
    """A batch (B, rows, cols[, C]) -> uint8 [B, 3, S, S] on ``device``: ``prepare_exact``'s steps in torch, with
    a bicubic resize (zeros outside the image) after the same Gaussian anti-aliasing instead of the spline.
    Much faster on a GPU; a few grey levels from the exact path."""
    import torch
    import torch.nn.functional as F

    x = torch.as_tensor(np.ascontiguousarray(slices), device=device).float()
    b = x.shape[0]
    if rgb:
        x = x[..., :3].permute(0, 3, 1, 2)
        if slices.dtype != np.uint8:
            x = _min_max_255(x, dims=(1, 2, 3))
    else:
        if x.dim() == 4:
            x = x.mean(dim=-1)
        if window is not None:
            lo = torch.full((b, 1, 1), float(window[0]), device=x.device)
            hi = torch.full((b, 1, 1), float(window[1]), device=x.device)
        else:
            bounds = [percentiles(s[s > 0]) for s in x]
            lo = torch.stack([v[0] for v in bounds]).view(b, 1, 1)
            hi = torch.stack([v[1] for v in bounds]).view(b, 1, 1)
        x = _min_max_255(torch.maximum(torch.minimum(x, hi), lo), dims=(1, 2))[:, None]
    (top, bottom), (left, right) = square_padding(tuple(x.shape[-2:]))
    x = F.pad(x, (left, right, top, bottom))
    top_value = x.amax(dim=(1, 2, 3), keepdim=True)
    x = gaussian_prefilter(x, size)
    # bicubic samples at the output pixel centres, zeros outside the image (the reference's constant mode)
    centres = (torch.arange(size, device=x.device, dtype=torch.float32) + 0.5) / size * 2 - 1
    gy, gx = torch.meshgrid(centres, centres, indexing="ij")
    grid = torch.stack((gx, gy), dim=-1)[None].expand(x.shape[0], -1, -1, -1)
    y = F.grid_sample(x, grid, mode="bicubic", padding_mode="zeros", align_corners=False)
    y = torch.minimum(y.clamp_min(0.0), top_value).floor().to(torch.uint8)
    return y.expand(-1, 3, -1, -1) if y.shape[1] == 1 else y


def _min_max_255(x, dims):
    """``scale_to_255`` after clipping, per image in torch: own min and max to 0..255, zeros when constant."""
    import torch

    lo = x.amin(dim=dims, keepdim=True)
    span = x.amax(dim=dims, keepdim=True) - lo
    return torch.where(span > 0, (x - lo) / span.clamp_min(1e-30) * 255.0, torch.zeros_like(x))


def gaussian_prefilter(x, size: int):
    """The reference's anti-aliasing before downsampling [B, C, H, W] to size x size: a Gaussian of sigma
    (factor - 1) / 2 per axis, zeros outside the image, truncated at 4 sigma (as scipy); a no-op when upsampling."""
    import torch
    import torch.nn.functional as F

    for axis in (2, 3):
        sigma = max(0.0, (x.shape[axis] / size - 1) / 2)
        if sigma <= 0:
            continue
        radius = int(4.0 * sigma + 0.5)
        taps = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
        kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
        kernel = kernel / kernel.sum()
        kernel = kernel.view(1, 1, -1, 1) if axis == 2 else kernel.view(1, 1, 1, -1)
        c = x.shape[1]
        padding = (radius, 0) if axis == 2 else (0, radius)
        x = F.conv2d(x, kernel.expand(c, 1, -1, -1).contiguous(), padding=padding, groups=c)
    return x


def percentiles(values):
    """(0.5, 99.5) percentiles of a torch tensor with numpy's linear interpolation; zeros for an empty set."""
    import torch

    if values.numel() == 0:
        return torch.zeros(2, device=values.device)
    v = values.flatten().sort().values
    pos = torch.tensor([0.005, 0.995], device=v.device, dtype=torch.float64) * (v.numel() - 1)
    low = pos.floor().long()
    high = torch.clamp(low + 1, max=v.numel() - 1)
    frac = (pos - low).float()
    return v[low] + (v[high] - v[low]) * frac


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
