"""The panel's run controller: submit, poll, apply with undo, cancel, export. One run at a time.

The Slicer module calls ``poll()`` from a QTimer, so nothing here may block: the model runs
in a worker process and the scene changes only when a finished result is applied (a
cancelled or failed run changes nothing). MRML nodes are only passed through to
``slicer_bridge``.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .. import slicer_bridge
from ..errors import BiomedSegError, InputError
from ..io.dicom_files import order_dicom_files, read_dicom_tags
from ..segments import Segment
from .guessing import guess_modality_site
from .messages import PanelMessage, Progress, RunOutcome, describe_error, describe_progress
from .request import Request, build_request
from .state import EXPORT_FORMATS, SLICE_AXES, WRITE_MODES, PanelState
from .worker_python import isolated_environment, same_python


@dataclass
class PollResult:
    progress: Progress
    outcome: RunOutcome | None = None

    @property
    def finished(self) -> bool:
        return self.outcome is not None


@dataclass
class _Run:
    job: object
    request: Request
    volume_node: object
    segmentation_node: object
    state: PanelState
    cancel_requested: bool = False
    #: ``apply(result) -> RunOutcome`` instead of the default write (the correction workflow's own)
    apply: Callable | None = None
    #: ``retry(error) -> Job | None``: a job to run instead when this one fails (None: report the failure)
    retry: Callable | None = None


class PanelController:
    """The panel's logic: submit, poll, apply with undo, cancel, export. One run at a time.

    ``client`` is a ``WorkerClient`` (made on first use for ``state.worker_python``);
    ``terminology_lookup(name) -> (terminology dict, rgb) | None`` lets Slicer's own
    terminology name and colour a known target (the catalogue's entry is used otherwise).
    """

    def __init__(self, scene, client=None, terminology_lookup: Callable | None = None, default_python: str = "",
                 isolated_env: dict | None = None):
        self.scene = scene
        #: Python the worker runs in when the panel names none (Slicer's PythonSlicer inside Slicer).
        self.default_python = default_python
        #: Environment for any other Python (a separate environment): see ``isolated_environment``.
        self.isolated_env = isolated_env
        self._client = client
        self._client_key: tuple | None = None
        #: a sentence the panel shows about where the last run went (a server it could not reach)
        self.notice = ""
        self._own_client = client is None
        self.terminology_lookup = terminology_lookup
        self.run: _Run | None = None
        self.undo_stack: list[tuple] = []  # (segmentation node, undo record, names)
        self.last_outcome: RunOutcome | None = None
        #: target -> the volume node showing its soft map after the last run (``state.show_probabilities``)
        self.probability_nodes: dict[str, object] = {}

    # ---- worker ----
    def client_for(self, worker_python: str = "", state: PanelState | None = None):
        """The client this run goes through: the server's when ``state.server_url`` is set (a local worker
        instead, with ``notice`` saying so, only if it cannot be reached and ``state.fallback_local``), else a
        worker in ``worker_python``. Kept while the choice stays the same."""
        server = state.server_url.strip() if state is not None else ""
        if server:
            key = ("server", server, state.server_token)
            if self._client is not None and (not self._own_client or key == self._client_key):
                return self._client
            remote = self._remote_client(server, state)
            if remote is not None:
                return self._use(remote, key)
        wanted = worker_python or self.default_python or None
        key = ("local", wanted)
        if self._client is not None and (not self._own_client or key == self._client_key):
            return self._client
        from ..worker.client import WorkerClient

        foreign = wanted is not None and not any(same_python(wanted, p) for p in
                                                 filter(None, [self.default_python, sys.executable]))
        return self._use(WorkerClient(python=wanted, env=(self.isolated_env or isolated_environment())
                                      if foreign else None), key)

    def _remote_client(self, server: str, state: PanelState):
        from ..errors import ServerUnavailableError
        from ..remote.client import RemoteWorkerClient

        client = RemoteWorkerClient(server, state.server_token or None)
        try:
            client.start()
        except BiomedSegError as exc:  # unreachable, refused token, another version: this client is done
            client.close()
            if not (state.fallback_local and isinstance(exc, ServerUnavailableError)):
                raise
            self.notice = f"{exc.message} Running on this computer instead (Run locally if the server is unreachable)."
            return None
        self.notice = ""
        return client

    def _use(self, client, key):
        if self._client is not None and self._own_client:
            self._client.close()
        self._client, self._client_key, self._own_client = client, key, True
        return client

    def close(self) -> None:
        if self.run is not None:
            self.cancel()
        if self._client is not None and self._own_client:
            self._client.close()
            self._client = None

    def forget_scene(self) -> None:
        """The scene is closing: stop the run (its result would have nowhere to go), drop the undo records."""
        if self.run is not None:
            self.cancel()
        self.undo_stack.clear()

    @property
    def running(self) -> bool:
        return self.run is not None

    # ---- inputs ----
    def describe_volume(self, volume_node, dicom_lookup=None) -> dict:
        """Guessed modality/site and the number of slices along each axis, for the panel's inputs."""
        volume = slicer_bridge.volume_from_node(volume_node, harden_transform=True)
        files = slicer_bridge.dicom_files_of(volume_node, dicom_lookup)
        tags = read_dicom_tags(files[0]) if files else {}
        slices = {axis: volume.shape[volume.slice_orientation(axis).slice_axis] for axis in SLICE_AXES}
        return {"guess": guess_modality_site(volume, tags), "slices": slices, "dicom": bool(files)}

    # ---- run ----
    def start(self, state: PanelState, volume_node, segmentation_node=None, roi_node=None, prompt_nodes=None):
        """Read the volume, check the request and hand it to the worker; returns the Job at once.

        ``roi_node`` limits the region; ``prompt_nodes`` (markups ROIs and point lists) are box and
        point prompts for models that take them. Nothing in the scene changes here: the output
        node is created when results arrive.
        """
        if self.run is not None:
            raise InputError("A segmentation is already running.", hint="Wait for it or press Cancel.")
        if volume_node is None:
            raise InputError("No input volume is selected.", hint="Choose a volume under Inputs.")
        volume = slicer_bridge.volume_from_node(volume_node, harden_transform=True)
        roi = slicer_bridge.roi_ras_bounds(roi_node) if roi_node is not None else None
        request = build_request(state, volume, roi, prompt_nodes)
        return self.submit(request, volume_node, segmentation_node, state)

    def submit(self, request: Request, volume_node, segmentation_node, state: PanelState, *,
               apply: Callable | None = None, retry: Callable | None = None, session: str | None = None,
               send_volume: bool = True):
        """Hand a checked request to the worker as the panel's one run (poll, progress and cancel as for
        ``start``). ``apply(result) -> RunOutcome`` replaces the default write when it ends; ``session``
        runs it in an interactive worker session, on the image already there when ``send_volume`` is False;
        ``retry(error)`` may return a job to run instead of reporting a failure (a session the worker lost)."""
        if self.run is not None:
            raise InputError("A segmentation is already running.", hint="Wait for it or press Cancel.")
        client = self.client_for(state.worker_python, state)
        job = client.submit(request.volume if send_volume else None, request.model, request.prompts, session=session,
                            **request.kwargs)
        self.run = _Run(job, request, volume_node, segmentation_node, state, apply=apply, retry=retry)
        self.last_outcome = None
        return job

    def cancel(self) -> None:
        """Stop the running job; whatever it produces is thrown away (the scene is not touched)."""
        if self.run is None:
            return
        self.run.cancel_requested = True
        if not self.run.job.finished and self._client is not None:
            self._client.cancel(self.run.job)

    def poll(self) -> PollResult:
        """Call from a timer: handles worker events; applies the result once when the job ends."""
        if self.run is None:
            return PollResult(Progress(0, ""))
        if self._client is not None:
            try:
                self._client.poll()
            except BiomedSegError as exc:  # a worker that cannot even be watched
                return self._finish(RunOutcome("failed", message=describe_error(exc)))
        job = self.run.job
        if not job.finished:
            return PollResult(describe_progress(job))
        if self.run.cancel_requested or job.state == "cancelled":
            return self._finish(RunOutcome("cancelled", message=PanelMessage(
                "Cancelled; nothing was changed.", "cancelled")))
        if job.state == "failed":
            again = self.run.retry(job.error) if self.run.retry is not None else None
            if again is not None:
                self.run.job, self.run.retry = again, None
                return PollResult(describe_progress(again))
            return self._finish(RunOutcome("failed", message=describe_error(job.error)))
        try:
            outcome = self.run.apply(job.result) if self.run.apply else self._apply(self.run, job.result)
        except BiomedSegError as exc:
            outcome = RunOutcome("failed", message=describe_error(exc))
        return self._finish(outcome)

    def wait(self, timeout: float | None = None, on_progress: Callable | None = None) -> RunOutcome:
        """Poll until the run ends (scripts, the self-test); the panel uses its timer instead."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            result = self.poll()
            if result.finished:
                return result.outcome
            if on_progress:
                on_progress(result.progress)
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                raise TimeoutError(f"the segmentation did not finish within {timeout} s")
            if self._client is not None:
                self._client.poll(timeout=0.05)

    def run_to_end(self, state: PanelState, volume_node, segmentation_node=None, roi_node=None,
                   timeout: float | None = None, idle: Callable | None = None, interval: float = 0.1,
                   prompt_nodes=None) -> RunOutcome:
        """Start a run and poll it until it ends, calling ``idle()`` between polls (Slicer's processEvents,
        so Slicer stays usable); past ``timeout`` the run is cancelled and its cancelled outcome returned."""
        self.start(state, volume_node, segmentation_node, roi_node, prompt_nodes)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            result = self.poll()
            if result.finished:
                return result.outcome
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
            if idle is not None:
                idle()
            time.sleep(interval)

    def _finish(self, outcome: RunOutcome) -> PollResult:
        outcome.notice = outcome.notice or self.notice
        self.run = None
        self.last_outcome = outcome
        return PollResult(Progress(100 if outcome.state == "done" else 0, outcome.summary), outcome)

    def _segments_of(self, run: _Run, result) -> list[Segment]:
        out = []
        for seg in result.segments:
            color, terminology = seg.color, seg.terminology
            if self.terminology_lookup is not None:
                try:
                    found = self.terminology_lookup(seg.name)
                except Exception:  # Slicer's lookup is a convenience, never a reason to lose a result
                    found = None
                if found:  # Slicer's codes; a sided target keeps the catalogue's colour (Slicer's sides share one)
                    terminology = found[0]
                    color = color if (seg.terminology or {}).get("typeModifier") else found[1]
            out.append(Segment(seg.name, seg.mask, color, terminology))
        return out

    def _apply(self, run: _Run, result) -> RunOutcome:
        outcome = RunOutcome("done", absent=list(result.absent), seconds=result.seconds, device=result.device,
                             absent_reasons=dict(result.absent_reasons), labels=list(result.labels),
                             findings=list(result.findings), report=dict(result.report))
        if not result.segments:
            self._show_probabilities(run, result)  # the soft map shows why nothing passed the threshold
            if result.absent:
                outcome.message = PanelMessage(f"The model did not find {', '.join(result.absent)} in this image; "
                                               "nothing was written.", "absent")
            return outcome
        segments = self._segments_of(run, result)
        node = run.segmentation_node
        created = node is None or node.GetScene() is None
        reference_node = run.volume_node if run.volume_node is not None and run.volume_node.GetScene() else None
        if created:
            base = reference_node.GetName() if reference_node is not None else (run.request.volume.name or "Volume")
            node = slicer_bridge.new_segmentation_node(self.scene, f"{base} {run.request.model}", reference_node)
        try:
            record = slicer_bridge.write_segments(node, run.request.volume, segments,
                                                  mode=WRITE_MODES.get(run.state.write_mode, run.state.write_mode))
        except BaseException:
            if created:
                self.scene.RemoveNode(node)
            raise
        names = [node.GetSegmentation().GetSegment(s).GetName() for s in record["segment_ids"]]
        self.undo_stack.append((node, record, names))
        slicer_bridge.show_segmentation(node, run.state.show_3d)
        self._show_probabilities(run, result)
        outcome.segmentation_node = node
        outcome.segment_ids = list(record["segment_ids"])
        outcome.names = names
        outcome.result_names = [seg.name for seg in segments]
        voxel_ml = float(abs(np.linalg.det(run.request.volume.ijk_to_ras[:3, :3]))) / 1000.0
        for name, seg in zip(names, segments):
            outcome.voxels[name] = int(seg.mask.sum())
            outcome.volumes_ml[name] = outcome.voxels[name] * voxel_ml
        return outcome

    def _show_probabilities(self, run: _Run, result) -> None:
        """Each soft map the worker returned (it was asked when ``show_probabilities`` is set) over the image,
        in the node "<target> probability" (reused run after run), with the band around the threshold lit."""
        self.probability_nodes = {}
        reference = run.volume_node if run.volume_node is not None and run.volume_node.GetScene() else None
        if not run.state.show_probabilities or reference is None:
            slicer_bridge.hide_probability_maps(self.scene)
            return
        threshold = float(run.request.kwargs.get("threshold", run.state.threshold))
        for index, (target, probability) in enumerate(result.probabilities.items()):
            # the first target's map over the image; the others wait in the scene, one click away
            self.probability_nodes[target] = slicer_bridge.show_probability_map(self.scene, reference, target,
                                                                                probability, threshold,
                                                                                show=index == 0)

    # ---- undo ----
    @property
    def can_undo(self) -> bool:
        return bool(self.undo_stack)

    def undo_last(self) -> list[str]:
        """Undo the last applied result exactly (added segments removed, overwritten ones restored)."""
        if not self.undo_stack:
            raise InputError("There is no result to undo.")
        node, record, names = self.undo_stack[-1]
        if node.GetScene() is None:
            self.undo_stack.pop()
            raise InputError(f"The segmentation '{node.GetName()}' was deleted, so its last result cannot be undone.")
        slicer_bridge.undo_segments(node, record)
        self.undo_stack.pop()
        return names

    # ---- export ----
    def export_formats(self, volume_node, dicom_lookup=None) -> dict[str, str]:
        """The file formats offered for a result on ``volume_node`` (DICOM SEG only for DICOM sources)."""
        formats = dict(EXPORT_FORMATS)
        if volume_node is None or not slicer_bridge.dicom_files_of(volume_node, dicom_lookup):
            formats.pop(".dcm")
        return formats

    def export_labelmap(self, segmentation_node, volume_node, segment_ids: list[str] | None = None):
        if segmentation_node is None or volume_node is None:
            raise InputError("Choose the segmentation and its volume first.")
        return slicer_bridge.export_to_labelmap_node(self.scene, segmentation_node, volume_node, segment_ids)

    def export_file(self, segmentation_node, volume_node, path: str | os.PathLike,
                    segment_ids: list[str] | None = None, dicom_lookup=None) -> list[Path]:
        """Write the segments with the engine's writers; the format follows the file name."""
        from ..io import write_segmentation
        from ..io.readers import suffix_of

        if segmentation_node is None or volume_node is None:
            raise InputError("Choose the segmentation and its volume first.")
        reference = slicer_bridge.volume_from_node(volume_node, harden_transform=True)
        if suffix_of(path) == ".dcm":
            files = slicer_bridge.dicom_files_of(volume_node, dicom_lookup)
            if not files:
                raise InputError(f"'{volume_node.GetName()}' was not loaded from DICOM, so a DICOM SEG would have no "
                                 "images to refer to.", hint="Export as .seg.nrrd or .nii.gz instead.")
            reference.meta["dicom_files"] = order_dicom_files(reference, files)
        segments = slicer_bridge.segments_from_node(segmentation_node, reference, segment_ids)
        return write_segmentation(path, reference, segments, overwrite=True)  # the save dialog asked already


__all__ = ["PanelController", "PollResult"]
