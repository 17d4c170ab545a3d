"""A backend whose behaviour the tests choose, to exercise the worker's failure paths.

Every mode does real work on the volume it receives (so geometry and transport are
checked), then slows down, crashes, hangs, prints or runs out of memory as asked
($TEST_MODEL_LOAD_OOM: out of memory while loading).
"""
import os
import signal
import sys
import time

import numpy as np

from biomedseg.errors import CancelledError
from biomedseg.models.base import Backend, Plan
from biomedseg.results import ModelOutput


def sphere(volume, centre, radius):
    """Voxels within ``radius`` mm of RAS ``centre`` and with RAS x > 0 (cut by the plane x = 0)."""
    ras = volume.ras_of_voxels()
    inside = np.linalg.norm(ras - np.asarray(centre), axis=-1) < radius
    return (inside & (ras[..., 0] > 0)).astype(np.float32)


class TestBackend(Backend):
    __test__ = False  # not a pytest class

    def load(self, context):
        if os.environ.get("TEST_MODEL_LOAD_OOM"):
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB while loading (simulated)")
        self.weights = context.weights

    def plan(self, volume, prompts, options, *, plane="axial"):
        return Plan(batch_size=options["batch_size"] or 1, units="steps", details=dict(options))

    def run(self, volume, prompts, plan, *, progress, cancelled):
        options = plan.details
        mode, steps, step_s = options["mode"], options["steps"], options["step_s"]
        if mode == "oom" and (options["always_oom"] or plan.batch_size > 2):
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        if mode == "memory_error" and plan.batch_size > 1:
            raise MemoryError("Unable to allocate 40.0 GiB for an array with shape (100000, 100000) (simulated)")
        if mode == "error":
            raise ValueError("simulated bug in a backend")
        for step in range(steps):
            if mode != "ignore_cancel" and cancelled():
                raise CancelledError("Segmentation was cancelled; nothing was written.")
            progress("working", step, steps)
            if mode == "crash" and step == options["crash_at"]:
                os.kill(os.getpid(), signal.SIGKILL)
            if mode == "hang" and step == 1:
                import subprocess

                child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
                with open(options["child_pid_file"], "w") as f:
                    f.write(str(child.pid))
                time.sleep(3600)
            if mode == "print":
                print("noise on stdout that must not break the protocol {", flush=True)
                sys.stdout.write("more noise\n")
            time.sleep(step_s)
        progress("working", steps, steps)
        centre = options["centre"] or volume.ras_of_voxels().reshape(-1, 3).mean(axis=0).tolist()
        mask = sphere(volume, centre, options["radius"])
        out = {}
        for i, target in enumerate(prompts.targets):
            out[target] = mask if i == 0 else (volume.array > np.median(volume.array)).astype(np.float32)
        return ModelOutput(out, report={"mode": mode, "batch_size": plan.batch_size})
