"""Running a 2D model over a volume, slice by slice, and putting the results back exactly.

This strategy owns everything that is not the model: which patient plane to cut (axial by
default, whatever the array order), presenting slices in the display orientation the
model was trained on (``SliceOrientation``: transposes and flips only), batching, progress
and cancel between batches, and a cache of per-slice image features so a new prompt on the
same volume runs only the decoder. A slice range or ROI is the engine's business: it hands
the strategy the cropped volume (``geometry.region_box``) and puts the result back.

A ``SliceModel`` does the model's part: ``encode`` a batch of display-oriented slices
(its own preprocessing: windows, resizing, normalisation) into features with a leading
batch dimension, and ``decode`` features + prompts into probabilities on the slices' own
(rows, cols) grid.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any, Protocol

import numpy as np

from ..errors import CancelledError, InputError
from ..volume import Volume


class SliceModel(Protocol):
    def encode(self, slices: np.ndarray, context: dict) -> dict:
        """(B, rows, cols[, C]) raw intensities -> features {name: tensor with leading B}."""

    def decode(self, features: dict, prompts: list[str], context: dict) -> Any:
        """features of B slices -> probabilities (B, len(prompts), rows, cols), numpy or torch."""


class FeatureCache:
    """Per-slice image features of recent volumes, so re-prompting skips the encoder.

    Keyed by a fingerprint of the voxels and geometry plus the model's context (modality,
    site, plane...). Features are kept as given (on the GPU if they fit there) or moved to
    CPU in half precision when ``offload`` says so. Least recently used volumes go first.
    """

    def __init__(self, max_volumes: int = 1, offload=None):
        self.max_volumes = max_volumes
        self.offload = offload  # callable(features) -> features, e.g. to CPU fp16
        self.entries: OrderedDict[str, dict[int, dict]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(volume: Volume, context: dict) -> str:
        digest = hashlib.blake2b(digest_size=16)
        digest.update(memoryview(np.ascontiguousarray(volume.array)).cast("B"))
        digest.update(str((volume.array.shape, volume.array.dtype.str, volume.ijk_to_ras.round(6).tolist(),
                           sorted(context.items()))).encode())
        return digest.hexdigest()

    def get(self, key: str) -> dict[int, dict]:
        if key in self.entries:
            self.entries.move_to_end(key)
        else:
            self.entries[key] = {}
            while len(self.entries) > self.max_volumes:
                self.entries.popitem(last=False)
        return self.entries[key]

    def clear(self) -> None:
        self.entries.clear()


def _split(features: dict, n: int) -> list[dict]:
    return [{name: value[i:i + 1] for name, value in features.items()} for i in range(n)]


def _stack(per_slice: list[dict]) -> dict:
    import torch

    return {name: torch.cat([f[name] for f in per_slice]) for name in per_slice[0]}


def run_slicewise(volume: Volume, model: SliceModel, prompts: list[str], *, context: dict | None = None,
                  plane: str = "axial", batch_size: int = 8, progress=None, cancelled=None,
                  cache: FeatureCache | None = None) -> dict[str, np.ndarray]:
    """Probabilities (k, j, i) per prompt on ``volume``'s grid, slice by slice along ``plane``."""
    progress = progress or (lambda *a: None)
    cancelled = cancelled or (lambda: False)
    context = dict(context or {})
    if batch_size < 1:
        raise InputError(f"Batch size must be at least 1, got {batch_size}.")
    orient = volume.slice_orientation(plane)
    display = orient.to_display(volume.array)  # (n, rows, cols[, C]) view
    n = display.shape[0]
    context["plane"] = plane
    store = cache.get(FeatureCache.key(volume, context)) if cache is not None else None

    out = {p: np.zeros((n,) + display.shape[1:3], np.float32) for p in prompts}
    batches = [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
    progress("segmenting slices", 0, n)
    done = 0
    for batch in batches:
        if cancelled():
            raise CancelledError("Segmentation was cancelled; nothing was written.")
        missing = [i for i in batch if store is None or i not in store]
        if missing:
            features = model.encode(np.ascontiguousarray(display[missing[0]:missing[-1] + 1])
                                    if missing == list(range(missing[0], missing[-1] + 1))
                                    else np.ascontiguousarray(display[missing]), context)
            if store is not None:
                kept = cache.offload(features) if cache.offload else features
                for i, f in zip(missing, _split(kept, len(missing))):
                    store[i] = f
                cache.misses += len(missing)
        if store is not None:
            cache.hits += len(batch) - len(missing)
            features = _stack([store[i] for i in batch])
        probs = model.decode(features, prompts, context)
        probs = probs.float().cpu().numpy() if hasattr(probs, "cpu") else np.asarray(probs, np.float32)
        for p_index, prompt in enumerate(prompts):
            out[prompt][batch[0]:batch[-1] + 1] = probs[:, p_index]
        done += len(batch)
        progress("segmenting slices", done, n)
    return {prompt: np.ascontiguousarray(orient.from_display(stack)) for prompt, stack in out.items()}
