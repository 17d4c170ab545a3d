"""A backend whose behaviour the tests choose, to exercise the worker's failure paths.

Every mode does real work on the volume it receives (so geometry and transport are
checked), then slows down, crashes, hangs, prints or runs out of memory as asked.
"""
import os
import signal
import sys
import time

import numpy as np


class TestBackend:
    model_id = "test-model"

    def __init__(self, device="cpu", weights=None):
        self.device = device

    @staticmethod
    def sphere(volume, centre, radius):
        """Voxels within ``radius`` mm of RAS ``centre`` and with RAS x > 0 (cut by the plane x = 0)."""
        ras = volume.ras_of_voxels()
        inside = np.linalg.norm(ras - np.asarray(centre), axis=-1) < radius
        return (inside & (ras[..., 0] > 0)).astype(np.float32)

    def predict(self, volume, prompts, *, progress, cancelled, options):
        mode = options.get("mode", "sphere")
        steps = int(options.get("steps", 4))
        step_s = float(options.get("step_s", 0.0))
        if mode == "oom" and (options.get("always_oom") or int(options.get("batch_size", 1)) > 2):
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        if mode == "error":
            raise ValueError("simulated bug in a backend")
        for step in range(steps):
            if mode != "ignore_cancel" and cancelled():
                from biomedseg.errors import CancelledError

                raise CancelledError("Segmentation was cancelled; nothing was written.")
            progress("working", step, steps)
            if mode == "crash" and step == int(options.get("crash_at", 1)):
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
        centre = options.get("centre", volume.ras_of_voxels().reshape(-1, 3).mean(axis=0).tolist())
        radius = float(options.get("radius", 6.0))
        mask = self.sphere(volume, centre, radius)
        out = {}
        for i, p in enumerate(prompts):
            out[p] = mask if i == 0 else (volume.array > np.median(volume.array)).astype(np.float32)
        return out
