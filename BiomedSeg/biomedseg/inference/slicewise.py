"""Running a 2D model over a volume, slice by slice, and putting the results back exactly.

The engine owns everything that is not the model: which patient plane to cut (axial by
default, whatever the array order), presenting slices in the display orientation the
model was trained on (``SliceOrientation``: transposes and flips only), an optional slice
range or RAS box, batching, progress and cancel between batches, and a cache of per-slice
image features so a new prompt on the same volume runs only the decoder.

A ``SliceModel`` does the model's part: ``encode`` a batch of display-oriented slices
(its own preprocessing: windows, resizing, normalisation) into features with a leading
batch dimension, and ``decode`` features + prompts into probabilities on the slices' own
(rows, cols) grid.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ..errors import CancelledError, InputError
from ..volume import Volume


class SliceModel(Protocol):
    def encode(self, slices: np.ndarray, context: dict) -> dict:
        """(B, rows, cols[, C]) raw intensities -> features {name: tensor with leading B}."""

    def decode(self, features: dict, prompts: list[str], context: dict) -> Any:
        """features of B slices -> probabilities (B, len(prompts), rows, cols), numpy or torch."""


@dataclass(frozen=True)
class Crop:
    """A box of the volume in array indices (k, j, i), half-open."""

    start: tuple[int, int, int]
    stop: tuple[int, int, int]

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop))


def crop_for_roi(volume: Volume, ras_min, ras_max) -> Crop:
    """Smallest box of voxels whose centres cover an axis-aligned RAS box (e.g. a markups ROI)."""
    lo, hi = np.asarray(ras_min, float), np.asarray(ras_max, float)
    corners = np.array([[x, y, z, 1.0] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    ijk = (np.linalg.inv(volume.ijk_to_ras) @ corners.T).T[:, :3]
    start_ijk = np.clip(np.floor(ijk.min(axis=0) + 0.5), 0, None).astype(int)
    stop_ijk = np.ceil(ijk.max(axis=0) - 0.5).astype(int) + 1
    shape_ijk = np.array(volume.shape[::-1])
    stop_ijk = np.minimum(stop_ijk, shape_ijk)
    if np.any(stop_ijk <= start_ijk):
        raise InputError("The region of interest does not overlap the volume.")
    return Crop(tuple(int(v) for v in start_ijk[::-1]), tuple(int(v) for v in stop_ijk[::-1]))


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
                  plane: str = "axial", slice_range: tuple[int, int] | None = None, crop: Crop | None = None,
                  batch_size: int = 8, progress=None, cancelled=None,
                  cache: FeatureCache | None = None) -> dict[str, np.ndarray]:
    """Probabilities (k, j, i) per prompt on ``volume``'s grid (zero outside the range/crop).

    ``slice_range`` is an inclusive (first, last) pair of array indices along the axis that
    indexes the chosen plane's slices; ``crop`` restricts every slice to a box.
    """
    progress = progress or (lambda *a: None)
    cancelled = cancelled or (lambda: False)
    context = dict(context or {})
    if batch_size < 1:
        raise InputError(f"Batch size must be at least 1, got {batch_size}.")
    orient = volume.slice_orientation(plane)
    region = crop.slices if crop is not None else (slice(None),) * 3
    if slice_range is not None:
        first, last = (int(v) for v in slice_range)
        n_along = volume.shape[orient.slice_axis]
        if not 0 <= first <= last < n_along:
            raise InputError(f"Slice range {first}..{last} is outside 0..{n_along - 1} for the {plane} plane.")
        region = list(region)
        current = region[orient.slice_axis]
        start = max(first, current.start or 0)
        stop = min(last + 1, current.stop if current.stop is not None else n_along)
        if stop <= start:
            raise InputError("The slice range and the region of interest do not overlap.")
        region[orient.slice_axis] = slice(start, stop)
        region = tuple(region)
    sub = volume.array[region]
    display = orient.to_display(sub)  # (n, rows, cols[, C]) view
    n = display.shape[0]
    context.update({"plane": plane, "region": [(s.start, s.stop) for s in region]})
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
    result = {}
    for prompt, stack in out.items():
        full = np.zeros(volume.shape, np.float32)
        full[region] = orient.from_display(stack)
        result[prompt] = full
    return result
