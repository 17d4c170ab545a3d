"""The video state of ONE object over the frames of one volume plane: MedSAM2's 3D workflow.

API (what the backend codes against)::

    store = FrameStore(get_frame, n_frames, video_hw, encode, *, cache_bytes=2 * 1024**3)
        get_frame(idx) -> float32 tensor [3, 512, 512]: the normalised model input of frame idx
        video_hw: (H, W) of a frame in video pixels; encode: [1, 3, 512, 512] -> features
        (``Tracker.encode_image``). ``store.features(idx)`` is cached, least recently used
        out beyond ``cache_bytes`` (the most recent frame always stays), encoded again on a miss;
        ``store.encoded`` counts calls to ``encode``, ``store.bytes_per_frame`` the bytes one
        frame holds (position encodings are one shared copy, not counted).

    video = ObjectVideo(tracker, store, *, cancelled=lambda: False, progress=None)
    video.add_prompt(frame, *, box=None, points=None, labels=None, mask=None) -> logits (H, W)
    video.propagate(lo, hi) -> {frame: logits (H, W)} for the frames in [lo, hi] it holds
    video.correct(frame, *, points=None, labels=None, box=None, mask=None) -> {frame: logits}
    video.logits: {frame: float32 (H, W)}   video.object_scores: {frame: float}
    video.conditioning_frames: sorted list   video.range: (lo, hi) of the last propagate or None
    video.output(frame) -> tracker.FrameOutput or None (low-res logits, pointer, score, memory)

Prompts are in video pixels: box (x0, y0, x1, y1), x = column, y = row, as the authors'
``add_new_points_or_box``; points (n, 2) of (x, y) with labels 1 include / 0 exclude; mask (H, W)
bool (``add_new_mask``: the mask becomes the frame's output). A box replaces the frame's prompts
(box first, then any points given with it); points alone are added after the frame's earlier
points (a mask prompt is dropped); a mask replaces everything. When the frame already has an
output, points and boxes go in with its low-res logits as mask input, as the authors do.
Every prompted frame is a conditioning frame. A frame is decoded without memory (as the
authors' initial conditioning frame) unless it held a tracked output when it was first prompted:
then it, and every later click on it, is decoded as the authors decode a click on a tracked frame,
with the memory of the pass that tracked it (the other conditioning frames and the currently
tracked frames of that pass direction). Mask prompts never use memory (the mask is the output).

``propagate(lo, hi)``: the authors' ``medsam2_infer_3D_CT.py``. From the first conditioning
frame c0, a forward pass tracks every non-conditioning frame of (c0, hi] and then, after a reset
of the non-conditioning memory, a reverse pass tracks [lo, c0). Each pass attends to every
conditioning frame and to its own tracked frames only. Frames outside [lo, hi] are never tracked.
A new propagate forgets all earlier tracked frames.

``correct(frame, ...)`` after a propagate: ``frame`` gets the prompt (``add_prompt``) and is a
conditioning frame from then on. Let p / n be the conditioning frames just below / above it
(lo - 1 / hi + 1 of the last propagate when there is none). A forward pass from ``frame``
recomputes the frames strictly between ``frame`` and n, then a reverse pass those strictly between
p and ``frame``, each with a fresh non-conditioning memory (so each sees the conditioning frames
and its own frames only), never leaving [lo, hi]. No other frame changes: their memory banks do
not include the new conditioning frame until the next ``propagate``. Returns {frame and every
recomputed frame: logits}.

Progress: ``progress(stage, done, total)`` after every tracked frame, stage "MedSAM2: propagating"
or "MedSAM2: correcting"; ``cancelled()`` is checked before every tracked frame and raises
``CancelledError``; a cancelled propagate or correct leaves the object as it was before the call.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F

from biomedseg.errors import InputError
from biomedseg.runtime.callbacks import check_cancel
from biomedseg.runtime.slice_features import tensors_in as _tensors

from .network import IMAGE_SIZE
from .tracker import FrameOutput, MemoryBank, Prompt, Tracker

BOX_LABELS = (2, 3)  # top-left and bottom-right corner labels


class FrameStore:
    """Frames of one volume plane and their cached image features."""

    def __init__(self, get_frame, n_frames: int, video_hw: tuple[int, int], encode, *,
                 cache_bytes: int = 2 * 1024 ** 3):
        if int(n_frames) < 1:
            raise InputError(f"A MedSAM2 video needs at least one frame, got {n_frames}.")
        self.get_frame, self.encode = get_frame, encode
        self.n_frames = int(n_frames)
        self.video_hw = (int(video_hw[0]), int(video_hw[1]))
        self.cache_bytes = int(cache_bytes)
        self._cache: OrderedDict[int, tuple[dict, int]] = OrderedDict()
        self._shared_pos = None
        self.encoded = self.hits = self.bytes = self.bytes_per_frame = 0

    def __len__(self) -> int:
        return self.n_frames

    def check_index(self, idx) -> int:
        """``idx`` as an int, or InputError naming the valid range."""
        if isinstance(idx, bool) or not isinstance(idx, (int, np.integer)) or not 0 <= int(idx) < self.n_frames:
            raise InputError(f"Frame {idx!r} is not a frame of this video (0 .. {self.n_frames - 1}).")
        return int(idx)

    def features(self, idx: int) -> dict:
        """Features of frame ``idx``: cached, since they do not depend on prompts or memory and the
        encoder is most of the cost; encoded again if the frame was evicted."""
        idx = self.check_index(idx)
        found = self._cache.get(idx)
        if found is not None:
            self._cache.move_to_end(idx)
            self.hits += 1
            return found[0]
        frame = torch.as_tensor(self.get_frame(idx))
        if tuple(frame.shape[-3:]) != (3, IMAGE_SIZE, IMAGE_SIZE) or frame.ndim not in (3, 4):
            raise InputError(f"Frame {idx} is {tuple(frame.shape)}, "
                             f"not the [3, {IMAGE_SIZE}, {IMAGE_SIZE}] model input.")
        feats = self._share(self.encode(frame.reshape(1, 3, IMAGE_SIZE, IMAGE_SIZE)))
        self.encoded += 1
        shared = {id(t) for t in _tensors(self._shared_pos)}
        size = sum(t.element_size() * t.nelement() for t in _tensors(feats) if id(t) not in shared)
        self.bytes_per_frame = size
        self._cache[idx] = (feats, size)
        self.bytes += size
        while self.bytes > self.cache_bytes and len(self._cache) > 1:
            _, (_, dropped) = self._cache.popitem(last=False)
            self.bytes -= dropped
        return feats

    def _share(self, feats: dict) -> dict:
        """Position encodings do not depend on the image: keep one copy for all frames."""
        pos = feats.get("vision_pos_enc") if isinstance(feats, dict) else None
        if not pos:
            return feats
        if self._shared_pos is not None and len(self._shared_pos) == len(pos) and all(
                a.shape == b.shape and a.device == b.device and torch.equal(a, b)
                for a, b in zip(self._shared_pos, pos)):
            return {**feats, "vision_pos_enc": self._shared_pos}
        self._shared_pos = pos
        return feats

    def clear(self) -> None:
        self._cache.clear()
        self.bytes = 0


class ObjectVideo:
    """One object tracked through a ``FrameStore`` by a ``Tracker`` (see the module docstring)."""

    def __init__(self, tracker: Tracker, store: FrameStore, *, cancelled=lambda: False, progress=None):
        self.tracker, self.store = tracker, store
        self.cancelled, self.progress = cancelled, progress
        self.bf16_memory = tracker.bf16_memory  # fixed per object: its stored memories use it
        self.logits: dict[int, np.ndarray] = {}
        self.object_scores: dict[int, float] = {}
        self.range: tuple[int, int] | None = None
        self._prompts: dict[int, Prompt | torch.Tensor] = {}
        self._cond: dict[int, FrameOutput] = {}
        self._tracked: dict[int, tuple[bool, FrameOutput]] = {}  # frame -> (reverse pass?, output)
        self._memory_dir: dict[int, bool] = {}  # prompted frames decoded with memory -> their pass direction

    @property
    def conditioning_frames(self) -> list[int]:
        return sorted(self._cond)

    def output(self, frame: int) -> FrameOutput | None:
        """The frame's current model output (low-res logits, pointer, score, memory), if it has one."""
        tracked = self._tracked.get(frame)
        return self._cond.get(frame) or (tracked[1] if tracked is not None else None)

    # ---- prompts ---------------------------------------------------------------------------
    def add_prompt(self, frame: int, *, box=None, points=None, labels=None, mask=None) -> np.ndarray:
        """Make ``frame`` a conditioning frame with this prompt; its logits at video resolution."""
        frame = self.store.check_index(frame)
        prompt, mask_512 = self._build_prompt(frame, box, points, labels, mask)
        tracked = self._tracked.get(frame)
        direction = self._memory_dir.get(frame)
        if direction is None and tracked is not None and frame not in self._cond:
            direction = tracked[0]
        others = {t: out for t, out in self._cond.items() if t != frame}
        memory = None
        if direction is not None and others and mask_512 is None:
            self._ensure_cond_memory()
            recent = {t: out for t, (rev, out) in self._tracked.items() if rev == direction and t != frame}
            memory = MemoryBank(others, recent, direction)
        previous = self.output(frame)
        prev_logits = previous.pred_masks if (previous is not None and prompt is not None) else None
        out = self.tracker.track(frame, self.store.features(frame), n_frames=self.store.n_frames,
                                 memory=memory, prompt=prompt, mask=mask_512, prev_logits=prev_logits)
        self._prompts[frame] = prompt if prompt is not None else mask_512
        if direction is not None:
            self._memory_dir[frame] = direction
        self._cond[frame] = out
        self._tracked.pop(frame, None)
        self._keep(frame, out)
        return self.logits[frame]

    def _build_prompt(self, frame, box, points, labels, mask):
        """(Prompt in model pixels, None) or (None, [1, 1, 512, 512] mask) from video-pixel inputs."""
        if mask is not None:
            if box is not None or points is not None:
                raise InputError("Give a mask alone: a mask prompt replaces the frame's box and points.")
            return None, self._mask_to_model(mask)
        if (points is None) != (labels is None):
            raise InputError("Points and labels go together (one label, 1 include or 0 exclude, per point).")
        if points is None and box is None:
            raise InputError("A MedSAM2 prompt needs a box, points or a mask.")
        coords = torch.zeros(1, 0, 2)
        codes = torch.zeros(1, 0, dtype=torch.int32)
        if points is not None:
            pts = np.asarray(points, dtype=np.float32).reshape(-1, 2)
            lab = np.asarray(labels).reshape(-1)
            if len(lab) != len(pts) or not np.isfinite(pts).all() or not np.isin(lab, (0, 1)).all():
                raise InputError(f"Points need finite (x, y) pixels and one label 0 or 1 each "
                                 f"(got {len(pts)} points, labels {lab.tolist()}).")
            if box is None and len(pts) == 0:
                raise InputError("A MedSAM2 prompt needs a box, points or a mask (the point list is empty).")
            coords, codes = torch.from_numpy(pts)[None], torch.from_numpy(lab.astype(np.int32))[None]
        if box is not None:
            corners = np.asarray(box, dtype=np.float32).reshape(-1)
            if (corners.size != 4 or not np.isfinite(corners).all()
                    or corners[2] < corners[0] or corners[3] < corners[1]):
                raise InputError("A box is (x0, y0, x1, y1) with x0 <= x1 and y0 <= y1, "
                                 f"got {np.asarray(box).tolist()}.")
            coords = torch.cat([torch.from_numpy(corners).reshape(1, 2, 2), coords], dim=1)
            codes = torch.cat([torch.tensor([BOX_LABELS], dtype=torch.int32), codes], dim=1)
        h, w = self.store.video_hw
        coords = coords / torch.tensor([w, h]) * IMAGE_SIZE
        old = self._prompts.get(frame)
        if box is None and isinstance(old, Prompt):  # clicks add to the frame's earlier prompt
            coords = torch.cat([old.coords, coords], dim=1)
            codes = torch.cat([old.labels, codes], dim=1)
        return Prompt(coords, codes), None

    def _mask_to_model(self, mask) -> torch.Tensor:
        mask = np.asarray(mask)
        if mask.shape != self.store.video_hw:
            raise InputError(f"A mask prompt must be a frame, {self.store.video_hw}, got {mask.shape}.")
        m = torch.from_numpy(mask.astype(bool))[None, None].float()
        if m.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            m = F.interpolate(m, size=(IMAGE_SIZE, IMAGE_SIZE), align_corners=False, mode="bilinear", antialias=True)
            m = (m >= 0.5).float()
        return m

    # ---- propagation -----------------------------------------------------------------------
    def propagate(self, lo: int, hi: int) -> dict[int, np.ndarray]:
        """Forward from the first conditioning frame to ``hi``, then reverse to ``lo`` (module docstring)."""
        lo, hi = self._check_range(lo, hi)
        if not self._cond:
            raise InputError("Add a box, points or a mask on a slice before propagating.")
        self._ensure_cond_memory()
        c0 = min(self._cond)
        forward = [t for t in range(max(c0 + 1, lo), hi + 1) if t not in self._cond]
        reverse = [t for t in range(min(c0 - 1, hi), lo - 1, -1) if t not in self._cond]
        total = len(forward) + len(reverse)
        tracked: dict[int, tuple[bool, FrameOutput]] = {}
        done = self._run_pass(forward, False, tracked, "MedSAM2: propagating", 0, total)
        self._run_pass(reverse, True, tracked, "MedSAM2: propagating", done, total)
        # commit only now: a cancelled pass leaves the object as it was
        for t in self._tracked:
            self.logits.pop(t, None)
            self.object_scores.pop(t, None)
        self._tracked = {}
        self._commit(tracked)
        self.range = (lo, hi)
        return {t: self.logits[t] for t in range(lo, hi + 1) if t in self.logits}

    def correct(self, frame: int, *, points=None, labels=None, box=None, mask=None) -> dict[int, np.ndarray]:
        """Add or update conditioning frame ``frame`` and recompute the frames up to its neighbouring
        conditioning frames within the last propagate's range (module docstring)."""
        if self.range is None:
            raise InputError("Propagate the object before correcting it.")
        frame = self.store.check_index(frame)
        lo, hi = self.range
        saved = (dict(self._prompts), dict(self._cond), dict(self._tracked), dict(self._memory_dir),
                 dict(self.logits), dict(self.object_scores))
        try:
            self.add_prompt(frame, box=box, points=points, labels=labels, mask=mask)
            self._ensure_cond_memory()
            nxt = min((c for c in self._cond if c > frame), default=hi + 1)
            prv = max((c for c in self._cond if c < frame), default=lo - 1)
            forward = list(range(max(frame + 1, lo), min(nxt, hi + 1)))
            reverse = list(range(min(frame - 1, hi), max(prv, lo - 1), -1))
            total = len(forward) + len(reverse)
            tracked: dict[int, tuple[bool, FrameOutput]] = {}
            done = self._run_pass(forward, False, tracked, "MedSAM2: correcting", 0, total)
            self._run_pass(reverse, True, tracked, "MedSAM2: correcting", done, total)
        except BaseException:
            self._prompts, self._cond, self._tracked, self._memory_dir, self.logits, self.object_scores = saved
            raise
        self._commit(tracked)
        return {t: self.logits[t] for t in [frame, *sorted(tracked)]}

    # ---- internals -------------------------------------------------------------------------
    def _check_range(self, lo, hi) -> tuple[int, int]:
        lo, hi = self.store.check_index(lo), self.store.check_index(hi)
        if lo > hi:
            raise InputError(f"The frame range must run upwards, got {lo} .. {hi}.")
        return lo, hi

    def _ensure_cond_memory(self) -> None:
        """Encode the memory of conditioning frames that have none yet (the authors' pre-flight)."""
        for t in sorted(self._cond):
            out = self._cond[t]
            if out.maskmem_features is None:
                self.tracker.encode_prompted_memory(out, self.store.features(t), bf16_memory=self.bf16_memory)

    def _run_pass(self, frames, reverse: bool, into: dict, stage: str, done: int, total: int) -> int:
        """Track ``frames`` in order with a fresh non-conditioning memory; outputs go to ``into``."""
        recent: dict[int, FrameOutput] = {}
        for t in frames:
            check_cancel(self.cancelled, "MedSAM2 propagation")
            out = self.tracker.track(t, self.store.features(t), n_frames=self.store.n_frames,
                                     memory=MemoryBank(self._cond, recent, reverse), encode_memory=True,
                                     bf16_memory=self.bf16_memory)
            recent[t] = out
            into[t] = (reverse, out)
            done += 1
            if self.progress is not None:
                self.progress(stage, done, total)
        return done

    def _commit(self, tracked: dict) -> None:
        for t, (reverse, out) in tracked.items():
            self._tracked[t] = (reverse, out)
            self._keep(t, out)

    def _keep(self, frame: int, out: FrameOutput) -> None:
        logits = self.tracker.video_logits(out.pred_masks, self.store.video_hw)
        self.logits[frame] = np.array(logits.detach().cpu().numpy(), dtype=np.float32)  # a copy: callers may edit it
        self.object_scores[frame] = out.object_score
