"""A job as the client tracks it, and its result read back out of shared memory."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import BiomedSegError
from ..results import Absence, Finding, Label, SegmentationResult
from ..segments import Segment
from ..volume import Volume


@dataclass
class Job:
    id: int
    model: str
    prompts: list
    volume: Volume | None
    #: result names in order (text prompts are their own targets)
    targets: list[str] = field(default_factory=list)
    #: the interactive session it runs in, if any
    session: str | None = None
    state: str = "queued"  # queued, running, done, failed, cancelled
    stage: str = ""
    done: int = 0
    total: int = 0
    elapsed: float = 0.0
    eta: float | None = None
    result: SegmentationResult | None = None
    error: BiomedSegError | None = None
    cancel_requested_at: float | None = None
    cancel_acknowledged: bool = False
    on_progress: Callable | None = None
    on_done: Callable | None = None
    blocks: list = field(default_factory=list)
    outputs: dict = field(default_factory=dict)
    #: the request as sent, so a queued job can be sent again to a fresh worker
    message: dict = field(default_factory=dict)
    submitted_at: float = field(default_factory=time.monotonic)

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed", "cancelled")


def wait_for(poll, job: Job, timeout: float | None = None) -> SegmentationResult:
    """Call ``poll(timeout=...)`` until ``job`` ends; its result, or its error raised (both clients' ``wait``)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while not job.finished:
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job.id} did not finish within {timeout} s")
        poll(timeout=0.1)
    if job.error is not None:
        raise job.error
    return job.result


def result_fields(result: SegmentationResult, index_of) -> dict:
    """The JSON part of a result (no voxels; ``index_of(name)`` is a segment's mask slot): what crosses the
    worker pipe and the network alike."""
    return {"segments": [{"name": s.name, "index": index_of(s.name), "color": list(s.color),
                          "terminology": s.terminology, "label": s.label} for s in result.segments],
            "absent": result.absent, "absent_reasons": result.absent_reasons,
            "absent_details": {t: d.to_dict() for t, d in result.absent_details.items()},
            "labels": [label.to_dict() for label in result.labels],
            "findings": [finding.to_dict() for finding in result.findings], "report": result.report,
            "device": result.device, "device_reason": result.device_reason}


def result_from_message(msg: dict, masks: np.ndarray, probabilities: dict, model: str) -> SegmentationResult:
    """A result from its JSON part (``result_fields``) and the mask slots it points into."""
    segments = [Segment(s["name"], masks[s["index"]].astype(bool), tuple(s["color"]), s["terminology"],
                        s.get("label")) for s in msg["segments"]]
    return SegmentationResult(segments, list(msg.get("absent", [])), model, msg.get("device", ""),
                              msg.get("device_reason", ""), float(msg.get("seconds", 0.0)), probabilities,
                              dict(msg.get("absent_reasons") or {}),
                              [Label.from_dict(x) for x in msg.get("labels") or []],
                              [Finding.from_dict(x) for x in msg.get("findings") or []],
                              dict(msg.get("report") or {}),
                              {t: Absence.from_dict(d) for t, d in (msg.get("absent_details") or {}).items()})


def collect_result(job: Job, msg: dict) -> SegmentationResult:
    """Copy the masks (and the probabilities the worker wrote) out of shared memory: the one copy back."""
    block, shape, dtype = job.outputs["output"]
    masks = np.ndarray(shape, dtype, buffer=block.buf)
    probs = {}
    if "probabilities" in job.outputs:
        pblock, pshape, pdtype = job.outputs["probabilities"]
        arr = np.ndarray(pshape, pdtype, buffer=pblock.buf)
        kept = set(msg.get("probability_targets", job.targets))
        probs = {t: arr[i].copy() for i, t in enumerate(job.targets) if t in kept}
    try:
        return result_from_message(msg, masks, probs, job.model)
    finally:
        del masks
