"""What the panel says: progress with the time left, errors as a sentence with what to do,
which buttons work, and the one-line summary of a finished run.

Kept apart from the controller so the words can be checked (and changed) without a worker.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..errors import BiomedSegError

#: What ``format_seconds`` says for almost no time; "about" never goes before it.
UNDER_A_SECOND = "under 1 s"
#: Button text for each action the panel can take for the person (model list and message line).
ACTION_LABELS = {"install_dependencies": "Install…", "install_engine": "Install…",
                 "download_weights": "Download…", "choose_weights": "Choose file…", "retry": "Try again",
                 "use_anyway": "Use anyway"}


@dataclass
class Progress:
    #: 0..100, or None while the amount of work is not known yet (busy indicator).
    percent: int | None
    text: str


def format_seconds(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 0.5:
        return UNDER_A_SECOND
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} min {secs:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def time_left(seconds: float) -> str:
    """'about 12 s left', but 'under 1 s left' (an estimate that small needs no 'about')."""
    text = format_seconds(seconds)
    return f"{text} left" if text == UNDER_A_SECOND else f"about {text} left"


def button_states(*, busy: bool, can_run: bool, can_undo: bool, has_result: bool) -> dict[str, bool]:
    """Which action buttons are enabled: while a run or an install is busy only Cancel works,
    so nothing can change the segmentation under a running job."""
    idle = not busy
    return {"segmentButton": can_run and idle, "cancelButton": busy, "installDependenciesButton": idle,
            "undoButton": can_undo and idle, "editButton": has_result and idle,
            "exportFileButton": has_result and idle, "exportLabelmapButton": has_result and idle}


def describe_progress(job) -> Progress:
    """What the progress bar and its label say for a worker job."""
    if job is None:
        return Progress(0, "")
    if job.state == "queued" or not job.total:
        waited = time.monotonic() - job.submitted_at
        what = "Starting the worker and loading the model" if job.state == "queued" else (job.stage or "Working")
        return Progress(None, f"{what[:1].upper() + what[1:]}… ({format_seconds(waited)})")
    percent = int(round(100 * min(job.done, job.total) / job.total))
    stage = job.stage[:1].upper() + job.stage[1:] if job.stage else "Working"
    text = f"{stage} ({job.done}/{job.total})"
    if job.cancel_requested_at is not None:
        text = "Cancelling…"
    elif job.eta is not None and job.done < job.total:
        text += f" · {time_left(job.eta)}"
    return Progress(percent, text)


@dataclass
class PanelMessage:
    """An error as the panel shows it: one sentence with what to do, and a button if one helps."""

    text: str
    kind: str = "error"
    action: str | None = None  # install_dependencies, install_engine, download_weights, choose_weights, retry


def describe_error(error: BaseException) -> PanelMessage:
    if isinstance(error, BiomedSegError):
        text = error.message.strip()
        if error.hint:
            text += " " + error.hint.strip()
        action = {"dependency_missing": "install_dependencies", "weights_missing": "choose_weights",
                  "worker_crashed": "retry", "out_of_memory": None, "wrong_modality": "use_anyway"}.get(error.kind)
        if error.kind == "out_of_memory":
            text += (" Try a smaller region (slice range or ROI), a smaller batch, or the CPU "
                     "(Advanced → Device: cpu).")
        if error.kind == "weights_missing" and "hub" in text.lower():
            action = "download_weights"
        return PanelMessage(text, error.kind, action)
    return PanelMessage(f"Unexpected error: {error}. The details are in the Python console; please report them.",
                        "error", None)


def device_label(device: str) -> str:
    """'cpu' -> 'the CPU', 'cuda:0' -> 'GPU cuda:0', 'mps' -> 'the Apple GPU (MPS)'."""
    device = device or ""
    if device.startswith("cuda"):
        return f"GPU {device}"
    return {"cpu": "the CPU", "mps": "the Apple GPU (MPS)"}.get(device, device or "the worker")


@dataclass
class RunOutcome:
    """What a finished run did to the scene (nothing unless state == 'done' and names is not empty)."""

    state: str  # done, failed, cancelled
    segmentation_node: object = None
    segment_ids: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    absent: list[str] = field(default_factory=list)
    message: PanelMessage | None = None
    seconds: float = 0.0
    device: str = ""
    voxels: dict[str, int] = field(default_factory=dict)
    volumes_ml: dict[str, float] = field(default_factory=dict)
    #: target -> why it is absent (below the threshold, the model's own test, ...)
    absent_reasons: dict[str, str] = field(default_factory=dict)
    #: labels with scores and text findings, for models that return them (``results.Label``/``Finding``)
    labels: list = field(default_factory=list)
    findings: list = field(default_factory=list)
    #: what the engine and the model decided (modality, batch, region, ...)
    report: dict = field(default_factory=dict)
    #: the result's own name of each written segment (``names`` may differ: 'liver 2' when 'liver' was taken)
    result_names: list[str] = field(default_factory=list)
    #: where the run went when that was not where the person asked (a server it could not reach)
    notice: str = ""

    @property
    def summary(self) -> str:
        text = self._summary()
        return f"{text} {self.notice}" if self.notice else text

    def _summary(self) -> str:
        if self.state == "cancelled":
            return "Cancelled; nothing was changed."
        if self.state == "failed":
            return self.message.text if self.message else "Failed; nothing was changed."
        parts = [f"{n} ({self.volumes_ml.get(n, 0):,.1f} mL)" for n in self.names]
        if self.names:
            text = "Added " + ", ".join(parts) + f" in {format_seconds(self.seconds)} on {device_label(self.device)}."
        elif self.labels or self.findings:
            text = f"Done in {format_seconds(self.seconds)} on {device_label(self.device)}; no segment to write."
        else:
            text = "Nothing was written. "
        if self.labels:
            text += " Labels: " + "; ".join(f"{lab.name} {lab.score:.2f}" + (f" ({lab.target})" if lab.target else "")
                                            for lab in self.labels) + "."
        for finding in self.findings:
            text += f" {finding.text}"
        return text

    @property
    def absent_line(self) -> str:
        """The 'Not found' line: targets the model did not find (and why), not written as empty segments."""
        if not self.absent:
            return ""
        return "Not found (not written): " + "; ".join(
            f"{name} ({self.absent_reasons[name]})" if name in self.absent_reasons else name for name in self.absent)


__all__ = ["Progress", "format_seconds", "time_left", "button_states", "describe_progress", "PanelMessage",
           "describe_error", "device_label", "RunOutcome", "ACTION_LABELS", "UNDER_A_SECOND"]
