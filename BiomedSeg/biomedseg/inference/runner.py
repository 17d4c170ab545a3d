"""One call from a Volume and prompts to named segments: the engine's main entry point.

It checks the request against the catalogue (clear errors before any model loads),
keeps loaded backends warm between calls, runs the model, applies thresholds and
post-processing, and reports targets the model did not find instead of writing empty
segments. The worker calls it in its own process; the CLI's --in-process mode calls it directly.
"""
from __future__ import annotations

import gc
import os
import time
from collections import OrderedDict

from ..catalog import check_prompts, get_model
from ..errors import DependencyMissingError, InputError, WeightsMissingError
from ..models.base import backend_class
from ..segments import Segment, SegmentationResult, prepare_segments
from ..volume import Volume
from .device import free_memory_bytes, release_memory
from .postprocess import postprocess

#: Loaded backends, least recently used first; evicted when memory runs short.
_WARM: "OrderedDict[tuple, object]" = OrderedDict()
MAX_WARM = int(os.environ.get("BIOMEDSEG_MAX_WARM", "2"))


def load_backend(model_id: str, device: str = "auto", weights: str | None = None):
    """Load (or reuse a warm) backend; errors say what is missing and how to get it."""
    from .device import resolve_device

    entry = get_model(model_id)
    if not entry.backend:
        raise InputError(f"Model '{model_id}' is in the catalogue but its backend is not part of this release.")
    missing = entry.missing_requirements()
    if missing:
        raise DependencyMissingError(f"Model '{model_id}' needs {', '.join(missing)}, which is not installed in "
                                     "this Python environment.", hint=f"pip install {' '.join(missing)}")
    device, reason = resolve_device(device)
    key = (model_id, device, str(weights or ""))
    if key in _WARM:
        _WARM.move_to_end(key)
    else:
        _make_room(entry.weights.get("size_bytes", 0), device)
        try:
            _WARM[key] = backend_class(entry.backend)(device=device, weights=weights)
        except FileNotFoundError as exc:
            raise WeightsMissingError(f"Weights for '{model_id}' could not be opened: {exc}.") from None
    return _WARM[key], reason


def _make_room(model_bytes: int, device: str) -> None:
    """Evict least recently used models until the new one (about 2x its weights) fits."""
    while _WARM and (len(_WARM) >= MAX_WARM or free_memory_bytes(device) < 2 * model_bytes):
        _WARM.popitem(last=False)
        release_memory(device)


def warm_models() -> list[dict]:
    return [{"model": k[0], "device": k[1], "weights": k[2] or None} for k in _WARM]


def unload_all() -> None:
    """Drop every loaded model and give its memory back."""
    _WARM.clear()
    gc.collect()


def segment(volume: Volume, model_id: str, prompts: list[str], *, device: str = "auto",
            threshold: float = 0.5, keep_largest: bool | None = None, fill_holes: bool | None = None,
            weights: str | None = None, progress=None, cancelled=None, keep_probabilities: bool = False,
            options: dict | None = None) -> SegmentationResult:
    """Segment ``volume`` with ``model_id`` for each prompt; masks are on the input grid."""
    if not 0.0 < threshold < 1.0:
        raise InputError(f"Threshold {threshold} must lie strictly between 0 and 1.")
    prompts = check_prompts(model_id, prompts)
    entry = get_model(model_id)
    if entry.input == "3d" and min(volume.shape) < 8:
        raise InputError(f"Model '{model_id}' needs a 3D volume, but '{volume.name or 'the input'}' has shape "
                         f"{volume.shape} (k, j, i).", hint="Choose a 3D image or a slice-wise (2D) model.")
    start = time.perf_counter()
    backend, reason = load_backend(model_id, device, weights)
    probabilities = backend.predict(volume, prompts, progress=progress or (lambda *a: None),
                                    cancelled=cancelled or (lambda: False), options=options or {})
    defaults = getattr(backend, "default_postprocess", {})
    largest = defaults.get("keep_largest", False) if keep_largest is None else keep_largest
    fill = defaults.get("fill_holes", False) if fill_holes is None else fill_holes
    segments, absent = [], []
    for prompt in prompts:
        prob = probabilities.get(prompt)
        if prob is None or prob.shape != volume.shape:
            raise RuntimeError(f"backend {model_id} returned no valid result for '{prompt}'")
        mask = postprocess(prob, threshold, keep_largest=largest, fill=fill)
        if mask.any():
            segments.append(Segment(prompt, mask))
        else:
            absent.append(prompt)
    if segments:  # names -> colours and terminology, once, for every consumer
        segments = prepare_segments(segments, volume.shape)
    return SegmentationResult(segments, absent, model_id, backend.device, reason, time.perf_counter() - start,
                              probabilities if keep_probabilities else {})
