"""Cancel within a second, at any moment of any stage, without losing the queued job.

Thirty cancels at random moments (seeded) across three models through one client: the test
backend (short steps), deepbet (its two TorchScript networks cannot be interrupted: the grace
kill stops them, and the job queued behind is sent to a fresh worker) and Hermes-R with
deterministic weights (its forward passes stop inside, through the engine's hooks, so the
worker and its warm model stay). The time from ``cancel()`` to the job having ended is the
time a person waits; its 95th percentile must be under 1 s.
"""
from __future__ import annotations

import os
import random
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from biomedseg.volume import Volume  # noqa: E402
from cancel_timing import cancel_at, percentile  # noqa: E402
from conftest import load_detweights, worker_test_models  # noqa: E402


@pytest.fixture(scope="module")
def hermes_checkpoint(tmp_path_factory):
    from biomedseg.models.hermes.network import build_hermes_r

    net = build_hermes_r()
    load_detweights().fill_module(net)
    path = tmp_path_factory.mktemp("hermes") / "hermes_r.pth"
    torch.save({"epoch": 0, "model_state_dict": net.state_dict(), "ema_model_state_dict": None}, path)
    return path


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("BIOMEDSEG_TIMING_TESTS") != "1",
                    reason="a timing measurement, about 70 s on 2 CPU cores (bench/reliability.py measures 100 "
                           "cancels): set BIOMEDSEG_TIMING_TESTS=1; CI checks cancel and the queue in test_worker.py")
def test_cancel_p95_under_a_second_and_no_queued_job_lost(colin_path, hermes_checkpoint):
    from biomedseg.io import read_volume
    from biomedseg.worker.client import WorkerClient

    rng = random.Random(20261201)
    colin = read_volume(colin_path)
    ct = Volume((np.random.default_rng(0).standard_normal((40, 64, 64)) * 300).astype(np.int16),
                np.diag([1.5, 1.5, 1.5, 1.0]), meta={"modality": "CT"})
    small = Volume(np.zeros((8, 9, 10), np.int16), np.eye(4))
    hermes_options = {"window": 64, "batch_size": 1}
    with worker_test_models():
        client = WorkerClient()
        try:
            jobs = {
                "test-model": lambda: client.submit(small, "test-model", ["t"], options={"steps": 40, "step_s": 0.05}),
                "deepbet": lambda: client.submit(colin, "deepbet", ["brain"]),
                "hermes": lambda: client.submit(ct, "hermes", ["liver"], weights=str(hermes_checkpoint),
                                                options=hermes_options),
            }
            durations = {}
            for name, submit in jobs.items():  # warm, then time one whole run of each
                client.wait(submit(), timeout=300)
                t0 = time.monotonic()
                client.wait(submit(), timeout=300)
                durations[name] = time.monotonic() - t0
            # 30 cancels: 18 in the controllable model's steps, 4 inside deepbet's TorchScript (each one costs a
            # worker restart), 8 inside Hermes' windows (bench/reliability.py measures 100)
            cases, wanted = [], {"test-model": 18, "deepbet": 4, "hermes": 8}
            for name, n in wanted.items():
                landed = 0
                for _ in range(3 * n):
                    if landed == n:
                        break
                    case = cancel_at(client, jobs[name], lambda: client.submit(small, "test-model", ["t"]),
                                     rng.uniform(0.0, 0.9 * durations[name]), name)
                    cases.append(case)
                    landed += case.idle_s is not None
        finally:
            client.close()
    idle = [c.idle_s for c in cases if c.idle_s is not None]
    p95 = percentile(idle, 95)
    print(f"cancels: {len(idle)}, p50 {percentile(idle, 50):.3f} s, p95 {p95:.3f} s, max {max(idle):.3f} s; "
          f"whole runs {durations}")
    assert len(idle) >= 30
    assert p95 < 1.0, sorted(idle)[-5:]
    assert all(c.queued_done for c in cases), [c for c in cases if not c.queued_done]
    stages = {c.stage for c in cases if c.idle_s is not None and c.model == "deepbet"}
    assert len(stages) >= 2, stages  # cancels landed in more than one stage
    hermes = [c for c in cases if c.model == "hermes" and c.idle_s is not None]
    assert sum(c.worker_kept for c in hermes) >= 0.8 * len(hermes)  # stopped inside the network, still warm
