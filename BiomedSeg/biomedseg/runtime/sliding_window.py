"""Sliding-window inference for any volumetric (3D) model: window grid, stitching, progress, cancel.

A backend gives a ``predict(windows, samples)`` callable: ``windows`` is a (N, C, d, h, w)
batch of crops and ``samples`` (N,) says which input sample each crop came from (so a model
with per-sample prompts picks the right ones); it returns (N, K, d, h, w) probabilities. The
runner pads, cuts windows, batches ``sw_batch_size`` windows per call, checks ``cancelled()``
before every call, reports ``progress(stage, done, total)`` after every call, and averages
the overlapping windows in an accumulator that may live in host memory.

Two stitching engines, both a uniform average of half-overlapping windows:
- ``"authors"`` (Hermes' own loop, ``inference/inference3d.py`` in their repository): per
  axis, windows start at ``w/2 * i`` for ``i in range(size // (w/2))`` and one that would run
  past the end is moved to ``[size - w, size)``. When an axis length is a multiple of ``w/2``
  and at least ``w``, the moved window repeats the one before it and is counted twice; we run
  each distinct window once and add it with its multiplicity, so the result is theirs.
- ``"monai"``: MONAI's ``sliding_window_inference`` (overlap 0.5, constant blending). Its grid
  is the authors' without the repeats, so the two agree except where that quirk applies.
Axes shorter than the window are zero-padded at their end and cropped back afterwards.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

from ..errors import InputError
from .callbacks import CancelCheck, Progress, check_cancel
Predict = Callable[..., object]  # (windows (N, C, d, h, w), samples (N,)) -> (N, K, d, h, w)
ENGINES = ("authors", "monai")


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


def window_grid(shape: Sequence[int], window: Sequence[int]) -> list[tuple[tuple[int, int], ...]]:
    """All windows as ((d0, d1), (h0, h1), (w0, w1)) in the authors' loop order (d outer)."""
    if any(s < w for s, w in zip(shape, window)):
        raise ValueError(f"pad the volume {tuple(shape)} to the window {tuple(window)} first")
    axes = [window_starts(s, w) for s, w in zip(shape, window)]
    return [tuple((a, a + w) for a, w in zip((i, j, k), window))
            for i in axes[0] for j in axes[1] for k in axes[2]]


def unique_windows(shape, window) -> list[tuple[tuple[tuple[int, int], ...], int]]:
    """Distinct windows in first-seen order, each with how many times the authors add it."""
    counts: dict = {}
    for win in window_grid(shape, window):
        counts[win] = counts.get(win, 0) + 1
    return list(counts.items())


def end_pad(image, window):
    """Zero-pad (B, C, D, H, W) at the end of each axis up to the window; returns the
    padded tensor and the original spatial size."""
    import torch.nn.functional as F

    size = tuple(image.shape[2:])
    diff = [max(0, w - s) for s, w in zip(size, window)]
    if any(diff):
        image = F.pad(image, (0, diff[2], 0, diff[1], 0, diff[0]))
    return image, size


def count_forward_passes(shape, window, sw_batch_size: int = 1, engine: str = "authors", batch: int = 1) -> int:
    """How many ``predict`` calls a volume of ``shape`` needs (for progress totals)."""
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


def sliding_window(predict: Predict, image, window: Sequence[int], *, sw_batch_size: int = 1,
                   engine: str = "authors", progress: Progress | None = None, cancelled: CancelCheck | None = None,
                   accumulate_device=None, stage: str = "sliding window", done_offset: int = 0,
                   total: int | None = None, what: str = "Inference"):
    """Stitched probabilities (B, K, D, H, W) float32 of ``predict`` over ``image`` (B, C, D, H, W).

    ``done_offset`` and ``total`` let a caller that runs several volumes (e.g. z-chunks) report
    one continuous progress count; ``what`` names the job in the CancelledError.
    """
    import torch

    window = tuple(int(w) for w in window)
    if engine not in ENGINES:
        raise InputError(f"Unknown sliding-window engine '{engine}'; use 'authors' or 'monai'.")
    if sw_batch_size < 1:
        raise InputError("The window batch size must be at least 1.")
    padded, size = end_pad(image, window)
    if total is None:
        total = count_forward_passes(padded.shape[2:], window, sw_batch_size, engine, batch=padded.shape[0])
    stitch = _stitch_monai if engine == "monai" else _stitch_authors
    with torch.no_grad():
        out = stitch(predict, padded, window, sw_batch_size, progress, cancelled, accumulate_device or image.device,
                     stage, done_offset, total, what)
    return out[:, :, :size[0], :size[1], :size[2]]


def _stitch_authors(predict, image, window, sw_batch_size, progress, cancelled, acc_dev, stage, done, total, what):
    import torch

    b = image.shape[0]
    acc = counter = None
    windows = unique_windows(image.shape[2:], window)
    samples = torch.arange(b, device=image.device)
    for first in range(0, len(windows), sw_batch_size):
        group = windows[first:first + sw_batch_size]
        check_cancel(cancelled, what)
        crops = [image[:, :, d0:d1, h0:h1, w0:w1] for ((d0, d1), (h0, h1), (w0, w1)), _ in group]
        prob = predict(torch.cat(crops), samples.repeat(len(group)))
        if acc is None:
            acc = torch.zeros((b, prob.shape[1], *image.shape[2:]), dtype=torch.float32, device=acc_dev)
            counter = torch.zeros((b, 1, *image.shape[2:]), dtype=torch.float32, device=acc_dev)
        for n, (((d0, d1), (h0, h1), (w0, w1)), mult) in enumerate(group):
            p = prob[n * b:(n + 1) * b].to(acc_dev, torch.float32)
            acc[:, :, d0:d1, h0:h1, w0:w1] += p if mult == 1 else p * mult
            counter[:, :, d0:d1, h0:h1, w0:w1] += mult
        done += 1
        if progress is not None:
            progress(stage, done, total)
    return acc / counter


def _stitch_monai(predict, image, window, sw_batch_size, progress, cancelled, acc_dev, stage, done, total, what):
    import torch
    from monai.inferers import sliding_window_inference

    state = {"done": done}
    outs = []
    for s in range(image.shape[0]):  # one sample at a time, so each window knows its sample
        def predictor(windows, s=s):
            check_cancel(cancelled, what)
            prob = predict(windows, torch.full((windows.shape[0],), s, dtype=torch.long, device=windows.device))
            state["done"] += 1
            if progress is not None:
                progress(stage, state["done"], total)
            return prob

        outs.append(sliding_window_inference(
            image[s:s + 1], roi_size=window, sw_batch_size=sw_batch_size, predictor=predictor,
            overlap=0.5, mode="constant", padding_mode="constant", cval=0.0, sw_device=image.device, device=acc_dev))
    out = torch.cat([torch.as_tensor(o) for o in outs])
    return (out.as_tensor() if hasattr(out, "as_tensor") else out).float()
