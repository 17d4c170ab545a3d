"""The engine's backend for MedSAM2: a box, clicks or a segment in, one propagated mask out.

``plan`` settles what a run will do without the weights: each target needs a box, points or
a mask (text goes to BiomedParse or Hermes first; refine their segment here), the intensity
window (``runtime.windows``: the authors window each DeepLesion CT with the
lesion's own DICOM window; without that table, soft tissue for CT, percentiles otherwise), the plane each target is propagated along (the plane its prompts
were drawn on), the memory precision and the refine rules. ``load`` reads the authors'
``{'model': state_dict}`` checkpoint strictly with ``weights_only=True``. ``open_session``
keeps the image; each ``Session.run`` applies new prompts (``session``). ``run`` is a
one-off session.

Options (model.json): ``window``; ``memory`` ("bfloat16", the authors' code, which stores
every frame's memory features in bfloat16, or "float32"); ``cache_mb`` (the feature cache);
``mask_prompt`` ("box": a segment given as the prompt conditions through its bounding box on
its key slices, so the model redraws it; "mask": through the mask itself); ``key_slices``
and ``margin`` (how many slices of such a segment condition the model, and how far past its
extent to propagate).
"""
from __future__ import annotations

from biomedseg.errors import InputError
from biomedseg.models.base import Backend, LoadContext, Plan
from biomedseg.prompts import PromptSet
from biomedseg.volume import Volume

from biomedseg.runtime.slice_features import SliceFeatureCache
from biomedseg.runtime.windows import choose_window
from .framing import Framing, plane_of, target_frames

DEFAULT_CACHE_MB = 2048


class MedSAM2Backend(Backend):
    def __init__(self, device: str = "cpu"):
        super().__init__(device)
        self.net = self.tracker = None
        self.features = SliceFeatureCache(DEFAULT_CACHE_MB * 2 ** 20)

    # ---- plan ----------------------------------------------------------------------------
    def plan(self, volume: Volume, prompts: PromptSet, options: dict, *, plane: str = "axial") -> Plan:
        if prompts.texts:
            raise InputError("MedSAM2 takes a box, points or a segment, not text ("
                             + ", ".join(repr(t) for t in prompts.texts) + ").",
                             hint="Segment the target with BiomedParse or Hermes first, then refine that segment "
                                  "with MedSAM2 (biomedseg refine, or Refine selected segment in the panel).")
        if volume.channels_last:
            raise InputError("MedSAM2 here takes grey volumes; this image has colour channels.")
        lo, hi, rule = choose_window(volume, options.get("window"))
        details = {"window": (lo, hi), "window_rule": rule, "plane": plane,
                   "memory": options.get("memory") or "bfloat16",
                   "mask_prompt": options.get("mask_prompt") or "box",
                   "key_slices": int(options.get("key_slices") or 1),
                   "margin": int(3 if options.get("margin") is None else options["margin"]),
                   "cache_bytes": int((options.get("cache_mb") or DEFAULT_CACHE_MB) * 2 ** 20)}
        frames = {}
        for target in prompts.targets:  # checks every prompt now, before any weights
            framing = Framing(volume, plane_of(prompts, target, plane))
            wanted = target_frames(framing, prompts, target, mask_as=details["mask_prompt"],
                                   mask_key_frames=details["key_slices"], margin=details["margin"])
            frames[target] = {"plane": framing.plane, "frames": [wanted.lo, wanted.hi],
                              "conditioning_frames": sorted({p.frame for p in wanted.prompts})}
        return Plan(units="slices", details=details,
                    report={"window": rule, "intensity_window": [float(lo), float(hi)], "memory": details["memory"],
                            "targets": frames})

    # ---- weights -------------------------------------------------------------------------
    def load(self, context: LoadContext) -> None:
        from .network import load_checkpoint

        self.net = load_checkpoint(context.weights[0]).to(self.device).eval()
        self.tracker = self.make_tracker(self.net)

    def make_tracker(self, net):
        from .tracker import Tracker

        return Tracker(net)

    def modules(self) -> list:
        return [self.net] if self.net is not None else []

    def release(self) -> None:
        self.features.clear()

    # ---- frames and objects ---------------------------------------------------------------
    def encode(self, frame):
        """Image features of one normalised frame [1,3,512,512] on this device."""
        import torch

        with torch.inference_mode():
            return self.tracker.encode_image(frame.to(self.device))

    def frame_store(self, grey):
        """The frame store over ``grey`` (frame, row, column) uint8 frames of one plane."""
        from .preprocess import normalise, resize_rgb_512
        from .video import FrameStore

        def get_frame(index: int):
            return normalise(resize_rgb_512(grey[index]))

        def encode(frame):
            return self.features.get_or_encode(frame, self.encode)

        # The store's own cache is only per-index bookkeeping: the bounded one is ``self.features``.
        return FrameStore(get_frame, grey.shape[0], grey.shape[1:], encode, cache_bytes=0)

    def encodings(self, store) -> int:
        """Image-encoder runs so far (misses of the feature cache; the store's own count includes hits)."""
        return self.features.misses

    def new_video(self, store, *, cancelled, progress):
        from .video import ObjectVideo

        self.tracker.bf16_memory = self.current_memory == "bfloat16"
        return ObjectVideo(self.tracker, store, cancelled=cancelled, progress=progress)

    # ---- runs -----------------------------------------------------------------------------
    def open_session(self, volume: Volume, plan: Plan, *, progress, cancelled):
        from .session import MedSAM2Session

        self._settle(plan)
        return MedSAM2Session(self, volume, plan)

    def _settle(self, plan: Plan) -> None:
        self.features.limit_bytes = plan.details["cache_bytes"]
        self.current_memory = plan.details["memory"]

    def run(self, volume: Volume, prompts: PromptSet, plan: Plan, *, progress, cancelled):
        session = self.open_session(volume, plan, progress=progress, cancelled=cancelled)
        try:
            return session.run(prompts, plan, progress=progress, cancelled=cancelled)
        finally:
            session.close()

    current_memory = "bfloat16"
