"""BiomedCLIP's input pipeline: open_clip's eval transform, step for step, without torchvision.

1. ``resize_shortest``: Pillow bicubic (which always antialiases) of the shortest side to 224; the
   long side becomes ``int(224 * long / short)``. torch's bicubic, even with antialias, differs by up
   to one grey level, so Pillow it is.
2. ``center_crop``: 224x224 at offset ``round((size - 224) / 2)`` (Python's rounding).
3. RGB conversion *after* the resize (the authors' order), ``/255`` and the OpenAI CLIP mean and std,
   all in float32: ``(u8 / 255 - mean) / std``, which is bitwise what the authors' tensors give.

``prepare_image`` takes what a backend has: a grey slice already windowed to 0..255 (any integer or
float dtype) or an RGB(A) image, and gives the model input [3, 224, 224]. Torch-free except
``prepare_batch``.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from biomedseg.errors import InputError

IMAGE_SIZE = 224
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def resize_shortest(image: Image.Image, size: int = IMAGE_SIZE) -> Image.Image:
    width, height = image.size
    short, long = min(width, height), max(width, height)
    if short == size:
        return image  # torchvision leaves the image alone at the target size
    new_long = int(size * long / short)
    new_size = (size, new_long) if width <= height else (new_long, size)
    return image.resize(new_size, Image.BICUBIC)


def center_crop(image: Image.Image, size: int = IMAGE_SIZE) -> Image.Image:
    width, height = image.size
    if width < size or height < size:
        raise InputError(f"BiomedCLIP's centre crop needs at least {size}x{size}, got {width}x{height}.")
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def normalise(rgb_u8: np.ndarray) -> np.ndarray:
    """HWC uint8 RGB -> CHW float32 ``(u8/255 - mean) / std``."""
    x = np.asarray(rgb_u8, dtype=np.uint8).astype(np.float32) / np.float32(255)
    return np.ascontiguousarray(((x - MEAN) / STD).transpose(2, 0, 1))


def preprocess_pil(image: Image.Image) -> np.ndarray:
    """open_clip's eval transform of a Pillow image: [3, 224, 224] float32."""
    image = center_crop(resize_shortest(image))
    return normalise(np.asarray(image.convert("RGB")))


def to_uint8(array: np.ndarray) -> np.ndarray:
    """Grey levels as uint8; values must already lie in 0..255 (window first), floats are rounded."""
    array = np.asarray(array)
    if array.dtype == np.uint8:
        return array
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise InputError(f"BiomedCLIP needs numeric pixels, got dtype {array.dtype}.")
    if array.size and not np.isfinite(array).all():
        raise InputError("The image has NaN or infinite values; BiomedCLIP cannot use it.")
    if array.size and (array.min() < 0 or array.max() > 255):
        raise InputError(f"BiomedCLIP needs grey levels in 0..255 (window the image first), got "
                         f"{array.min()}..{array.max()}.")
    return np.rint(array).astype(np.uint8)


def to_pil(image) -> Image.Image:
    """A Pillow image of a grey slice [H, W] or [H, W, 1], or an RGB / RGBA image [H, W, 3|4]."""
    if isinstance(image, Image.Image):
        return image
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)) or min(array.shape[:2]) < 1:
        raise InputError(f"BiomedCLIP takes a grey slice [H, W] or an RGB image [H, W, 3], got shape {array.shape}.")
    array = np.ascontiguousarray(to_uint8(array))
    return Image.fromarray(array)  # uint8 [H, W] -> L, [H, W, 3] -> RGB, [H, W, 4] -> RGBA


def prepare_image(image) -> np.ndarray:
    """The model input [3, 224, 224] float32 of a grey slice, an RGB(A) array or a Pillow image."""
    return preprocess_pil(to_pil(image))


def prepare_batch(images):
    """A float32 torch tensor [B, 3, 224, 224] of several images (see ``prepare_image``)."""
    import torch

    images = list(images)
    if not images:
        raise InputError("BiomedCLIP needs at least one image.")
    return torch.from_numpy(np.stack([prepare_image(im) for im in images]))
