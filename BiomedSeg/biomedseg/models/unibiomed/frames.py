"""From a volume to the slice 'videos' UniBiomed is given, and from its mask stacks back to the grid.

The frames are the slices of one plane in display orientation (MedSAM2's ``Framing``: transposes
and flips only, so the way back is exact), windowed to 8 bits and repeated into RGB; colour images
go in as they are.

The authors' ``predict_forward`` shows only the first ``LANGUAGE_FRAMES`` (5) frames of a video to
the language model, puts the ``[SEG]`` embedding on those frames, and lets SAM2 carry the mask
forward through the rest of the list. So the 5 frames are chosen first (``language_frames``:
centred on the target) and every request starts with them:

* ``forward``: the 5 frames, then the frames after them, upwards;
* ``backward``: the same 5 frames in the same order (the same language-model input, so the same
  answer), then the frames before them, downwards, nearest first;
* ``propagate='none'``: the 5 frames alone.

``restack`` puts each pass's masks on the frames it covered (the 5 shared frames from the forward
pass) and ``Framing.to_volume`` puts the stack back on the input grid.
"""
from __future__ import annotations

import numpy as np

from biomedseg.errors import InputError
from biomedseg.models.biomedclip.backend import crop_offset
from biomedseg.models.medsam2.framing import Framing
from biomedseg.volume import Volume

#: Frames the authors' remote code gives the language model (``if frame_idx < 5`` in predict_forward).
LANGUAGE_FRAMES = 5


def to_uint8(grey: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Grey levels 0..255 of ``grey`` in the window [lo, hi] (rounded, not stretched)."""
    return np.rint(np.clip((np.asarray(grey, np.float64) - lo) / (hi - lo), 0.0, 1.0) * 255.0).astype(np.uint8)


class Frames:
    """The display frames of ``volume`` along ``plane`` as uint8 RGB, made one at a time."""

    def __init__(self, volume: Volume, plane: str, window: tuple[float, float] | None):
        self.volume = volume
        self.framing = Framing(volume, plane)
        self.window = window
        self.display = self.framing.frames_of(volume.array)
        self.count = self.framing.n_frames
        self.offset = crop_offset(volume, self.framing.orientation.slice_axis)

    def rgb(self, frame: int) -> np.ndarray:
        """(H, W, 3) uint8 of one frame."""
        one = self.display[frame]
        if self.volume.channels_last:
            one = one[..., :3] if one.shape[-1] >= 3 else np.repeat(one[..., :1], 3, axis=-1)
            return np.ascontiguousarray(one if one.dtype == np.uint8 else np.clip(one, 0, 255).astype(np.uint8))
        lo, hi = self.window
        return np.repeat(to_uint8(one, lo, hi)[..., None], 3, axis=-1)

    def image(self, frame: int):
        from PIL import Image

        return Image.fromarray(self.rgb(frame), "RGB")

    def slice_number(self, frame: int) -> int:
        """The whole image's array index along the plane's axis of a frame (what --slice-range counts)."""
        local = self.framing.orientation.display_slice_index(int(frame), self.count)
        return local + self.offset

    def frame_of_slice_number(self, number: int) -> int:
        local = int(number) - self.offset
        if not 0 <= local < self.count:
            first, last = self.offset, self.offset + self.count - 1
            raise InputError(f"Slice {number} is outside the slices UniBiomed was given ({first}-{last}).",
                             hint="Choose a slice inside the slice range, or leave the 'slices' option at 'auto'.")
        return self.framing.frame_of_slice(local)

    def to_volume(self, stack: np.ndarray) -> np.ndarray:
        return self.framing.to_volume(stack)


def language_frames(count: int, centre: int, n: int = LANGUAGE_FRAMES) -> list[int]:
    """``n`` consecutive frames around ``centre`` (shifted inwards at the ends of the stack), in order."""
    n = max(1, min(int(n), count))
    start = int(np.clip(int(centre) - n // 2, 0, count - n))
    return list(range(start, start + n))


def videos(count: int, first: list[int], propagate: str) -> list[tuple[str, list[int]]]:
    """(pass name, frame order) of each request: the language-model frames first in every one. The
    first pass gives the answer; a pass that would add no frame is not made."""
    after = list(range(first[-1] + 1, count))
    before = list(range(first[0] - 1, -1, -1))
    if propagate == "none" or not (after or before):
        return [("language frames", list(first))]
    out = [("forward", first + after)] if after or propagate == "forward" else []
    if propagate == "both" and before:
        out.append(("backward", first + before))
    return out


def restack(shape: tuple, passes: list[tuple[list[int], list[np.ndarray]]], n_first: int, masks: int) -> list[np.ndarray]:
    """Per [SEG] index, a (frames, H, W) bool stack from the passes' (frame order, mask stacks).

    The frames shared by every pass (the language-model frames) come from the first pass; each other
    frame from the pass that covered it. A pass with fewer masks than the first leaves its frames empty."""
    out = [np.zeros(shape, bool) for _ in range(masks)]
    for p, (order, stacks) in enumerate(passes):
        frames = order if p == 0 else order[n_first:]
        offset = 0 if p == 0 else n_first
        for k in range(min(masks, len(stacks))):
            stack = stacks[k]
            for t, frame in enumerate(frames):
                out[k][frame] = stack[t + offset]
    return out


def check_masks(stacks, n_video: int, height: int, width: int) -> list[np.ndarray]:
    """``prediction_masks`` as bool arrays (n_video, H, W), or an error that says what came back."""
    from biomedseg.errors import BiomedSegError

    out = []
    for k, stack in enumerate(stacks or []):
        array = np.asarray(stack.cpu().numpy() if hasattr(stack, "cpu") else stack)
        if array.ndim == 2:
            array = array[None]
        if array.shape != (n_video, height, width):
            raise BiomedSegError(f"UniBiomed returned mask {k + 1} with shape {array.shape}, not ({n_video}, "
                                 f"{height}, {width}) for the {n_video} frame(s) it was given.",
                                 hint="The remote code is not the version this adapter expects; see the run "
                                      "report's remote-code check.")
        out.append(array.astype(bool))
    return out
