"""`biomedseg batch`: a cohort of images, one output per case, a summary table, resumable.

``run_batch`` finds the cases (``cases``), checks what holds for all of them once and each case's
own prompts and options (``jobs``), skips the cases the summary says are finished with the same
settings (``summary``), and hands the rest to a runner: one warm local worker (``local``) or a Ray
cluster (``ray_runner``). Every case's outputs are written by this process (``outputs``), and the
summary is rewritten after every case.
"""
from __future__ import annotations

from ..errors import BiomedSegError
from .cases import Case, find_cases
from .jobs import FORMATS, BatchSettings, check_settings, prepare
from .outputs import failed_record, skipped_record
from .summary import Summary


class Events:
    """What a front end hears: the number of cases, each case as it starts and ends, progress within one."""

    def start(self, total: int, to_run: int) -> None:
        pass

    def case_started(self, name: str) -> None:
        pass

    def progress(self, stage: str, done: int, total: int) -> None:
        pass

    def case_done(self, record: dict) -> None:
        pass


def run_batch(inputs: str, s: BatchSettings, runner, events: Events | None = None) -> tuple[Summary, list[str]]:
    """Run the cohort ``inputs`` with ``runner(jobs, s, summary, region, events)``; returns the summary and
    the names of this run's cases (in order)."""
    from ..geometry import make_region

    events = events or Events()
    check_settings(s)
    region = make_region(s.plane)
    cases = find_cases(inputs)
    summary = Summary.load(s.outdir)
    summary.order = [c.name for c in cases]
    s.outdir.mkdir(parents=True, exist_ok=True)
    todo, decided, names = [], [], [c.name for c in cases]
    for case in cases:
        try:
            job = prepare(case, s)
        except BiomedSegError as exc:  # a bad prompt or option in this case's manifest row
            decided.append(failed_record(case.name, case.input, None, s, exc, 0.0))
            continue
        earlier = summary.finished(case.name, job.digest, job.outputs, job.report)
        if earlier is not None:
            decided.append(skipped_record(earlier))
        else:
            todo.append(job)
    for record in decided:
        summary.records[record["case"]] = record
    summary.write()
    events.start(len(cases), len(todo))
    for record in decided:
        events.case_done(record)
    runner(todo, s, summary, region, events)
    return summary, names


__all__ = ["run_batch", "BatchSettings", "Events", "Case", "find_cases", "Summary", "FORMATS"]
