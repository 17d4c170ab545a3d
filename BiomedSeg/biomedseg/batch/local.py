"""Cases in sequence through one warm background worker (``worker.client.WorkerClient``).

The model loads once for the whole cohort; a case whose worker dies is recorded failed with the
worker's error, and the next case starts a fresh worker (the client does).
"""
from __future__ import annotations

import time

from .jobs import BatchSettings, CaseJob, read_checked, replace_allowed
from .outputs import failed_record, write_case


def run_local(jobs: list[CaseJob], s: BatchSettings, summary, region, events, python: str | None = None,
              client=None) -> None:
    """Run ``jobs`` one after the other and record each in ``summary`` as soon as it is done; through ``client``
    when one is given (a ``RemoteWorkerClient``: the cohort on a `biomedseg serve` machine), closed at the end."""
    if client is None:
        from ..worker.client import WorkerClient

        client = WorkerClient(python=python)
    try:
        for job in jobs:
            events.case_started(job.case.name)
            summary.record(run_one(client, job, s, summary, region, events))
            events.case_done(summary.records[job.case.name])
    finally:
        client.close()


def run_one(client, job: CaseJob, s: BatchSettings, summary, region, events) -> dict:
    """One case's record; any error of this case (a corrupt file, a crash, a bug) is its record, not the end
    of the batch. Ctrl-C is not an error of the case: it ends the batch (the summary holds what finished)."""
    started = time.perf_counter()
    try:
        owned = summary.owns(job.case.name)
        volume, decisions, warnings, read_s = read_checked(job, s, owned)
        ran = time.perf_counter()
        result = client.run(volume, s.model, job.prompts, **job.request(s, region),
                            on_progress=lambda j: events.progress(j.stage, j.done, j.total))
        times = {"read": read_s, "run": time.perf_counter() - ran}
        return write_case(job, s, volume, result, decisions, warnings, times, started, region,
                          replace_allowed(job, s, owned), worker={"pid": client.worker_pid})
    except Exception as exc:  # noqa: BLE001 -- recorded with its kind; the next case runs
        return failed_record(job.case.name, job.case.input, job, s, exc, time.perf_counter() - started)
