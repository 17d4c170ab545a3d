"""A toy interactive model: the session keeps an image 'embedding' (voxels above the median), and
each run combines it with the prompts only. It counts embeddings, so a test can see that a click in
an open session does not recompute the image's part.

It also behaves like a propagating model (MedSAM2) frame by frame along the plane's slice axis, so
the panel's correction workflow can be tested without weights:

- 3D boxes and mask prompts give their own voxels; a 2D box (drawn on one slice) is propagated:
  every frame takes the in-plane rectangle of the nearest 2D box. The result is that area inside
  the embedding;
- a 3D click adds (include) or removes (exclude) a ball of ``radius`` mm; a 2D click on slice s
  adds or removes a disc of ``radius`` mm on the frames between its neighbouring conditioning
  slices (the slices of the other 2D boxes and clicks), as a corrective click propagates;
- a session keeps each target's frames: when the new prompts only add clicks to the ones it had,
  it recomputes just the frames between each new click's neighbouring conditioning slices (and the
  result is the same as computing every frame afresh). The report says how many it recomputed;
- ``delay`` seconds per computed frame, with progress and cancel between frames.
"""
import hashlib
import time

import numpy as np

from biomedseg.errors import CancelledError
from biomedseg.models.base import Backend, Plan
from biomedseg.results import ModelOutput


def ball(volume, index, radius_mm, ras=None):
    ras = volume.ras_of_voxels() if ras is None else ras
    centre = volume.ijk_to_ras @ np.array([index[2], index[1], index[0], 1.0])
    return np.linalg.norm(ras - centre[:3], axis=-1) <= radius_mm


def prompt_keys(parts) -> tuple:
    """What identifies a target's prompts: boxes and masks as a whole, clicks in order."""
    boxes = tuple((tuple(np.round(b.start, 4)), tuple(np.round(b.stop, 4)), b.plane, b.slice) for b in parts["boxes"])
    masks = tuple(hashlib.sha1(np.packbits(m.mask).tobytes()).hexdigest() for m in parts["masks"])
    points = tuple((tuple(np.round(p.index, 4)), p.include, p.plane, p.slice) for p in parts["points"])
    return boxes, masks, points


class TargetFrames:
    def __init__(self, keys, axis, shape):
        self.keys, self.axis = keys, axis
        self.mask = np.zeros(shape, bool)


class ClickSessionState:
    def __init__(self, backend, volume):
        self.backend, self.volume = backend, volume
        self.embedding = volume.array > np.median(volume.array)
        self.ras = volume.ras_of_voxels()
        backend.embeddings += 1
        self.runs = 0
        self.targets: dict[str, TargetFrames] = {}

    def _frame(self, f, axis, parts, conditioning, radius):
        """One frame of a target's mask, from its prompts (the whole definition of the toy's output)."""
        take = [slice(None)] * 3
        take[axis] = f
        take = tuple(take)
        region = np.zeros(self.volume.shape, bool)
        flat = [b for b in parts["boxes"] if b.plane is not None]
        for b in [b for b in parts["boxes"] if b.plane is None]:
            lo = np.ceil(np.asarray(b.start)).astype(int)
            hi = np.floor(np.asarray(b.stop)).astype(int) + 1
            region[tuple(slice(a, c) for a, c in zip(lo, hi))] = True
        if flat:
            b = min(flat, key=lambda b: abs(b.slice - f))  # the nearest drawn box, propagated to this frame
            lo = np.ceil(np.asarray(b.start)).astype(int)
            hi = np.floor(np.asarray(b.stop)).astype(int) + 1
            lo[axis], hi[axis] = f, f + 1
            region[tuple(slice(a, c) for a, c in zip(lo, hi))] = True
        for m in parts["masks"]:
            region |= m.mask
        out = region[take] & self.embedding[take]
        for p in parts["points"]:
            if p.plane is None:
                near = ball(self.volume, p.index, radius, self.ras[take])
            else:
                lo, hi = span(p.slice, conditioning, self.volume.shape[axis])
                if not lo <= f <= hi:
                    continue
                index = list(p.index)
                index[axis] = f  # a disc on this frame, under the click
                near = ball(self.volume, index, radius, self.ras[take])
            out = (out | near) if p.include else (out & ~near)
        return out

    def run(self, prompts, plan, *, progress, cancelled):
        self.runs += 1
        axis = self.volume.slice_orientation(plan.details.get("plane") or "axial").slice_axis
        n = self.volume.shape[axis]
        delay, radius = float(plan.details.get("delay", 0.0)), float(plan.details["radius"])
        out, report = {}, {}
        for target in prompts.targets:
            parts = prompts.for_target(target)
            keys = prompt_keys(parts)
            conditioning = sorted({b.slice for b in parts["boxes"] if b.plane is not None}
                                  | {p.slice for p in parts["points"] if p.plane is not None})
            known = self.targets.get(target)
            same = known is not None and known.axis == axis and known.keys[:2] == keys[:2]
            if same and known.keys == keys:
                frames, how = [], "unchanged"
            elif same and keys[2][:len(known.keys[2])] == known.keys[2]:
                frames = set()
                for p in parts["points"][len(known.keys[2]):]:
                    lo, hi = (0, n - 1) if p.plane is None else span(p.slice, conditioning, n)
                    frames |= set(range(lo, hi + 1))
                frames, how = sorted(frames), "corrected"
            else:
                known = TargetFrames(keys, axis, self.volume.shape)
                frames, how = list(range(n)), "propagated"
            self.targets.pop(target, None)  # kept again only once every frame it needs is computed
            for done, f in enumerate(frames):
                if cancelled():
                    raise CancelledError("Segmentation was cancelled; nothing was written.")
                if delay:
                    time.sleep(delay)
                take = [slice(None)] * 3
                take[axis] = f
                known.mask[tuple(take)] = self._frame(f, axis, parts, conditioning, radius)
                progress("frames", done + 1, len(frames))
            known.keys = keys
            self.targets[target] = known
            out[target] = known.mask.astype(np.float32)
            report[target] = {"how": how, "frames": [0, n - 1], "recomputed_frames": len(frames),
                              "recomputed_span": [frames[0], frames[-1]] if frames else None,
                              "conditioning_frames": conditioning}
        progress("clicks", 1, 1)
        return ModelOutput(out, report={"embeddings": self.backend.embeddings, "session_runs": self.runs,
                                        "targets": report})

    def close(self):
        self.embedding = None
        self.targets.clear()


def span(s, conditioning, n):
    """The frames a click on slice ``s`` reaches: up to (not onto) its neighbouring conditioning slices."""
    below = [c for c in conditioning if c < s]
    above = [c for c in conditioning if c > s]
    return (below[-1] + 1 if below else 0), (above[0] - 1 if above else n - 1)


class ClickSession(Backend):
    embeddings = 0

    def load(self, context):
        pass

    def plan(self, volume, prompts, options, *, plane="axial"):
        return Plan(units="prompts", details=dict(options, plane=plane))

    def open_session(self, volume, plan, *, progress, cancelled):
        return ClickSessionState(self, volume)

    def run(self, volume, prompts, plan, *, progress, cancelled):
        session = self.open_session(volume, plan, progress=progress, cancelled=cancelled)
        try:
            return session.run(prompts, plan, progress=progress, cancelled=cancelled)
        finally:
            session.close()
