"""Cancel at a chosen moment and time how long until the client is idle (the job ended), with a
second job queued behind it that must still finish. Shared by Testing/test_cancel_timing.py and
bench/cancel.py."""
from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class CancelCase:
    model: str
    delay_s: float
    #: None when the job ended before the cancel was due
    idle_s: float | None
    stage: str
    worker_kept: bool
    queued_done: bool


def cancel_at(client, submit, behind, delay_s: float, model: str) -> CancelCase:
    """``submit()`` a job, queue ``behind()`` after it, cancel the first after ``delay_s``."""
    job = submit()
    queued = behind()
    due = time.monotonic() + delay_s
    while time.monotonic() < due and not job.finished:
        client.poll(timeout=min(0.01, max(0.0, due - time.monotonic())))
    stage, pid = job.stage or job.state, client.worker_pid
    idle = None
    if not job.finished:
        t0 = time.monotonic()
        client.cancel(job)
        while not job.finished:
            client.poll(timeout=0.005)
        idle = time.monotonic() - t0
    try:
        client.wait(queued, timeout=300)
        queued_done = queued.state == "done"
    except Exception:  # noqa: BLE001 -- recorded: a lost queued job is what the test looks for
        queued_done = False
    return CancelCase(model, delay_s, idle, stage, client.worker_pid == pid, queued_done)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, int(round(q / 100 * (len(ordered) - 1)))))
    return ordered[index]
