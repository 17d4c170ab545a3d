"""A toy interactive model: the session keeps an image 'embedding' (voxels above the median),
and each run combines it with the prompts only: inside the box (or the mask prompt), plus
balls around include clicks, minus balls around exclude clicks. It counts embeddings, so a
test can see that a click in an open session does not recompute the image's part."""
import numpy as np

from biomedseg.models.base import Backend, Plan
from biomedseg.results import ModelOutput


def ball(volume, index, radius_mm):
    ras = volume.ras_of_voxels()
    centre = volume.ijk_to_ras @ np.array([index[2], index[1], index[0], 1.0])
    return np.linalg.norm(ras - centre[:3], axis=-1) <= radius_mm


class ClickSessionState:
    def __init__(self, backend, volume):
        self.backend, self.volume = backend, volume
        self.embedding = volume.array > np.median(volume.array)
        backend.embeddings += 1
        self.runs = 0

    def run(self, prompts, plan, *, progress, cancelled):
        self.runs += 1
        out = {}
        for target in prompts.targets:
            parts = prompts.for_target(target)
            region = np.zeros(self.volume.shape, bool)
            for box in parts["boxes"]:
                lo = np.ceil(np.asarray(box.start)).astype(int)
                hi = np.floor(np.asarray(box.stop)).astype(int) + 1
                region[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
            for mask in parts["masks"]:
                region |= mask.mask
            mask = region & self.embedding
            for point in parts["points"]:
                near = ball(self.volume, point.index, plan.details["radius"])
                mask = (mask | near) if point.include else (mask & ~near)
            out[target] = mask.astype(np.float32)
        progress("clicks", 1, 1)
        return ModelOutput(out, report={"embeddings": self.backend.embeddings, "session_runs": self.runs})

    def close(self):
        self.embedding = None


class ClickSession(Backend):
    embeddings = 0

    def load(self, context):
        pass

    def plan(self, volume, prompts, options, *, plane="axial"):
        return Plan(units="prompts", details=dict(options))

    def open_session(self, volume, plan, *, progress, cancelled):
        return ClickSessionState(self, volume)

    def run(self, volume, prompts, plan, *, progress, cancelled):
        session = self.open_session(volume, plan, progress=progress, cancelled=cancelled)
        try:
            return session.run(prompts, plan, progress=progress, cancelled=cancelled)
        finally:
            session.close()
