"""The run report: what one run was asked, what the engine decided, what it found, for papers and audits.

``build_report`` turns a ``SegmentationResult`` and the request into one JSON-able dict
(schema ``biomedseg.run-report/1``, documented in the README); ``report_lines`` is the
same content as the lines the CLI prints. Field names are stable: a new field may be
added, none is renamed or removed without a new schema version.
"""
from __future__ import annotations

import datetime
import platform
import sys

import numpy as np

from . import __version__
from .prompts import prompt_to_dict
from .results import SegmentationResult, jsonable
from .segments import segment_size
from .volume import Volume

SCHEMA = "biomedseg.run-report/1"


def _size(volume: Volume, voxels: int) -> dict:
    """Voxels and mL for a volume; mm^2 for a one-slice image (``segments.segment_size``), rounded."""
    size = segment_size(volume, voxels)
    if "area_mm2" in size:
        return {"voxels": size["voxels"], "area_mm2": round(size["area_mm2"], 3)}
    return {"voxels": size["voxels"], "volume_ml": round(size["volume_ml"], 4)}


def targets_of(result: SegmentationResult, volume: Volume, requested: list[str]) -> list[dict]:
    """Per target, in request order: found with its size, or absent with the reason and figure."""
    out, seen = [], set()
    found = {s.name: s for s in result.segments}
    for name in list(requested) + [s.name for s in result.segments] + list(result.absent):
        if name in seen:
            continue
        seen.add(name)
        if name in found:
            out.append({"name": name, "status": "found", **_size(volume, int(np.count_nonzero(found[name].mask))),
                        "label": found[name].label, "terminology": found[name].terminology})
        elif name in result.absent:
            out.append({"name": name, "status": "absent", **result.absence(name).to_dict()})
    return out


def build_report(result: SegmentationResult, volume: Volume, *, entry, prompts: list, request: dict,
                 times: dict, outputs: list, warnings: list[str]) -> dict:
    """The whole report. ``request``: what was asked (options, threshold, post-processing, region, device,
    free_text, force); ``times``: seconds per step; ``warnings``: reader's and engine's sentences."""
    report = result.report or {}
    texts = [getattr(p, "text", None) or getattr(p, "target", None) or p.type for p in prompts]
    return jsonable({
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "engine": {"biomedseg": __version__, "python": sys.version.split()[0], "platform": platform.platform()},
        "command": list(sys.argv),
        "input": {"source": volume.meta.get("source"), "name": volume.name, "shape_kji": list(volume.shape),
                  "spacing_mm": [float(s) for s in volume.spacing], "ijk_to_ras": volume.ijk_to_ras.tolist(),
                  "modality_tag": volume.meta.get("modality"), "series_uid": volume.meta.get("series_uid")},
        "model": {"id": entry.id, "title": entry.title, "version": entry.data.get("version"),
                  "licence": entry.weights.get("license"), "reference": entry.data.get("reference"),
                  "weights": report.get("weights", [])},
        "request": {"prompts": [prompt_to_dict(p) for p in prompts], **request},
        "decisions": {**(report.get("decisions") or {}), "plan": report.get("plan") or {},
                      "region": report.get("region"), "batch_size": report.get("batch_size"),
                      "memory_retries": report.get("memory_retries")},
        "device": {"used": result.device, "why": result.device_reason},
        "targets": targets_of(result, volume, texts),
        "labels": [label.to_dict() for label in result.labels],
        "findings": [finding.to_dict() for finding in result.findings],
        "model_report": {k: v for k, v in report.items() if k not in
                         ("decisions", "plan", "region", "batch_size", "memory_retries", "weights", "model")},
        "times_s": {k: round(float(v), 3) for k, v in times.items()},
        "outputs": [str(p) for p in outputs],
        "warnings": list(warnings),
    })


def ct_window(plan: dict) -> tuple[float, float] | None:
    """The intensity window a model showed its images in (lower, upper), from its plan: a model's
    ``intensity_window`` (MedSAM2), or BiomedParse's CT ``window``; None otherwise (Hermes' ``window``
    is its sliding-window size in voxels, not an intensity window)."""
    window = plan.get("intensity_window")
    if window is None and plan.get("modality") == "CT":
        window = plan.get("window")
    if isinstance(window, (list, tuple)) and len(window) == 2:
        return float(window[0]), float(window[1])
    return None


def _describe_size(target: dict) -> str:
    if "area_mm2" in target:
        return f"{target['voxels']} pixels, {target['area_mm2']:.1f} mm²"
    return f"{target['voxels']} voxels, {target['volume_ml']:.2f} mL"


def report_lines(report: dict, verbose: bool = False) -> list[str]:
    """What the CLI prints after a run: the decisions, per target found or why not, the times (the
    warnings were printed before the run, where they can still stop an hour of work)."""
    lines = []
    decisions = report["decisions"]
    modality = decisions.get("modality") or {}
    plan = decisions.get("plan") or {}
    if modality:
        source = {"stated": "as you said", "tags": "from the DICOM tags", "intensities": "guessed from intensities"}
        lines.append(f"modality: {plan.get('modality') or modality['modality']} "
                     f"({source.get(modality['source'], modality['source'])}: {modality['why']})")
    site = plan.get("site") or decisions.get("site")
    if site:
        lines.append(f"site: {site}" + (f" ({plan['site_source']})" if plan.get("site_source") else ""))
    window = ct_window(plan)
    if window:
        what = "CT window" if plan.get("modality") == "CT" else "intensity window"
        rule = f" ({plan['window']})" if isinstance(plan.get("window"), str) else ""
        lines.append(f"{what}: {window[0]:g} to {window[1]:g}{' HU' if what == 'CT window' else ''}{rule}")
    if plan.get("plane"):
        lines.append(f"plane: {plan['plane']}" + (f", slices {decisions['region']}" if decisions.get("region") else ""))
    lines.append(f"model: {report['model']['id']} on {report['device']['used']} ({report['device']['why']})")
    for target in report["targets"]:
        if target["status"] == "found":
            lines.append(f"found: '{target['name']}': {_describe_size(target)}")
        else:
            lines.append(f"not found: '{target['name']}' ({target['reason']}); no segment written for it")
    if verbose:
        for key, value in sorted(plan.items()):
            if key not in ("modality", "site", "site_source", "window", "plane"):
                lines.append(f"  plan {key}: {value}")
        for key, value in sorted(report.get("model_report", {}).items()):
            lines.append(f"  model {key}: {value}")
        for w in report["model"]["weights"]:
            lines.append(f"  weights {w['file']}: sha256 {w['sha256']}")
    times = report["times_s"]
    lines.append("times: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()))
    return lines
