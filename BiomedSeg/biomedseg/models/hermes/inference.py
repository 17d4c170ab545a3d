"""Hermes' sliding-window inference: the generic runner (``runtime.sliding_window``) with the
authors' window (128^3), their prompt row (tasks plus a null token) and their z-chunking.

The authors' scheme (``inference/inference3d.py`` in their repository) is the runner's
``"authors"`` engine: zero-pad each axis shorter than the window at its *end*; per axis,
windows start at 64*i for i in range(size // 64) and a window that would run past the end
is moved to [size-128, size); every window's sigmoid is averaged uniformly (no Gaussian
weighting), a repeated last window counted twice as in their loop. ``"monai"`` runs MONAI's
``sliding_window_inference`` on the same grid without the repeats. Their validation also
cuts volumes deeper than 600 slices into equal z-chunks that are run independently.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Sequence

import numpy as np

from biomedseg.errors import InputError
from biomedseg.runtime import sliding_window as sw
from biomedseg.runtime.sliding_window import CancelCheck, Progress

WINDOW = (128, 128, 128)
#: The authors' validation splits deeper volumes along z into chunks of at most this size.
Z_CHUNK = 600
NULL_TASK = -1
#: Last task id any dataset uses (task_prior row 71 exists but no dataset refers to it; 72 is the null token).
LAST_TASK = 70
STAGE = "Hermes sliding window"



def window_grid(shape: Sequence[int], window: Sequence[int] = WINDOW) -> list[tuple[tuple[int, int], ...]]:
    return sw.window_grid(shape, window)


def unique_windows(shape, window=WINDOW) -> list[tuple[tuple[tuple[int, int], ...], int]]:
    return sw.unique_windows(shape, window)


def end_pad(image, window=WINDOW):
    return sw.end_pad(image, window)


def count_forward_passes(shape, window=WINDOW, sw_batch_size: int = 1, engine: str = "authors", batch: int = 1) -> int:
    return sw.count_forward_passes(shape, window, sw_batch_size, engine, batch)


def _autocast(device, amp: bool | None):
    import torch

    if device.type == "cuda" and (amp is None or amp):
        return torch.autocast("cuda", dtype=torch.float16)
    return nullcontext()


def sliding_window_probabilities(net, image, tgt_idx, mod_idx, *, window=WINDOW, sw_batch_size: int = 1,
                                 engine: str = "authors", amp: bool | None = None,
                                 progress: Progress | None = None, cancelled: CancelCheck | None = None,
                                 accumulate_device=None, _done_offset: int = 0, _total: int | None = None):
    """Stitched sigmoid probabilities (B, T, D, H, W) float32 for ``image`` (B, 1, D, H, W).

    ``tgt_idx`` (B, T) and ``mod_idx`` (B, 1) go to the network unchanged (the caller adds
    the null token); every window gets the prompts of its own sample. ``progress(stage, done,
    total)`` is called after every forward pass and ``cancelled()`` is checked before each one
    (raising ``CancelledError``). ``sw_batch_size`` windows share one forward pass. Mixed
    precision (float16 autocast) is used on CUDA unless ``amp=False``. The accumulator lives on
    ``accumulate_device`` (default: the image's device) so large volumes stitch in host memory.
    """
    net.eval()

    def predict(windows, samples):
        return _run(net, windows, tgt_idx[samples], mod_idx[samples], amp)

    return sw.sliding_window(predict, image, window, sw_batch_size=sw_batch_size, engine=engine, progress=progress,
                             cancelled=cancelled, accumulate_device=accumulate_device, stage=STAGE,
                             done_offset=_done_offset, total=_total, what="Hermes inference")


def _run(net, batch, tgt_idx, mod_idx, amp):
    import torch

    with _autocast(batch.device, amp):
        logits, _ = net(batch, tgt_idx, mod_idx)
    return torch.sigmoid(logits.float())


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
    if any(t < 0 or t > LAST_TASK for t in task_ids):
        raise InputError(f"Hermes task ids run from 0 to {LAST_TASK}, got {task_ids}.")
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
