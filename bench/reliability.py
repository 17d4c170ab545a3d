#!/usr/bin/env python
"""The worker's reliability figures: cancel time to idle, hang detection time, fuzzed lines survived.

* cancel: ``--cancels`` cancels at random moments (seeded) of the test backend (short steps),
  deepbet on Colin27 (TorchScript: the grace kill stops it) and Hermes-R with deterministic
  weights (stopped inside its forward passes, the worker stays warm), each with a job queued
  behind it that must finish; time from ``cancel()`` to the job having ended.
* hang: SIGSTOP the worker in the middle of a job, ``--hangs`` times; time until the client
  gives up on it (no heartbeat for ``HANG_AFTER_S``).
* fuzz: the Hypothesis fuzzer of Testing/test_worker_attacks.py with ``--fuzz`` cases.

    python bench/reliability.py [--cancels 100] [--hangs 5] [--fuzz 5000]
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, load_detweights

sys.path.insert(0, str(ROOT / "Testing"))
COLIN = Path("/usr/share/mricron/templates/ch2.nii.gz")


def cancels(n: int) -> None:
    import numpy as np
    import torch

    from cancel_timing import cancel_at, percentile

    from biomedseg.io import read_volume
    from biomedseg.models.hermes.network import build_hermes_r
    from biomedseg.volume import Volume
    from biomedseg.worker.client import CANCEL_GRACE_S, WorkerClient

    net = build_hermes_r()
    load_detweights().fill_module(net)
    checkpoint = Path(tempfile.mkdtemp()) / "hermes_r.pth"
    torch.save({"epoch": 0, "model_state_dict": net.state_dict(), "ema_model_state_dict": None}, checkpoint)
    colin = read_volume(COLIN)
    ct = Volume((np.random.default_rng(0).standard_normal((40, 64, 64)) * 300).astype(np.int16),
                np.diag([1.5, 1.5, 1.5, 1.0]), meta={"modality": "CT"})
    small = Volume(np.zeros((8, 9, 10), np.int16), np.eye(4))
    client = WorkerClient()
    jobs = {"test-model": lambda: client.submit(small, "test-model", ["t"], options={"steps": 40, "step_s": 0.05}),
            "deepbet": lambda: client.submit(colin, "deepbet", ["brain"]),
            "hermes": lambda: client.submit(ct, "hermes", ["liver"], weights=str(checkpoint),
                                            options={"window": 64, "batch_size": 1})}
    rng, cases, durations = random.Random(7), [], {}
    try:
        for name, submit in jobs.items():
            client.wait(submit(), timeout=300)
            t0 = time.monotonic()
            client.wait(submit(), timeout=300)
            durations[name] = time.monotonic() - t0
        for i in range(n):
            name = list(jobs)[i % 3]
            cases.append(cancel_at(client, jobs[name], lambda: client.submit(small, "test-model", ["t"]),
                                   rng.uniform(0.0, 0.9 * durations[name]), name))
    finally:
        client.close()
    print(f"whole runs (s): " + ", ".join(f"{k} {v:.2f}" for k, v in durations.items()))
    print(f"cancel grace before a kill: {CANCEL_GRACE_S} s")
    for name in [*jobs, "all"]:
        chosen = [c for c in cases if c.idle_s is not None and name in (c.model, "all")]
        if not chosen:
            continue
        idle = [c.idle_s for c in chosen]
        kept = sum(c.worker_kept for c in chosen)
        print(f"cancel {name:10s} n={len(idle):3d}  p50 {percentile(idle, 50):.3f} s  p95 {percentile(idle, 95):.3f} s"
              f"  max {max(idle):.3f} s  worker kept warm {kept}/{len(idle)}")
    lost = [c for c in cases if not c.queued_done]
    print(f"queued jobs behind a cancel: {len(cases)}, lost: {len(lost)}")


def hangs(n: int) -> None:
    import numpy as np

    from biomedseg.errors import WorkerCrashedError
    from biomedseg.volume import Volume
    from biomedseg.worker.client import HANG_AFTER_S, WorkerClient

    small = Volume(np.zeros((8, 9, 10), np.int16), np.eye(4))
    client, found = WorkerClient(), []
    try:
        for _ in range(n):
            job = client.submit(small, "test-model", ["t"], options={"steps": 600, "step_s": 0.1})
            while job.done < 1:
                client.poll(timeout=0.05)
            os.kill(client.worker_pid, signal.SIGSTOP)
            t0 = time.monotonic()
            try:
                client.wait(job, timeout=120)
            except WorkerCrashedError:
                found.append(time.monotonic() - t0)
    finally:
        client.close()
    print(f"hang (SIGSTOP mid-job) found after: n={len(found)}, min {min(found):.2f} s, max {max(found):.2f} s "
          f"(limit {HANG_AFTER_S} s without a heartbeat)")


def fuzz(n: int) -> None:
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "pytest", str(ROOT / "Testing" / "test_worker_attacks.py"), "-q",
                          "-p", "no:cacheprovider", "-k", "fuzz"], capture_output=True, text=True,
                         env={**os.environ, "BIOMEDSEG_FUZZ_CASES": str(n)}, cwd=ROOT)
    status = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-300:]
    print(f"fuzz: {n} random lines, each followed by a ping answered within 1 s: {status} "
          f"({time.monotonic() - t0:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cancels", type=int, default=100)
    parser.add_argument("--hangs", type=int, default=5)
    parser.add_argument("--fuzz", type=int, default=5000)
    args = parser.parse_args()
    os.environ["BIOMEDSEG_EXTRA_MODELS"] = str(ROOT / "Testing" / "worker_models")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    if args.cancels:
        cancels(args.cancels)
    if args.hangs:
        hangs(args.hangs)
    if args.fuzz:
        fuzz(args.fuzz)


if __name__ == "__main__":
    main()
