"""MedSAM2's backend with a stand-in for the network, so the engine side (frames in display
orientation, prompts in frame pixels, sessions, corrections, the way back to the input grid)
can be tested exactly and fast.

The stand-in's logits are a known function of the prompts and of the frame it is shown:
+1 where a pixel centre lies inside the object's box *and* the frame's grey value is at least
128, -1 elsewhere, on every propagated frame; an include point sets its nearest pixel to +1 on
its own frame, an exclude point sets it to -1. A mask prompt is its own logits on its frame.
It counts frames "encoded" and the frames each call recomputes, as the real one does.
"""
import time

import numpy as np

from biomedseg.errors import CancelledError
from biomedseg.models.medsam2.backend import MedSAM2Backend


class StandInStore:
    def __init__(self, grey):
        self.grey, self.encoded, self.n_frames = grey, 0, grey.shape[0]
        self.video_hw = grey.shape[1:]
        self.seen = set()

    def frame(self, index):
        if index not in self.seen:
            self.seen.add(index)
            self.encoded += 1
        return self.grey[index]


class StandInVideo:
    def __init__(self, store, delay, cancelled, progress):
        self.store, self.delay, self.cancelled, self.progress = store, delay, cancelled, progress
        self.box = None
        self.clicks: dict[int, list] = {}
        self.masks: dict[int, np.ndarray] = {}
        self.conditioning: set[int] = set()
        self.logits: dict[int, np.ndarray] = {}
        self.object_scores: dict[int, float] = {}
        self.calls = []

    def _frame_logits(self, frame):
        h, w = self.store.video_hw
        if frame in self.masks:
            out = np.where(self.masks[frame], 1.0, -1.0).astype(np.float32)
        else:
            out = -np.ones((h, w), np.float32)
            if self.box is not None:
                x0, y0, x1, y1 = self.box
                yy, xx = np.mgrid[0:h, 0:w]
                inside = (xx >= x0 - 1e-6) & (xx <= x1 + 1e-6) & (yy >= y0 - 1e-6) & (yy <= y1 + 1e-6)
                out[inside & (self.store.frame(frame) >= 128)] = 1.0
        for (x, y), label in self.clicks.get(frame, []):
            out[int(np.floor(y + 0.5)), int(np.floor(x + 0.5))] = 1.0 if label else -1.0
        return out

    def _prompt(self, frame, box=None, points=None, labels=None, mask=None):
        if mask is not None:
            self.masks[frame] = np.asarray(mask, bool)
        if box is not None:
            self.box = tuple(box)
        for point, label in zip(points if points is not None else [], labels if labels is not None else []):
            self.clicks.setdefault(frame, []).append((tuple(point), int(label)))
        self.conditioning.add(frame)

    def add_prompt(self, frame, **prompt):
        self._prompt(frame, **prompt)
        self.logits[frame] = self._frame_logits(frame)
        self.object_scores[frame] = 1.0
        return self.logits[frame]

    def _visit(self, frames):
        out = {}
        for n, frame in enumerate(frames):
            if self.cancelled():
                raise CancelledError("Propagation was cancelled.")
            time.sleep(self.delay)
            self.logits[frame] = out[frame] = self._frame_logits(frame)
            self.object_scores.setdefault(frame, 1.0)
            self.progress("propagating", n + 1, len(frames))
        return out

    def propagate(self, lo, hi):
        self.range = (lo, hi)
        self.calls.append(("propagate", lo, hi))
        return self._visit(list(range(lo, hi + 1)))

    def correct(self, frame, **prompt):
        """Recomputes ``frame`` and the frames up to its neighbouring conditioning frames (exclusive)."""
        self._prompt(frame, **prompt)
        lo, hi = self.range
        before = [f for f in self.conditioning if f < frame]
        after = [f for f in self.conditioning if f > frame]
        first = max(before) + 1 if before else lo
        last = min(after) - 1 if after else hi
        self.calls.append(("correct", frame, first, last))
        return self._visit(list(range(first, last + 1)))


class StandInMedSAM2(MedSAM2Backend):
    videos = []

    def load(self, context):
        self.tracker = object()

    def plan(self, volume, prompts, options, *, plane="axial"):
        plan = super().plan(volume, prompts, options, plane=plane)
        plan.details["delay"] = float(options.get("delay") or 0.0)
        return plan

    def frame_store(self, grey):
        return StandInStore(grey)

    def encodings(self, store):
        return store.encoded

    def new_video(self, store, *, cancelled, progress):
        video = StandInVideo(store, self.current_delay, cancelled, progress)
        type(self).videos.append(video)
        return video

    def _settle(self, plan):
        super()._settle(plan)
        self.current_delay = plan.details.get("delay", 0.0)

    def modules(self):
        return []
