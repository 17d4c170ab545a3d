"""Sliding-window inference as the Hermes authors run it, with progress and cancel hooks.

The authors' scheme (``inference/inference3d.py`` in their repository): zero-pad each axis
shorter than the 128^3 window at its *end*; per axis, windows start at 64*i for
i in range(size // 64) and a window that would run past the end is moved to
[size-128, size); every window's sigmoid is added to an accumulator and the result is
divided by the coverage count (a uniform average, no Gaussian weighting). Their
validation additionally cuts volumes deeper than 600 slices into equal z-chunks that
are run independently.

Two engines give the same stitching:
- ``"authors"`` (default) reproduces it exactly, including a quirk: when an axis length
  is a multiple of 64 and >= 128, the last moved window repeats the one before it and
  is counted twice. We run each distinct window once and add it with its multiplicity.
- ``"monai"`` uses MONAI's ``sliding_window_inference`` (overlap 0.5, constant blending)
  on the end-padded volume. Its window grid is the authors' minus the repeats, so the
  two engines agree everywhere except where that quirk applies.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Callable, Sequence

import numpy as np

from ...errors import CancelledError, InputError

WINDOW = (128, 128, 128)
#: The authors' validation splits deeper volumes along z into chunks of at most this size.
Z_CHUNK = 600
NULL_TASK = -1
STAGE = "Hermes sliding window"

Progress = Callable[[str, int, int], None]
CancelCheck = Callable[[], bool]


def window_starts(size: int, window: int) -> list[int]:
    """Start of every window along one axis in the authors' loop order, repeats included."""
    half = window // 2
    starts = []
    for i in range(size // half):
        start = half * i
        if start + window > size:
            start = size - window
        starts.append(start)
    return starts


def window_grid(shape: Sequence[int], window: Sequence[int] = WINDOW) -> list[tuple[tuple[int, int], ...]]:
    """All windows as ((d0, d1), (h0, h1), (w0, w1)) in the authors' loop order (d outer)."""
    if any(s < w for s, w in zip(shape, window)):
        raise ValueError(f"pad the volume {tuple(shape)} to the window {tuple(window)} first")
    axes = [window_starts(s, w) for s, w in zip(shape, window)]
    return [tuple((a, a + w) for a, w in zip((i, j, k), window))
            for i in axes[0] for j in axes[1] for k in axes[2]]


def unique_windows(shape, window=WINDOW) -> list[tuple[tuple[tuple[int, int], ...], int]]:
    """Distinct windows in first-seen order, each with how many times the authors add it."""
    counts: dict = {}
    for win in window_grid(shape, window):
        counts[win] = counts.get(win, 0) + 1
    return list(counts.items())


def end_pad(image, window=WINDOW):
    """Zero-pad (B, C, D, H, W) at the end of each axis up to the window; returns the
    padded tensor and the original spatial size."""
    import torch.nn.functional as F

    size = tuple(image.shape[2:])
    diff = [max(0, w - s) for s, w in zip(size, window)]
    if any(diff):
        image = F.pad(image, (0, diff[2], 0, diff[1], 0, diff[0]))
    return image, size


def _autocast(device, amp: bool | None):
    import torch

    if device.type == "cuda" and (amp is None or amp):
        return torch.autocast("cuda", dtype=torch.float16)
    return nullcontext()


def _check_cancel(cancelled: CancelCheck | None):
    if cancelled is not None and cancelled():
        raise CancelledError("Hermes inference was cancelled.")


def sliding_window_probabilities(net, image, tgt_idx, mod_idx, *, window=WINDOW, sw_batch_size: int = 1,
                                 engine: str = "authors", amp: bool | None = None,
                                 progress: Progress | None = None, cancelled: CancelCheck | None = None,
                                 accumulate_device=None, _done_offset: int = 0, _total: int | None = None):
    """Stitched sigmoid probabilities (B, T, D, H, W) float32 for ``image`` (B, 1, D, H, W).

    ``tgt_idx`` (B, T) and ``mod_idx`` (B, 1) go to the network unchanged (the caller adds
    the null token). ``progress(stage, done, total)`` is called after every forward pass
    and ``cancelled()`` is checked before each one (raising ``CancelledError``).
    ``sw_batch_size`` windows share one forward pass. Mixed precision (float16 autocast)
    is used on CUDA unless ``amp=False``. The accumulator lives on ``accumulate_device``
    (default: the image's device) so very large volumes can be stitched in host memory.
    """
    import torch

    if engine not in ("authors", "monai"):
        raise InputError(f"Unknown sliding-window engine '{engine}'; use 'authors' or 'monai'.")
    if sw_batch_size < 1:
        raise InputError("The window batch size must be at least 1.")
    net.eval()
    padded, size = end_pad(image, window)
    fn = _stitch_monai if engine == "monai" else _stitch_authors
    total = _total if _total is not None else count_forward_passes(padded.shape[2:], window, sw_batch_size, engine,
                                                                   batch=padded.shape[0])
    with torch.no_grad():
        out = fn(net, padded, tgt_idx, mod_idx, window, sw_batch_size, amp, progress, cancelled,
                 accumulate_device, _done_offset, total)
    return out[:, :, :size[0], :size[1], :size[2]]


def count_forward_passes(shape, window=WINDOW, sw_batch_size: int = 1, engine: str = "authors", batch: int = 1) -> int:
    """How many network calls a padded volume of ``shape`` needs (for progress totals)."""
    shape = [max(s, w) for s, w in zip(shape, window)]
    if engine == "monai":
        n = math.prod(_monai_axis_count(s, w) for s, w in zip(shape, window))
        return batch * math.ceil(n / sw_batch_size)
    return math.ceil(len(unique_windows(shape, window)) / sw_batch_size)


def _monai_axis_count(size: int, window: int) -> int:
    # MONAI's dense grid with interval int(window * 0.5) (the whole axis when it equals the window).
    if size == window:
        return 1
    interval = int(window * 0.5)
    return next(d for d in range(math.ceil(size / interval)) if d * interval + window >= size) + 1


def _run(net, batch, tgt_idx, mod_idx, amp):
    import torch

    with _autocast(batch.device, amp):
        logits, _ = net(batch, tgt_idx, mod_idx)
    return torch.sigmoid(logits.float())


def _stitch_authors(net, image, tgt_idx, mod_idx, window, sw_batch_size, amp, progress, cancelled,
                    accumulate_device, done, total):
    import torch

    b = image.shape[0]
    acc_dev = accumulate_device or image.device
    acc = torch.zeros((b, tgt_idx.shape[1], *image.shape[2:]), dtype=torch.float32, device=acc_dev)
    counter = torch.zeros((b, 1, *image.shape[2:]), dtype=torch.float32, device=acc_dev)
    windows = unique_windows(image.shape[2:], window)
    for first in range(0, len(windows), sw_batch_size):
        group = windows[first:first + sw_batch_size]
        _check_cancel(cancelled)
        crops = [image[:, :, d0:d1, h0:h1, w0:w1] for ((d0, d1), (h0, h1), (w0, w1)), _ in group]
        prob = _run(net, torch.cat(crops), tgt_idx.repeat(len(group), 1), mod_idx.repeat(len(group), 1), amp)
        for n, (((d0, d1), (h0, h1), (w0, w1)), mult) in enumerate(group):
            p = prob[n * b:(n + 1) * b].to(acc_dev)
            acc[:, :, d0:d1, h0:h1, w0:w1] += p if mult == 1 else p * mult
            counter[:, :, d0:d1, h0:h1, w0:w1] += mult
        done += 1
        if progress is not None:
            progress(STAGE, done, total)
    return acc / counter


def _stitch_monai(net, image, tgt_idx, mod_idx, window, sw_batch_size, amp, progress, cancelled,
                  accumulate_device, done, total):
    import torch
    from monai.inferers import sliding_window_inference

    state = {"done": done}
    outs = []
    for s in range(image.shape[0]):  # one sample at a time, so each window knows its prompts
        tgt, mod = tgt_idx[s:s + 1], mod_idx[s:s + 1]

        def predictor(windows):
            _check_cancel(cancelled)
            n = windows.shape[0]
            prob = _run(net, windows, tgt.repeat(n, 1), mod.repeat(n, 1), amp)
            state["done"] += 1
            if progress is not None:
                progress(STAGE, state["done"], total)
            return prob

        outs.append(sliding_window_inference(
            image[s:s + 1], roi_size=tuple(window), sw_batch_size=sw_batch_size, predictor=predictor,
            overlap=0.5, mode="constant", padding_mode="constant", cval=0.0,
            sw_device=image.device, device=accumulate_device or image.device))
    out = torch.cat([torch.as_tensor(o) for o in outs])
    return out.as_tensor() if hasattr(out, "as_tensor") else out


def predict_volume(net, array: np.ndarray, task_ids: Sequence[int], modality_id: int, *, device="cpu",
                   window=WINDOW, sw_batch_size: int = 1, z_chunk: int | None = Z_CHUNK, engine: str = "authors",
                   amp: bool | None = None, progress: Progress | None = None,
                   cancelled: CancelCheck | None = None) -> np.ndarray:
    """Probabilities (T, D, H, W) float32 for a preprocessed (D, H, W) array.

    The prompt row is ``task_ids`` followed by one null token, as in the authors'
    validation; the null channel is dropped from the result. Volumes deeper than
    ``z_chunk`` slices are split into equal z-chunks run independently (their
    validation does this at 600); ``None`` disables the split.
    """
    import torch

    task_ids = [int(t) for t in task_ids]
    if not task_ids:
        raise InputError("No Hermes task was requested.")
    if any(t < 0 or t > 71 for t in task_ids):
        raise InputError(f"Hermes task ids run from 0 to 71, got {task_ids}.")
    if not -1 <= int(modality_id) <= 4:
        raise InputError(f"Hermes modality id must be -1 (unknown) or 0..4, got {modality_id}.")
    array = np.asarray(array, dtype=np.float32)
    if array.ndim != 3:
        raise InputError(f"Hermes expects a 3D (D, H, W) array, got shape {array.shape}.")
    device = torch.device(device)
    net = net.to(device).eval()
    tgt_idx = torch.tensor([task_ids + [NULL_TASK]], dtype=torch.long, device=device)
    mod_idx = torch.tensor([[int(modality_id)]], dtype=torch.long, device=device)
    depth = array.shape[0]
    if z_chunk and depth > z_chunk:
        n_chunks = math.ceil(depth / z_chunk)
        step = math.ceil(depth / n_chunks)
        bounds = [(z, min(z + step, depth)) for z in range(0, depth, step)]
    else:
        bounds = [(0, depth)]
    totals = [count_forward_passes((max(b - a, window[0]),) + tuple(array.shape[1:]), window, sw_batch_size, engine)
              for a, b in bounds]
    out = np.empty((len(task_ids),) + array.shape, dtype=np.float32)
    done = 0
    for (a, b), n in zip(bounds, totals):
        image = torch.from_numpy(np.ascontiguousarray(array[a:b]))[None, None].to(device)
        prob = sliding_window_probabilities(net, image, tgt_idx, mod_idx, window=window, sw_batch_size=sw_batch_size,
                                            engine=engine, amp=amp, progress=progress, cancelled=cancelled,
                                            accumulate_device=torch.device("cpu"), _done_offset=done,
                                            _total=sum(totals))
        out[:, a:b] = prob[0, :len(task_ids)].numpy()
        done += n
    return out


def predict_on_volume(net, volume, task_ids: Sequence[int], modality_id: int, *, scheme: str = "two_step",
                      **kwargs) -> np.ndarray:
    """Whole pipeline on an engine Volume: the authors' preprocessing, ``predict_volume``
    (keyword arguments pass through), and trilinear resampling of the probabilities back
    onto the volume's own grid. Returns (T, k, j, i) float32 in [0, 1]. Short axes are
    padded to the window size (the authors' 128 by default)."""
    from .preprocess import preprocess_volume, to_input_grid

    window = kwargs.get("window", WINDOW)
    prepared = preprocess_volume(volume, modality_id, scheme=scheme, min_size=max(window))
    prob = predict_volume(net, prepared.array, task_ids, modality_id, **kwargs)
    return np.clip(to_input_grid(prob, prepared), 0.0, 1.0)
