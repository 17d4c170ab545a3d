"""One call from a Volume and prompts to named segments: the engine's main entry point.

It checks the request against the catalogue (clear errors before any model loads),
keeps loaded backends warm between calls, runs the model, applies thresholds and
post-processing, and reports targets the model did not find instead of writing empty
segments. The CLI calls it in-process; the worker (a later layer) calls it in its own
process.
"""
from __future__ import annotations

import difflib
import time
from dataclasses import dataclass, field

import numpy as np

from ..catalog import get_model
from ..errors import DependencyMissingError, InputError, WeightsMissingError
from ..models.base import backend_class
from ..segments import Segment, prepare_segments
from ..volume import Volume
from .postprocess import postprocess

_WARM: dict[tuple, object] = {}


@dataclass
class SegmentationResult:
    segments: list[Segment]
    absent: list[str]
    model_id: str
    device: str
    device_reason: str
    seconds: float
    probabilities: dict[str, np.ndarray] = field(default_factory=dict)


def check_prompts(model_id: str, prompts: list[str]) -> list[str]:
    """Clean prompts (strip, drop duplicates) and refuse ones a fixed-vocabulary model can't do."""
    entry = get_model(model_id)
    cleaned = []
    for p in prompts:
        p = " ".join(str(p).split())
        if p and p.lower() not in {c.lower() for c in cleaned}:
            cleaned.append(p)
    if not cleaned:
        suggestions = ", ".join(entry.targets()[:8])
        raise InputError(f"No prompt given for model '{model_id}'.",
                         hint=f"Try: {suggestions}." if suggestions else None)
    if entry.prompt_kind == "fixed":
        known = entry.targets()
        for p in cleaned:
            if p.lower() not in {k.lower() for k in known}:
                close = difflib.get_close_matches(p.lower(), known, n=3, cutoff=0.5)
                raise InputError(f"Model '{model_id}' cannot segment '{p}'; it knows only: {', '.join(known)}.",
                                 hint=f"Did you mean {', '.join(close)}?" if close else None)
    return cleaned


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
    if key not in _WARM:
        try:
            _WARM[key] = backend_class(entry.backend)(device=device, weights=weights)
        except FileNotFoundError as exc:
            raise WeightsMissingError(f"Weights for '{model_id}' could not be opened: {exc}.") from None
    return _WARM[key], reason


def unload_all() -> None:
    _WARM.clear()


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
