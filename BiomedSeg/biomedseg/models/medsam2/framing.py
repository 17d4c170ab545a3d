"""From prompts on the volume's grid to prompts on MedSAM2's frames, and back.

MedSAM2 sees a volume as a video: the slices of one plane, in display orientation
(``SliceOrientation``), each frame H x W pixels. A box is (x0, y0, x1, y1) in frame pixels
(x = column, y = row; whole numbers are pixel centres, as the authors' box from a mask's
tight bounding box), a point is (x, y) with label 1 (include) or 0 (exclude), a mask prompt
is a frame-sized boolean array. Everything here is transposes, flips and index arithmetic:
no resampling, so the masks go back to the exact input grid (``to_volume``).

``FramePrompt`` is one frame's prompt; a target's prompts are a list of them, in the order
they were given, so a session can tell a correction (the old list plus new prompts) from a
new object.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from biomedseg.errors import InputError
from biomedseg.prompts import PromptSet
from biomedseg.volume import SliceOrientation, Volume


@dataclass(frozen=True)
class FramePrompt:
    """One prompt on one frame: ``kind`` box, point or mask."""

    frame: int
    kind: str
    box: tuple[float, float, float, float] | None = None
    point: tuple[float, float] | None = None
    include: bool = True
    #: for a mask prompt: a digest of its pixels (the pixels themselves are in ``TargetFrames.masks``)
    mask_key: str | None = None

    def key(self) -> tuple:
        return (self.frame, self.kind, self.box, self.point, self.include, self.mask_key)


@dataclass
class TargetFrames:
    """A target's prompts on the frames of one plane, and the frames to propagate over."""

    target: str
    plane: str
    prompts: list[FramePrompt] = field(default_factory=list)
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    #: propagation range, inclusive frame indices
    lo: int = 0
    hi: int = 0

    def keys(self) -> list[tuple]:
        return [p.key() for p in self.prompts]


class Framing:
    """The frames of ``volume`` along ``plane`` and the index maps between grid and frames."""

    def __init__(self, volume: Volume, plane: str):
        self.plane = plane
        self.orientation = SliceOrientation.for_plane(volume, plane)
        o = self.orientation
        self.n_frames = volume.shape[o.slice_axis]
        self.height = volume.shape[o.row_axis]
        self.width = volume.shape[o.col_axis]

    def frames_of(self, array: np.ndarray) -> np.ndarray:
        """(k, j, i) -> (frame, row, column), a view where numpy allows."""
        return self.orientation.to_display(array)

    def to_volume(self, frames: np.ndarray) -> np.ndarray:
        """Exact inverse of ``frames_of``."""
        return np.ascontiguousarray(self.orientation.from_display(frames))

    def frame_of_slice(self, slice_index: int) -> int:
        return self.orientation.display_slice_index(int(slice_index), self.n_frames)

    def _frame_coord(self, index, axis: int, flip: bool, size: int) -> float:
        value = float(index[axis])
        return (size - 1) - value if flip else value

    def xy(self, index) -> tuple[float, float]:
        """(x, y) frame pixels of a continuous (k, j, i) grid index."""
        o = self.orientation
        return (self._frame_coord(index, o.col_axis, o.flip_cols, self.width),
                self._frame_coord(index, o.row_axis, o.flip_rows, self.height))

    def frame_position(self, index) -> float:
        """Continuous frame position of a grid index along the slice axis."""
        o = self.orientation
        return self._frame_coord(index, o.slice_axis, o.flip_slices, self.n_frames)

    def box_xyxy(self, start, stop) -> tuple[float, float, float, float]:
        """A grid box's in-plane extent as (x0, y0, x1, y1) frame pixels, clipped to the frame."""
        (xa, ya), (xb, yb) = self.xy(start), self.xy(stop)
        x0, x1 = sorted((xa, xb))
        y0, y1 = sorted((ya, yb))
        clip = lambda v, size: float(min(max(v, 0.0), size - 1))  # noqa: E731
        return (clip(x0, self.width), clip(y0, self.height), clip(x1, self.width), clip(y1, self.height))


def mask_box(mask2d: np.ndarray) -> tuple[float, float, float, float]:
    """Tight bounding box (x0, y0, x1, y1) of a frame mask, inclusive pixel indices (the authors'
    box from a label, without their training-time jitter)."""
    rows, cols = np.nonzero(mask2d)
    return (float(cols.min()), float(rows.min()), float(cols.max()), float(rows.max()))


def key_frames(areas: np.ndarray, count: int) -> list[int]:
    """``count`` frames of a mask to condition on: the largest slice first, then frames spread
    evenly over the mask's extent (only frames where it has pixels)."""
    present = np.flatnonzero(areas > 0)
    chosen = [int(np.argmax(areas))]
    if count > 1 and len(present) > 1:
        for position in np.linspace(present[0], present[-1], count):
            nearest = int(present[np.argmin(np.abs(present - position))])
            if nearest not in chosen:
                chosen.append(nearest)
    return chosen[:max(1, count)]


def plane_of(prompts: PromptSet, target: str, default: str) -> str:
    """The plane a target is propagated along: the plane its 2D boxes and points were drawn on."""
    parts = prompts.for_target(target)
    planes = [p.plane for p in parts["boxes"] + parts["points"] if p.plane is not None]
    return planes[0] if planes else default


def target_frames(framing: Framing, prompts: PromptSet, target: str, *, mask_as: str = "box",
                  mask_key_frames: int = 1, margin: int = 3) -> TargetFrames:
    """A target's box, point and mask prompts on the frames, with the range to propagate over.

    The range is the whole stack, except for a 3D box (its own slice extent) and a mask prompt
    (the mask's extent plus ``margin`` frames each side), so refining a segment does not spill
    into slices it never touched."""
    parts = prompts.for_target(target)
    out = TargetFrames(target, framing.plane, lo=0, hi=framing.n_frames - 1)
    extents: list[tuple[int, int]] = []
    for box in parts["boxes"]:
        if box.plane is None:  # a 3D box: a 2D box on its middle frame, propagated over its extent
            a, b = sorted((framing.frame_position(box.start), framing.frame_position(box.stop)))
            first = int(np.clip(np.ceil(a - 1e-9), 0, framing.n_frames - 1))
            last = int(np.clip(np.floor(b + 1e-9), first, framing.n_frames - 1))
            extents.append((first, last))
            frame = (first + last) // 2
        elif box.plane != framing.plane:
            raise InputError(f"The prompts for {target!r} are drawn on more than one plane ({box.plane} and "
                             f"{framing.plane}).", hint="Draw a target's boxes and points on one plane; "
                                                         "MedSAM2 propagates along it.")
        else:
            frame = framing.frame_of_slice(box.slice)
        out.prompts.append(FramePrompt(frame, "box", box=framing.box_xyxy(box.start, box.stop)))
    for point in parts["points"]:
        frame = int(np.clip(np.floor(framing.frame_position(point.index) + 0.5), 0, framing.n_frames - 1))
        x, y = framing.xy(point.index)
        out.prompts.append(FramePrompt(frame, "point", point=(x, y), include=bool(point.include)))
    for mask in parts["masks"]:
        stack = framing.frames_of(mask.mask)
        areas = stack.reshape(stack.shape[0], -1).sum(axis=1)
        if not areas.any():
            raise InputError(f"The segment given as the prompt for {target!r} is empty.",
                             hint="Choose a segment with voxels in this image.")
        present = np.flatnonzero(areas)
        extents.append((max(0, int(present[0]) - margin), min(framing.n_frames - 1, int(present[-1]) + margin)))
        for frame in key_frames(areas, mask_key_frames):
            if mask_as == "box":
                out.prompts.append(FramePrompt(frame, "box", box=mask_box(stack[frame])))
            else:
                pixels = np.ascontiguousarray(stack[frame], dtype=bool)
                digest = f"{frame}:{hashlib.blake2b(pixels.tobytes(), digest_size=16).hexdigest()}"
                out.masks[digest] = pixels
                out.prompts.append(FramePrompt(frame, "mask", mask_key=digest))
    if not out.prompts:
        raise InputError(f"MedSAM2 needs a box, points or a mask for {target!r}.",
                         hint="Draw a box or click on the object; text prompts go to BiomedParse or Hermes first, "
                              "then refine their segment with MedSAM2.")
    if extents:
        out.lo = min(lo for lo, _ in extents)
        out.hi = max(hi for _, hi in extents)
        prompted = [p.frame for p in out.prompts]
        out.lo, out.hi = min(out.lo, *prompted), max(out.hi, *prompted)
    return out


def grouped(prompts: list[FramePrompt]) -> dict[int, list[FramePrompt]]:
    """Prompts by frame, frames in the order first prompted."""
    out: dict[int, list[FramePrompt]] = {}
    for p in prompts:
        out.setdefault(p.frame, []).append(p)
    return out
