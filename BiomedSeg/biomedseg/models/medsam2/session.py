"""A MedSAM2 session: one image kept warm, each target an object tracked through its frames.

What is kept, and why:
- the frames of the volume (windowed uint8, display orientation) for the plane in use;
- the image features of every slice encoded so far, in the backend's ``SliceFeatureCache`` (``runtime.slice_features``) (keyed
  by the frame's pixels, so a new session or another slice range over the same slices
  reuses them; bounded in bytes, least recently used out first, recomputed on a miss);
- per target, the object's video state (conditioning frames, memories, logits).

A run sends a target's prompts in full (the box, then every click so far). When every prompt
it had is still among the new ones, only the added ones are applied, as corrections: the model
recomputes just the frames between the corrected frame and its neighbouring conditioning
frames (``ObjectVideo.correct``). Anything else (an undone click, another plane or range) starts
the target again from its prompts, on the features already computed.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from biomedseg.errors import CancelledError, InputError
from biomedseg.prompts import PromptSet
from biomedseg.results import ModelOutput
from biomedseg.volume import Volume

from .framing import FramePrompt, Framing, TargetFrames, grouped, plane_of, target_frames
from .preprocess import window_to_uint8


@dataclass
class TrackedTarget:
    frames: TargetFrames
    video: object
    keys: list


def prompt_arguments(items: list[FramePrompt], masks: dict) -> list[dict]:
    """The ``add_prompt``/``correct`` calls for one frame's prompts: a mask first (alone, as the
    authors' add_new_mask), then the box and the clicks together."""
    calls = [{"mask": masks[p.mask_key]} for p in items if p.kind == "mask"]
    boxes = [p.box for p in items if p.kind == "box"]
    points = [p for p in items if p.kind == "point"]
    if len(boxes) > 1:
        raise InputError(f"Frame {items[0].frame} has {len(boxes)} boxes for one object.",
                         hint="Draw one box per slice for each object; add points to correct it.")
    if boxes or points:
        call = {"box": boxes[0] if boxes else None}
        if points:
            call["points"] = np.array([p.point for p in points], dtype=np.float32)
            call["labels"] = np.array([1 if p.include else 0 for p in points], dtype=np.int32)
        calls.append(call)
    return calls


def new_prompts(old_keys: list, prompts: list[FramePrompt]) -> list[FramePrompt] | None:
    """The prompts added since ``old_keys`` when every old prompt is still there (the engine hands prompts
    over grouped by kind, so a click after a segment or a box after clicks still reads as an addition);
    None when something was taken back or changed."""
    remaining = Counter(old_keys)
    added: list[FramePrompt] = []
    for p in prompts:
        if remaining[p.key()] > 0:
            remaining[p.key()] -= 1
        else:
            added.append(p)
    if +remaining:  # an old prompt is gone
        return None
    return added or None


class MedSAM2Session:
    """The backend's ``Session`` for one (cropped) volume."""

    def __init__(self, backend, volume: Volume, plan):
        self.backend, self.volume = backend, volume
        self.details = plan.details
        self.framings: dict[str, tuple[Framing, object]] = {}
        self.targets: dict[str, TrackedTarget] = {}

    def _frames(self, plane: str):
        """(framing, frame store over the windowed uint8 frames) of ``plane``, made once per session."""
        if plane not in self.framings:
            framing = Framing(self.volume, plane)
            lo, hi = self.details["window"]
            grey = np.ascontiguousarray(window_to_uint8(framing.frames_of(self.volume.array), lo, hi))
            store = self.backend.frame_store(grey)
            self.framings[plane] = (framing, store)
        return self.framings[plane]

    def run(self, prompts: PromptSet, plan, *, progress, cancelled) -> ModelOutput:
        import torch

        self.details = plan.details
        self.backend._settle(plan)
        with torch.inference_mode():
            return self._run(prompts, progress, cancelled)

    def _run(self, prompts: PromptSet, progress, cancelled) -> ModelOutput:
        out: dict[str, np.ndarray] = {}
        report = {"window": self.details["window_rule"], "memory": self.details["memory"], "targets": {}}
        for target in prompts.targets:
            plane = plane_of(prompts, target, self.details["plane"])
            framing, store = self._frames(plane)
            wanted = target_frames(framing, prompts, target, mask_as=self.details["mask_prompt"],
                                   mask_key_frames=self.details["key_slices"], margin=self.details["margin"])
            encoded_before = self.backend.encodings(store)
            try:
                recomputed, how = self._apply(target, wanted, store, progress, cancelled)
            except CancelledError:
                self.targets.pop(target, None)  # half-propagated: start again next time
                raise
            tracked = self.targets[target]
            stack = np.zeros((framing.n_frames, framing.height, framing.width), dtype=bool)
            for frame, logits in tracked.video.logits.items():
                if wanted.lo <= frame <= wanted.hi:
                    stack[frame] = np.asarray(logits) > 0
            out[target] = framing.to_volume(stack).astype(np.float32)
            conditioning = sorted({p.frame for p in wanted.prompts})
            report["targets"][target] = {
                "plane": plane, "how": how, "frames": [wanted.lo, wanted.hi],
                "conditioning_frames": conditioning, "recomputed_frames": len(recomputed),
                "slices_encoded": self.backend.encodings(store) - encoded_before,
                "object_scores": {int(k): round(float(v), 4) for k, v in tracked.video.object_scores.items()
                                  if k in conditioning}}
        report["feature_cache"] = self.backend.features.describe()
        return ModelOutput(out, report=report)

    def _apply(self, target: str, wanted: TargetFrames, store, progress, cancelled):
        """Bring the target's video state to ``wanted``: corrections when every old prompt is kept on the
        same plane and range (``new_prompts``), else a fresh object."""
        keys = wanted.keys()
        known = self.targets.get(target)
        same_frames = (known is not None and known.frames.plane == wanted.plane
                       and (known.frames.lo, known.frames.hi) == (wanted.lo, wanted.hi))
        if known is not None:  # this job's progress and cancel, not the one that made the video
            known.video.progress, known.video.cancelled = progress, cancelled
        if same_frames and keys == known.keys:
            return set(), "unchanged"
        added = new_prompts(known.keys, wanted.prompts) if same_frames else None
        if added:
            recomputed: set[int] = set()
            for frame, items in grouped(added).items():
                for call in prompt_arguments(items, wanted.masks):
                    recomputed |= set(known.video.correct(frame, **call))
                recomputed.add(frame)
            known.frames, known.keys = wanted, keys
            return recomputed, "corrected"
        video = self.backend.new_video(store, cancelled=cancelled, progress=progress)
        for frame, items in grouped(wanted.prompts).items():
            for call in prompt_arguments(items, wanted.masks):
                video.add_prompt(frame, **call)
        recomputed = set(video.propagate(wanted.lo, wanted.hi))
        self.targets[target] = TrackedTarget(wanted, video, keys)
        return recomputed, "propagated"

    def close(self) -> None:
        self.targets.clear()
        self.framings.clear()
