"""Writing one case (segmentation, preview, run report: the writers `segment` uses, all atomic) and its
row of the summary.

Only the process that drives the batch writes: a Ray task sends its masks back here, so every file
is written in one place, whole or not at all.
"""
from __future__ import annotations

import datetime
import json
import time
from pathlib import Path

from .. import __version__
from ..errors import BiomedSegError
from .jobs import BatchSettings, CaseJob


def error_dict(exc: BaseException) -> dict:
    """kind, message, hint: a BiomedSegError as it is; anything else as its type and text (a bug, a Ray error)."""
    if isinstance(exc, BiomedSegError):
        return exc.to_dict()
    text = str(exc).strip().splitlines()
    return {"kind": "error", "message": f"{type(exc).__name__}: {text[0][:500] if text else ''}".rstrip(": "),
            "hint": None}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def base_record(name: str, source, job: CaseJob | None, s: BatchSettings) -> dict:
    from ..catalog import get_model

    return {"case": name, "input": str(source), "model": s.model,
            "model_version": get_model(s.model).data.get("version"), "engine": __version__,
            "settings_hash": job.digest if job else None, "settings": job.settings if job else None}


def failed_record(name: str, source, job: CaseJob | None, s: BatchSettings, error, seconds: float,
                  worker: dict | None = None) -> dict:
    """A case that failed: its error (an exception, or its ``error_dict`` from a Ray task) and nothing else
    (it wrote nothing)."""
    return {**base_record(name, source, job, s), "status": "failed", "outcome": "failed",
            "seconds": round(seconds, 3), "error": error if isinstance(error, dict) else error_dict(error), "outputs": [], "segments": {}, "absent": {},
            "worker": worker, "finished": _now()}


def skipped_record(earlier: dict) -> dict:
    """A finished case left as it is: the earlier record, marked skipped (its outcome and figures kept)."""
    return {**earlier, "status": "skipped"}


def weights_sha256(weights: list[dict]) -> list[dict]:
    """file and sha256 of each weight file (hashed here once per file version when the engine did not know it)."""
    from ..runtime.weights import file_sha256

    out = []
    for w in weights or []:
        sha = w.get("sha256")
        if sha is None and w.get("path") and Path(w["path"]).is_file():
            sha = file_sha256(w["path"])
        out.append({"file": w.get("file"), "sha256": sha})
    return out


def write_case(job: CaseJob, s: BatchSettings, volume, result, decisions: dict, warnings: list[str],
               times: dict, started: float, region, replace: bool, worker: dict | None = None) -> dict:
    """Write the case's files and return its record ('ok', or 'empty' when every target is absent:
    then only the report is written, as `segment` does). ``times``: read and run seconds; ``started``:
    when the case began (perf_counter)."""
    from ..catalog import get_model
    from ..io import write_segmentation
    from ..io.atomic import atomic_write
    from ..run_report import build_report, ct_window
    from ..segments import segment_size

    entry = get_model(s.model)
    writing = time.perf_counter()
    written: list[Path] = []
    if result.segments:
        written += write_segmentation(job.output, volume, result.segments, overwrite=replace)
        if job.preview:
            from ..preview import render_preview

            written.append(render_preview(job.preview, volume, result.segments, overwrite=replace,
                                          title=f"{volume.name} - {s.model}",
                                          window=ct_window(result.report.get("plan") or {}),
                                          modality=decisions["modality"]["modality"]))
    weights = weights_sha256(result.report.get("weights", []))
    if job.report:
        times = {**times, "write": time.perf_counter() - writing, "total": time.perf_counter() - started}
        request = {**{k: v for k, v in job.request(s, region).items() if k != "region"},
                   "region": region.to_dict(), "input": str(job.case.input), "options": job.settled}
        report = build_report(result, volume, entry=entry, prompts=job.prompts, request=request, times=times,
                              outputs=written, warnings=warnings)
        by_file = {w["file"]: w["sha256"] for w in weights}
        for w in report["model"]["weights"]:
            w["sha256"] = w.get("sha256") or by_file.get(w.get("file"))
        text = json.dumps(report, indent=2) + "\n"
        written.append(atomic_write(job.report, lambda tmp: Path(tmp).write_text(text), replace))
    sizes = {}
    for seg in result.segments:
        size = segment_size(volume, int(seg.mask.sum()))
        sizes[seg.name] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in size.items()}
    outcome = "ok" if result.segments else "empty"
    return {**base_record(job.case.name, job.case.input, job, s), "status": outcome, "outcome": outcome,
            "seconds": round(time.perf_counter() - started, 3), "model_seconds": round(result.seconds, 3),
            "segments": sizes, "absent": {t: result.absent_reasons.get(t, "not found") for t in result.absent},
            "weights": weights, "device": result.device,
            "outputs": [p.name for p in written], "error": None, "warnings": list(warnings), "worker": worker,
            "finished": _now()}
