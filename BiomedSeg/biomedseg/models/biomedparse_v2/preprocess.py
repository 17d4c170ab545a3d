"""BiomedParse v2 input and output geometry, as the authors' ``utils.py`` and ``forward_eval`` do it.

The model sees 512 x 512 slices of a uint8 volume (intensities 0..255; v2 has no windowing of its
own: its inputs are the CVPR 2025 challenge arrays). Per slice batch:

1. ``process_input``: pick the slice axis (``get_axis``), zero-pad each slice to a square (the
   smaller side gets ``pad // 2`` before and the rest after), and resize to 512 with
   ``F.interpolate(..., mode='bicubic')`` **on the uint8 tensor**. torch's uint8 bicubic kernel is
   separable (W, then H) and rounds and clamps to 0..255 after each pass; float bicubic with one
   rounding differs by up to 11 grey levels at the body edge, so the uint8 call is kept as is.
2. ``pack_slices``: slice i becomes channels (i, i-1, i+1); the first slice uses slice 1 as its
   previous one and the last slice uses slice D-2 as its next one; a single slice is repeated.
   Then ``(x_int32 - mean) / std`` in float32 with the grey-scale ImageNet constants.
3. ``process_output``: labels at 512 go back nearest-neighbour to the padded size, the padding is
   removed and the axis moved back.

``resize_to_model`` / ``restore_from_model`` are the same pad/resize rule without the axis choice,
for the engine, which picks the slice plane itself (from the patient direction) before calling.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

MODEL_SIZE = 512
#: ImageNet RGB statistics of the authors' config; ``gray_scale=True`` averages them over the channels.
IMAGENET_MEAN = (123.675, 116.280, 103.530)
IMAGENET_STD = (58.395, 57.120, 57.375)
GRAY_MEAN = sum(IMAGENET_MEAN) / len(IMAGENET_MEAN)
GRAY_STD = sum(IMAGENET_STD) / len(IMAGENET_STD)


def pixel_buffers() -> dict:
    """The model's ``pixel_mean``/``pixel_std`` buffers as constructed: [1, 3, 1, 1] float32."""
    return {"pixel_mean": torch.tensor([GRAY_MEAN] * 3).view(1, 3, 1, 1),
            "pixel_std": torch.tensor([GRAY_STD] * 3).view(1, 3, 1, 1)}


def normalization_constants() -> tuple[torch.Tensor, torch.Tensor]:
    """The 0-d float32 mean and std ``forward_eval`` uses: ``pixel_mean.mean()``, ``pixel_std.mean()``
    (114.49500274658203 and 57.630001068115234)."""
    b = pixel_buffers()
    return b["pixel_mean"].mean(), b["pixel_std"].mean()


def get_axis(shape) -> int:
    """The authors' slice axis: 0 when the last two sides differ by less than half their mean, else the
    shortest axis (a volume stored slice-last, for example)."""
    d, h, w = (int(s) for s in shape)
    if 2 * abs(h - w) / (h + w) < 0.5:
        return 0
    return int(np.argmin((d, h, w)))


def square_padding(h: int, w: int) -> tuple[list[list[int]], int]:
    """(pad_width for (D, H, W), padded side): zero rows or columns making an H x W slice square."""
    if h > w:
        before = (h - w) // 2
        return [[0, 0], [0, 0], [before, h - w - before]], h
    before = (w - h) // 2
    return [[0, 0], [before, w - h - before], [0, 0]], max(h, w)


def resize_to_model(slices_u8, size: int = MODEL_SIZE):
    """uint8 (D, H, W) slices (array or tensor) -> (uint8 tensor [D, size, size], pad_width, padded_size).

    Zero-pads to a square and resizes with torch's uint8 bicubic kernel (on CPU), as the authors.
    """
    vol = slices_u8.cpu().numpy() if torch.is_tensor(slices_u8) else np.asarray(slices_u8)
    if vol.dtype != np.uint8 or vol.ndim != 3:
        raise ValueError(f"BiomedParse v2 expects uint8 (D, H, W) slices, got {vol.dtype} {vol.shape}")
    pad_width, padded_size = square_padding(vol.shape[1], vol.shape[2])
    vol = np.pad(vol, pad_width, mode="constant", constant_values=0)
    resized = F.interpolate(torch.from_numpy(vol).unsqueeze(0), size=(size, size), mode="bicubic",
                            align_corners=False)
    return resized.squeeze(0), pad_width, padded_size


def remove_padding(vol, pad_width):
    """Crop the square padding off the last two axes of (D, S, S)."""
    h0, h1 = int(pad_width[1][0]), int(vol.shape[1] - pad_width[1][1])
    w0, w1 = int(pad_width[2][0]), int(vol.shape[2] - pad_width[2][1])
    return vol[:, h0:h1, w0:w1]


def restore_from_model(maps: torch.Tensor, pad_width, padded_size: int, mode: str = "nearest") -> torch.Tensor:
    """[D, S, S] maps at model size -> [D, H, W] on the slices' grid (inverse of ``resize_to_model``).

    ``mode='nearest'`` is the authors' rule for labels; ``'bilinear'`` suits probabilities. Computed in
    float32 and returned in the input's dtype.
    """
    out = maps
    if maps.shape[-1] != padded_size or maps.shape[-2] != padded_size:
        kwargs = {} if mode == "nearest" else {"align_corners": False}
        out = F.interpolate(maps.unsqueeze(0).float(), size=(padded_size, padded_size), mode=mode, **kwargs)
        out = out.squeeze(0).to(maps.dtype)
    return remove_padding(out, pad_width)


def process_input(vol_u8, size: int = MODEL_SIZE):
    """The authors' ``process_input``: -> (uint8 tensor [D', size, size], pad_width, padded_size, valid_axis)."""
    vol = np.asarray(vol_u8)
    if vol.dtype != np.uint8 or vol.ndim != 3:
        raise ValueError(f"BiomedParse v2 expects a uint8 (D, H, W) volume, got {vol.dtype} {vol.shape}")
    valid_axis = get_axis(vol.shape)
    resized, pad_width, padded_size = resize_to_model(np.moveaxis(vol, valid_axis, 0), size)
    return resized, pad_width, padded_size, valid_axis


def process_output(labels: torch.Tensor, pad_width, padded_size: int, valid_axis: int) -> np.ndarray:
    """The authors' ``process_output``: label map [D', S, S] -> int32 array on the input volume's grid."""
    vol = labels
    if vol.shape[-1] != padded_size or vol.shape[-2] != padded_size:
        vol = F.interpolate(vol.unsqueeze(0).float(), size=(padded_size, padded_size), mode="nearest")
        vol = vol.squeeze(0).int()
    vol = remove_padding(vol.cpu().numpy(), pad_width)
    return np.moveaxis(vol, 0, valid_axis)


def neighbour_indices(n_slices: int, start: int, stop: int) -> list[tuple[int, int, int]]:
    """(current, previous, next) slice indices for slices start..stop-1 under the authors' edge rule."""
    out = []
    for i in range(start, stop):
        if n_slices == 1:
            out.append((0, 0, 0))
            continue
        prev = i - 1 if i > 0 else 1
        nxt = i + 1 if i < n_slices - 1 else n_slices - 2
        out.append((i, prev, nxt))
    return out


def pack_slices(resized_u8, start: int, stop: int, device=None) -> torch.Tensor:
    """Model input for slices start..stop-1 of a resized uint8 volume [D, S, S]: float32 [n, 3, S, S].

    Channel order (slice, previous, next); ``(x - mean) / std`` with the 0-d float32 constants of
    ``normalization_constants``, computed from int32 as the authors (``imgs.int()``).
    """
    vol = resized_u8 if torch.is_tensor(resized_u8) else torch.from_numpy(np.asarray(resized_u8))
    idx = torch.tensor(neighbour_indices(vol.shape[0], start, stop), dtype=torch.long, device=vol.device)
    x = vol[idx.flatten()].view(stop - start, 3, *vol.shape[1:]).to(device=device, dtype=torch.int32)
    mean, std = normalization_constants()
    return (x - mean.to(x.device)) / std.to(x.device)
