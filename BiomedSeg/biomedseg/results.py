"""What a model run gives back, at the two levels where it is handled.

``ModelOutput`` is a backend's answer on its own input grid: probabilities (or 0/1 masks)
per target, targets it decided are absent with the reason, labels with scores
(classification, recognition), and text findings that may name the targets whose masks
they talk about. ``report`` says what the backend decided (modality, batch, p-values...).

``SegmentationResult`` is the engine's answer on the request's grid: thresholded,
post-processed, named and coloured segments, absent targets with reasons, and the labels,
findings and report passed through. It is what the worker sends back and what the CLI and
the panel write.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def jsonable(value):
    """``value`` with numpy scalars and arrays, tuples and paths turned into JSON types and
    non-finite floats into None (reports cross the worker pipe and land in JSON files)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


#: What a model may return (a model's ``results`` in its model.json).
RESULT_KINDS = ("masks", "labels", "text")


@dataclass
class Label:
    """A class name with its score; ``target`` names the prompt it answers, if any."""

    name: str
    score: float
    target: str | None = None

    def to_dict(self) -> dict:
        return {"name": self.name, "score": float(self.score), "target": self.target}

    @classmethod
    def from_dict(cls, data: dict) -> "Label":
        return cls(str(data["name"]), float(data["score"]), data.get("target"))


@dataclass
class Finding:
    """A sentence of text output; ``targets`` names the masks it is about."""

    text: str
    targets: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"text": self.text, "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, data: dict) -> "Finding":
        return cls(str(data["text"]), [str(t) for t in data.get("targets", [])])


@dataclass
class Absence:
    """Why a target was not written, with its figure: the highest probability against the threshold,
    the best p-value against the plausibility cut-off, an existence score against its threshold."""

    reason: str
    #: 'threshold' (nothing above it), 'plausibility' (the authors' p-value test), 'existence' (the model's
    #: own present/absent head), 'model' (anything else the backend decided)
    kind: str = "model"
    value: float | None = None
    cutoff: float | None = None

    def to_dict(self) -> dict:
        return {"reason": self.reason, "kind": self.kind, "value": jsonable(self.value), "cutoff": jsonable(self.cutoff)}

    @classmethod
    def from_dict(cls, data: dict) -> "Absence":
        return cls(str(data.get("reason", "not found")), str(data.get("kind", "model")), data.get("value"),
                   data.get("cutoff"))

    @classmethod
    def of(cls, value) -> "Absence":
        """A backend may give a plain sentence; it is the model's own decision then."""
        return value if isinstance(value, Absence) else cls(str(value))


@dataclass
class ModelOutput:
    """A backend's result on the grid of the volume it was given."""

    #: target -> float32 probabilities in 0..1, or a 0/1 mask, shaped like the input (k, j, i)
    probabilities: dict[str, np.ndarray] = field(default_factory=dict)
    #: target -> why the backend found nothing there (its own decision, e.g. a failed plausibility test):
    #: an ``Absence`` with its figure, or a sentence
    absent: dict[str, "Absence | str"] = field(default_factory=dict)
    labels: list[Label] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    #: what the backend decided and measured, JSON-able (shown to people and kept in run reports)
    report: dict = field(default_factory=dict)


@dataclass
class SegmentationResult:
    """What a model run gives back: segments found, targets not found, and how it ran."""

    segments: list
    absent: list[str]
    model_id: str
    device: str
    device_reason: str
    seconds: float
    probabilities: dict[str, np.ndarray] = field(default_factory=dict)
    #: target -> the reason it is absent (no voxel above the threshold, the model's own test, ...)
    absent_reasons: dict[str, str] = field(default_factory=dict)
    labels: list[Label] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    report: dict = field(default_factory=dict)
    #: target -> the ``Absence`` behind ``absent_reasons`` (kind, figure and cut-off)
    absent_details: dict[str, Absence] = field(default_factory=dict)

    def absence(self, target: str) -> Absence:
        return self.absent_details.get(target) or Absence(self.absent_reasons.get(target, "not found"))

    def summary_dict(self) -> dict:
        """JSON-able description (no voxels): for `-o X.json`, logs and remote clients."""
        return {"model": self.model_id, "device": self.device, "device_reason": self.device_reason,
                "seconds": round(float(self.seconds), 3),
                "segments": [{"name": s.name, "voxels": int(np.count_nonzero(s.mask)), "label": s.label,
                              "color": list(s.color) if s.color else None, "terminology": s.terminology}
                             for s in self.segments],
                "absent": {name: self.absent_reasons.get(name, "not found") for name in self.absent},
                "absent_details": {name: self.absence(name).to_dict() for name in self.absent},
                "labels": [label.to_dict() for label in self.labels],
                "findings": [finding.to_dict() for finding in self.findings],
                "report": jsonable(self.report)}
