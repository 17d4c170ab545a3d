"""Typed prompts: what a person asks a model for, and the same prompts on a model's voxel grid.

A person gives prompts in patient terms: text ("liver"), a box or points drawn on a slice
(markups in Slicer, RAS millimetres on the command line), or an existing segment used as a
mask. Every prompt names the *target* its result belongs to: a text prompt is its own
target; boxes, points and masks carry one (several prompts with the same target describe
one object, e.g. a box plus corrective clicks). Geometric prompts carry the plane they were
drawn on (None for a 3D box), so a slice-wise model knows which slice a 2D box lies on.

The engine converts prompts to the grid of the volume it hands a backend (``to_grid``), so
a backend sees array indices (k, j, i) of its own input and never Slicer or file
coordinates. Prompts cross the worker boundary as JSON (``prompt_to_dict`` /
``prompt_from_dict``); mask voxels travel through shared memory, not JSON.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Union

import numpy as np

from .errors import InputError
from .volume import SLICE_PLANES, Volume

PROMPT_TYPES = ("text", "box", "point", "mask")
DEFAULT_TARGET = "object"


@dataclass(frozen=True)
class TextPrompt:
    """Free text or the name of a task; it is also the name of its result."""

    text: str
    type = "text"

    @property
    def target(self) -> str:
        return self.text


@dataclass(frozen=True)
class BoxPrompt:
    """An RAS box: a 2D box on one slice of ``plane``, or a 3D box when ``plane`` is None."""

    ras_min: tuple[float, float, float]
    ras_max: tuple[float, float, float]
    plane: str | None = "axial"
    target: str = DEFAULT_TARGET
    type = "box"


@dataclass(frozen=True)
class PointPrompt:
    """A click at RAS ``ras``: ``include`` True marks the object, False marks background."""

    ras: tuple[float, float, float]
    include: bool = True
    plane: str | None = "axial"
    target: str = DEFAULT_TARGET
    type = "point"


@dataclass(frozen=True, eq=False)
class MaskPrompt:
    """An existing segment as a prompt: a boolean (k, j, i) mask on the input volume's grid."""

    mask: np.ndarray
    target: str = DEFAULT_TARGET
    type = "mask"


Prompt = Union[TextPrompt, BoxPrompt, PointPrompt, MaskPrompt]


def clean_text(text) -> str:
    return " ".join(str(text).split())


def parse_text_prompts(text: str | list[str]) -> list[str]:
    """'liver, left kidney; tumor' -> ['liver', 'left kidney', 'tumor'] (cleaned, duplicates dropped):
    how the panel's prompt field and the CLI's --prompt read a list of targets."""
    parts = text if isinstance(text, list) else re.split(r"[,;\n]", text or "")
    out: list[str] = []
    for part in parts:
        part = clean_text(part)
        if part and part.lower() not in {p.lower() for p in out}:
            out.append(part)
    return out


def as_prompts(items) -> list[Prompt]:
    """Prompts from what callers pass: Prompt objects, plain strings (text), or their dicts."""
    out: list[Prompt] = []
    for item in items or []:
        if isinstance(item, (TextPrompt, BoxPrompt, PointPrompt, MaskPrompt)):
            out.append(item)
        elif isinstance(item, str):
            out.append(TextPrompt(item))
        elif isinstance(item, dict):
            out.append(prompt_from_dict(item))
        else:
            raise InputError(f"A prompt must be text, a box, points or a mask, got {type(item).__name__}.")
    return out


def targets_of(prompts: list[Prompt]) -> list[str]:
    """Result names in request order, each once (text prompts are their own targets)."""
    seen: list[str] = []
    for p in prompts:
        if p.target not in seen:
            seen.append(p.target)
    return seen


def describe(prompts: list[Prompt]) -> str:
    """'liver, box for object, 2 points for object' -- for messages and logs."""
    parts = []
    for p in prompts:
        parts.append(repr(p.text) if isinstance(p, TextPrompt) else f"{p.type} for {p.target!r}")
    return ", ".join(parts)


# ---- JSON form (the worker boundary) ------------------------------------------------------

def _triple(value, what: str) -> tuple[float, float, float]:
    try:
        arr = np.asarray(value, dtype=float).reshape(3)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be three RAS coordinates in millimetres, got {value!r}.") from None
    if not np.all(np.isfinite(arr)):
        raise InputError(f"{what} has non-finite coordinates: {value!r}.")
    return tuple(float(v) for v in arr)


def _plane(value, allow_none: bool = True) -> str | None:
    if value is None and allow_none:
        return None
    if not isinstance(value, str) or value.lower() not in SLICE_PLANES:
        raise InputError(f"Unknown prompt plane {value!r}; use axial, coronal or sagittal"
                         + (", or null for a 3D box." if allow_none else "."))
    return value.lower()


def _target(value) -> str:
    if value is None:
        return DEFAULT_TARGET
    if not isinstance(value, str) or not clean_text(value):
        raise InputError(f"A prompt's target must be a non-empty name, got {value!r}.")
    return clean_text(value)


def prompt_to_dict(prompt: Prompt) -> dict:
    """JSON-able form; a mask prompt's voxels are left out (they travel through shared memory)."""
    if isinstance(prompt, TextPrompt):
        return {"type": "text", "text": prompt.text}
    if isinstance(prompt, BoxPrompt):
        return {"type": "box", "ras_min": list(prompt.ras_min), "ras_max": list(prompt.ras_max),
                "plane": prompt.plane, "target": prompt.target}
    if isinstance(prompt, PointPrompt):
        return {"type": "point", "ras": list(prompt.ras), "include": bool(prompt.include), "plane": prompt.plane,
                "target": prompt.target}
    if isinstance(prompt, MaskPrompt):
        return {"type": "mask", "target": prompt.target}
    raise InputError(f"Not a prompt: {prompt!r}.")


def prompt_from_dict(data: dict, mask: np.ndarray | None = None) -> Prompt:
    """The prompt a dict describes, checked; ``mask`` supplies a mask prompt's voxels."""
    if not isinstance(data, dict):
        raise InputError(f"A prompt must be an object with a 'type', got {data!r}.")
    kind = data.get("type")
    if kind == "text":
        text = data.get("text")
        if not isinstance(text, str):
            raise InputError(f"A text prompt needs 'text' as a string, got {text!r}.")
        return TextPrompt(text)
    if kind == "box":
        lo, hi = _triple(data.get("ras_min"), "A box's ras_min"), _triple(data.get("ras_max"), "A box's ras_max")
        return BoxPrompt(tuple(min(a, b) for a, b in zip(lo, hi)), tuple(max(a, b) for a, b in zip(lo, hi)),
                         _plane(data.get("plane", "axial")), _target(data.get("target")))
    if kind == "point":
        include = data.get("include", True)
        if not isinstance(include, bool):
            raise InputError(f"A point's 'include' must be true or false, got {include!r}.")
        return PointPrompt(_triple(data.get("ras"), "A point"), include, _plane(data.get("plane", "axial")),
                           _target(data.get("target")))
    if kind == "mask":
        if mask is None:
            raise InputError("A mask prompt needs its voxels.")
        return MaskPrompt(np.asarray(mask).astype(bool), _target(data.get("target")))
    raise InputError(f"Unknown prompt type {kind!r}; use one of {', '.join(PROMPT_TYPES)}.")


# ---- on a model's grid --------------------------------------------------------------------

@dataclass(frozen=True)
class GridBox:
    """A box in continuous array indices (k, j, i) of the backend's volume (voxel centres are whole
    numbers). A 2D box has ``plane`` and ``slice``: the index along that plane's slice axis."""

    target: str
    start: tuple[float, float, float]
    stop: tuple[float, float, float]
    plane: str | None
    slice: int | None


@dataclass(frozen=True)
class GridPoint:
    target: str
    index: tuple[float, float, float]  # continuous (k, j, i)
    include: bool
    plane: str | None
    slice: int | None


@dataclass(frozen=True, eq=False)
class GridMask:
    target: str
    mask: np.ndarray  # bool (k, j, i) on the backend's volume


@dataclass
class PromptSet:
    """The prompts of one run, ready for a backend: texts as given, geometry on its grid."""

    texts: list[str] = field(default_factory=list)
    boxes: list[GridBox] = field(default_factory=list)
    points: list[GridPoint] = field(default_factory=list)
    masks: list[GridMask] = field(default_factory=list)
    #: every target in request order (what the result is keyed by)
    targets: list[str] = field(default_factory=list)

    def for_target(self, target: str) -> dict:
        """The boxes, points and masks that describe one target."""
        return {"boxes": [b for b in self.boxes if b.target == target],
                "points": [p for p in self.points if p.target == target],
                "masks": [m for m in self.masks if m.target == target]}


def ras_to_index(volume: Volume, ras) -> np.ndarray:
    """Continuous array indices (k, j, i) of RAS points (..., 3)."""
    ras = np.asarray(ras, dtype=float)
    flat = ras.reshape(-1, 3)
    ijk = (np.linalg.inv(volume.ijk_to_ras) @ np.c_[flat, np.ones(len(flat))].T).T[:, :3]
    return ijk[:, ::-1].reshape(ras.shape)


def _slice_of(volume: Volume, plane: str | None, index: np.ndarray, where: str) -> int | None:
    """The slice a 2D prompt lies on: its index along the plane's slice axis, rounded and checked."""
    if plane is None:
        return None
    axis = volume.slice_orientation(plane).slice_axis
    position = int(np.floor(float(index[axis]) + 0.5))
    if not 0 <= position < volume.shape[axis]:
        raise InputError(f"A prompt drawn on the {plane} plane lies outside {where} (slice {position} of "
                         f"0..{volume.shape[axis] - 1}).", hint="Draw it on a slice inside it.")
    return position


def to_grid(prompts: list[Prompt], volume: Volume, where: str = "the image") -> PromptSet:
    """The prompts on ``volume``'s voxel grid; geometry outside it is an InputError naming ``where``."""
    out = PromptSet(targets=targets_of(prompts))
    extent = np.asarray(volume.shape, float) - 0.5
    for p in prompts:
        if isinstance(p, TextPrompt):
            out.texts.append(p.text)
        elif isinstance(p, BoxPrompt):
            lo, hi = np.asarray(p.ras_min), np.asarray(p.ras_max)
            corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
            index = ras_to_index(volume, corners)
            start, stop = index.min(axis=0), index.max(axis=0)
            if np.any(stop < -0.5) or np.any(start > extent):
                raise InputError(f"The box for {p.target!r} does not overlap {where}.",
                                 hint="Draw the box inside it.")
            start, stop = np.maximum(start, -0.5), np.minimum(stop, extent)
            slice_index = _slice_of(volume, p.plane, (start + stop) / 2, where)
            out.boxes.append(GridBox(p.target, tuple(map(float, start)), tuple(map(float, stop)), p.plane,
                                     slice_index))
        elif isinstance(p, PointPrompt):
            index = ras_to_index(volume, p.ras)
            if np.any(index < -0.5) or np.any(index > extent):
                raise InputError(f"A point for {p.target!r} at RAS {list(p.ras)} lies outside {where}.",
                                 hint="Click inside it.")
            out.points.append(GridPoint(p.target, tuple(map(float, index)), p.include, p.plane,
                                        _slice_of(volume, p.plane, index, where)))
        elif isinstance(p, MaskPrompt):
            if p.mask.shape != volume.shape:
                raise InputError(f"The mask prompt for {p.target!r} has shape {p.mask.shape}, but the image is "
                                 f"{volume.shape} (k, j, i).", hint="Use a segment of this image.")
            out.masks.append(GridMask(p.target, np.asarray(p.mask, bool)))
    return out


def crop_prompts(prompts: list[Prompt], box) -> list[Prompt]:
    """Mask prompts cut to a crop box (``geometry.Crop``); other prompts are in patient space already."""
    if box is None:
        return list(prompts)
    return [MaskPrompt(np.ascontiguousarray(p.mask[box.slices]), p.target) if isinstance(p, MaskPrompt) else p
            for p in prompts]
