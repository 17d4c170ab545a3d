"""Model 'unibiomed-standin': UniBiomed's own adapter (framing, window, the 5 language-model slices, the
requests, answer parsing, restacking) around a stand-in for the remote code's ``predict_forward``, so the
whole path can be checked through a real worker without a GPU or the weights.

The stand-in answers from what it is shown. Each frame's darkest grey level is its *code* (the test
volumes give every slice its own background level below 128) and pixels at or above 128 are *bright*:

* masks: ``bright`` per frame for the first [SEG]; the top-left quarter of every frame (anterior and
  patient-right in the axial view) for a second one;
* the answer names the codes of the first 5 frames (what the authors' language model reads), so it is
  the same for every pass that starts with the same 5 frames;
* a video whose frames are not the 5 language frames followed by one contiguous run up or down the
  stack is answered with "BAD VIDEO ..." and no masks (the adapter then reports the passes disagree);
* segment prompts "nothing", "empty", "twice", "malformed" and "wrong shape" give an answer without
  [SEG], an empty answer, two [SEG], two [SEG] with one mask, and a mask of the wrong size.
"""
from __future__ import annotations

import numpy as np

from biomedseg.models.unibiomed.backend import UniBiomedBackend
from biomedseg.models.unibiomed.frames import LANGUAGE_FRAMES

BRIGHT = 128


def _video_ok(codes: list[int]) -> bool:
    """The first frames step evenly through the stack (either way), the rest go on from one end of them."""
    first, rest = codes[:LANGUAGE_FRAMES], codes[LANGUAGE_FRAMES:]
    steps = set(np.diff(first).tolist())
    if len(steps) > 1 or 0 in steps:
        return False
    if not rest:
        return True
    step = steps.pop() if steps else None
    if step is None:
        return False
    up = [first[-1] + step * (n + 1) for n in range(len(rest))]
    down = [first[0] - step * (n + 1) for n in range(len(rest))]
    return rest in (up, down)


def predict_forward(image=None, video=None, text=None, **_):
    frames = [np.asarray(f) for f in ([image] if video is None else video)]
    assert all(f.dtype == np.uint8 and f.ndim == 3 and f.shape[2] == 3 for f in frames), "frames must be RGB uint8"
    assert len({f.shape for f in frames}) == 1, "frames of one video must share a size"
    assert text.startswith("<image>"), text
    codes = [int(f[..., 0].min()) for f in frames]
    if not _video_ok(codes):
        return {"prediction": f"BAD VIDEO {codes}", "prediction_masks": []}
    h, w = frames[0].shape[:2]
    bright = np.stack([f[..., 0] >= BRIGHT for f in frames])
    corner = np.zeros_like(bright)
    corner[:, :h // 2, :w // 2] = True
    seen = " ".join(map(str, codes[:LANGUAGE_FRAMES]))
    if "Please segment" in text:
        target = text.split("Please segment ", 1)[1][:-1]
        if target == "nothing":
            return {"prediction": "There is no such structure here.<|im_end|>", "prediction_masks": []}
        if target == "empty":
            return {"prediction": "", "prediction_masks": []}
        if target == "twice":
            return {"prediction": "Sure, [SEG] and [SEG].<|im_end|>", "prediction_masks": [bright, corner]}
        if target == "malformed":
            return {"prediction": "Sure, [SEG] [SEG].<|im_end|>", "prediction_masks": [bright]}
        if target == "wrong shape":
            return {"prediction": "Sure, [SEG].<|im_end|>", "prediction_masks": [bright[:, :-1]]}
        return {"prediction": f"Sure, [SEG]. Seen: {seen}.<|im_end|>", "prediction_masks": [bright]}
    if "empty answer please" in text:
        return {"prediction": "<|im_end|>", "prediction_masks": []}
    return {"prediction": f"<p> bright blob </p> [SEG] lies beside <p> the corner </p> [SEG]. Seen: {seen}.<|im_end|>",
            "prediction_masks": [bright, corner]}


class StandInUniBiomed(UniBiomedBackend):
    """UniBiomed's plan and run with ``predict_forward`` above; no ranking (the middle, or the chosen slice)."""

    REQUIRED_DEVICE = None

    def load(self, context):
        self.phrase_masks = int(context.entry.get("phrase_masks", 8))
        self.predict = predict_forward
        self.loaded = {"revision": "stand-in", "language_frames": LANGUAGE_FRAMES}

    def rank_slice(self, volume, target, details):
        return None, "the stand-in ranks nothing"
