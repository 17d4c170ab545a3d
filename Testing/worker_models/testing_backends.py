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


def intensity_net(threshold: float, slope: float = 20.0, mirror: bool = False, swap: bool = False):
    """Stand-in for Hermes-R: logit = slope * (threshold - x) for every task, so voxels whose
    preprocessed intensity is below ``threshold`` (a dark sphere) come out above 0.5.
    ``mirror`` / ``swap`` plant the bugs a geometry check has to catch."""
    import torch

    class IntensityNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.threshold, self.slope, self.mirror, self.swap = threshold, slope, mirror, swap
            self.calls = 0

        def forward(self, x, tgt_idx, mod_idx):
            self.calls += 1
            logit = self.slope * (self.threshold - x)
            if self.mirror:
                logit = torch.flip(logit, dims=(4,))
            if self.swap:
                logit = logit.transpose(2, 4)
            return logit.expand(-1, tgt_idx.shape[1], -1, -1, -1).contiguous(), torch.zeros(x.shape[0], 6)

    return IntensityNet()


def hermes_with(net, device="cpu"):
    """Hermes' own backend (prompt mapping, preprocessing, sliding windows, resampling back)
    around ``net`` instead of the trained network (no checkpoint needed)."""
    from biomedseg.models.hermes.backend import HermesBackend

    backend = HermesBackend.__new__(HermesBackend)
    backend.device, backend.net, backend.weights_path, backend.last_run = device, net, None, {}
    return backend


class HermesStandInBackend:
    """Model 'hermes-standin': the Hermes pipeline in a worker with ``intensity_net``, whose
    threshold (in preprocessed units) comes in ``options['threshold_z']``."""

    def __init__(self, device="cpu", weights=None):
        self.device = device

    def predict(self, volume, prompts, *, progress, cancelled, options):
        options = dict(options or {})
        backend = hermes_with(intensity_net(float(options.pop("threshold_z"))), self.device)
        return backend.predict(volume, prompts, progress=progress, cancelled=cancelled, options=options)
