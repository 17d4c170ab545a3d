"""A toy box-prompted model that returns labels, not masks: is the box bright or dark?

It exists to prove that a model of a new kind is one folder: nothing else in the engine, the
worker, the CLI or the panel is edited for it. It counts the voxels it looked at, so a test
can check the engine put the box on the right voxels.
"""
import numpy as np

from biomedseg.errors import InputError
from biomedseg.models.base import Backend, Plan
from biomedseg.results import Label, ModelOutput

from .geometry import box_slices


class BoxLabels(Backend):
    def load(self, context):
        self.loaded_from = context.weights

    def plan(self, volume, prompts, options, *, plane="axial"):
        if options["low_percentile"] >= options["high_percentile"]:
            raise InputError("low_percentile must be below high_percentile.")
        return Plan(units="boxes", details=dict(options))

    def run(self, volume, prompts, plan, *, progress, cancelled):
        lo, hi = np.percentile(volume.array, [plan.details["low_percentile"], plan.details["high_percentile"]])
        labels, voxels = [], {}
        for n, box in enumerate(prompts.boxes):
            region = volume.array[box_slices(volume, box)]
            score = float(np.clip((region.mean() - lo) / max(hi - lo, 1e-9), 0, 1))
            if plan.details["broken_scores"]:
                score = float("nan")
            labels += [Label("bright", score, box.target), Label("dark", 1 - score, box.target)]
            voxels[box.target] = int(region.size)
            progress("looking in boxes", n + 1, len(prompts.boxes))
        return ModelOutput(labels=labels, report={"voxels": voxels})
