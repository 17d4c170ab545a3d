"""The engine's backend for Hermes-R: the user's checkpoint, typed prompts, the authors'
pre- and post-processing, and a batched sliding window with progress and cancel.

``plan`` settles everything first, so that mistakes cost nothing: the modality
(``options['modality']``, else the image's DICOM modality ``CT`` / ``MR`` / ``PT``, else a CT
guess from Hounsfield-like intensities, else "unknown MR"), every prompt mapped to a task
id (``tasks.resolve_prompt``; an unknown prompt is an InputError with close matches -- the
catalogue's ``prompt_check`` already did this before anything loaded), the window, the
stitching engine, the resampling scheme and the window batch (as many as fit in free
memory, at most 8 on CUDA and 1 on a CPU). ``run`` then resamples the volume to 1.5 mm,
runs the windows ``batch_size`` at a time (float16 autocast on CUDA) with a progress event
per forward pass and a cancel check before each, and resamples the probabilities back onto
the input grid. Memory: the engine halves the batch if it still runs out.

Options are declared in model.json: ``modality``, ``batch_size``, ``engine`` ("authors" or
"monai" stitching), ``scheme`` (``preprocess.SCHEMES``), ``amp`` (False turns CUDA autocast
off) and ``window`` (edge of the cubic window, default 128 as trained; smaller windows are
faster and lighter but see less context than the network was trained with).

Hermes is multi-label and its prompts interact: every task token attends to the image
and to the other tokens, so one prompt's map can change a little with the others
asked for in the same run (as in the authors' validation, which asks for a whole
dataset's labels at once).
"""
from __future__ import annotations

import math

import numpy as np

from biomedseg.errors import CancelledError, DependencyMissingError, InputError
from biomedseg.imaging_guess import guess_modality
from biomedseg.models.base import Backend, LoadContext, Plan
from biomedseg.results import ModelOutput
from biomedseg.runtime.device import device_kind
from biomedseg.runtime.memory import batch_that_fits
from biomedseg.volume import Volume

from . import tasks

#: The catalogue's modality names and DICOM Modality values -> the network's modality id.
CATALOG_MODALITIES = {"ct": 0, "pet": 1, "pt": 1, "mri t1": 2, "mri t2": 3, "mri cine": 4, "mri": -1, "mr": -1}
#: Peak memory of one 128^3 window in a forward pass. CPU, float32: measured here (about
#: 0.5 GB per 64^3 window, 4.5 GB peak RSS for 128^3 with the model). CUDA with float16
#: autocast: an estimate (activations in half precision plus workspace), not measured.
WINDOW_BYTES = {"cpu": 4.2e9, "cuda_amp": 2.5e9, "cuda": 4.5e9}
#: Most windows per forward pass by device kind. On a CPU a second window per pass bought
#: nothing reliable (bench/hermes.py, 128^3 windows, shared 2-core VM: 0.66x to 1.5x over
#: three runs) but doubles the memory and the time between cancel checks, so CPUs run one;
#: on a GPU batches fill the device.
MAX_BATCH = {"cpu": 1, "mps": 2, "cuda": 8}
#: Share of the free memory the windows may take (the rest: accumulators, other programs).
MEMORY_SHARE = 0.6


def modality_from(volume: Volume, options: dict) -> tuple[int, str]:
    """(modality id, where it came from) for this run; InputError for modalities Hermes lacks.

    Without an option the image says (``imaging_guess``: DICOM tags, MR sequence from the series
    description, else the voxels); MR sequences Hermes has no prior for run as unknown MR (-1).
    """
    value, source = options.get("modality"), "option"
    if value is None or value == "":
        value, source = guess_modality(volume)
    if isinstance(value, str):
        key = " ".join(value.lower().replace("-", " ").replace("_", " ").split())
        if key in CATALOG_MODALITIES:
            return CATALOG_MODALITIES[key], source
        if source != "option" and key.startswith("mri"):
            return -1, source + "; no Hermes prior for this sequence, run as unknown MR"
    try:
        return tasks.modality_id(value), source
    except InputError:
        where = "options['modality']" if source == "option" else f"the image ({source})"
        raise InputError(f"Hermes segments CT, PET and MRI; {where} is '{value}'.",
                         hint="Choose a CT, PET or MR image, or state the modality (CT, PET, T1, T2, cine, MR)."
                         ) from None


def window_from(options: dict) -> tuple[int, int, int]:
    edge = options.get("window", 128)
    if isinstance(edge, (list, tuple)) and len(set(edge)) == 1:
        edge = edge[0]
    if isinstance(edge, bool) or not isinstance(edge, int) or edge < 16 or edge % 16 or edge > 256:
        raise InputError(f"Hermes window {edge!r} is not a multiple of 16 between 16 and 256 (default 128).")
    return (edge, edge, edge)


def auto_batch_size(device: str, window=(128, 128, 128), amp: bool | None = None, free_bytes: int | None = None) -> int:
    """Windows per forward pass that fit in ``MEMORY_SHARE`` of the free memory (at least 1)."""
    kind = device_kind(device)
    per_window = WINDOW_BYTES["cuda_amp" if kind == "cuda" and amp is not False else
                              "cuda" if kind == "cuda" else "cpu"] * math.prod(window) / 128 ** 3
    return batch_that_fits(device, per_window, MAX_BATCH, MEMORY_SHARE, free_bytes)


class HermesBackend(Backend):
    """Hermes-R under the model contract; ``net`` is the loaded network (tests may set a stand-in)."""

    net = None
    weights_path = None
    #: what the last ``run`` used (modality, task ids, batch size ...), for logs and tests
    last_run: dict = {}

    def load(self, context: LoadContext) -> None:
        from .checkpoint import load_hermes_r

        self.weights_path = str(context.weights[0])
        self.net = load_hermes_r(context.weights[0], self.device)

    def modules(self) -> list:
        return [self.net] if self.net is not None else []

    def plan(self, volume: Volume, prompts, options: dict, *, plane: str = "axial") -> Plan:
        """Check options and prompts and settle everything ``run`` will use; no heavy work."""
        from .preprocess import SCHEMES

        options = dict(options or {})
        mod, mod_source = modality_from(volume, options)
        matches = tasks.resolve_prompts(list(prompts.texts), mod)  # InputError with suggestions
        ids: list[int] = []
        for m in matches:
            if m.task_id not in ids:
                ids.append(m.task_id)
        window = window_from(options)
        engine = options.get("engine") or "authors"
        if engine not in ("authors", "monai"):
            raise InputError(f"Unknown Hermes sliding-window engine '{engine}'; use 'authors' or 'monai'.")
        if engine == "monai":
            import importlib.util

            if importlib.util.find_spec("monai") is None:
                raise DependencyMissingError("The 'monai' sliding-window engine needs MONAI.", hint="pip install monai")
        scheme = options.get("scheme") or "two_step"
        if scheme not in SCHEMES:
            raise InputError(f"Unknown Hermes resampling scheme '{scheme}'; use one of {', '.join(SCHEMES)}.")
        amp = options.get("amp")
        if amp is not None and not isinstance(amp, bool):
            raise InputError(f"Hermes option 'amp' must be true or false, got {amp!r}.")
        batch = options.get("batch_size")
        if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
            raise InputError(f"Hermes option 'batch_size' must be a whole number of windows >= 1, got {batch!r}.")
        details = {"modality_id": mod, "modality_source": mod_source, "task_ids": ids,
                   "prompt_channel": {m.prompt: ids.index(m.task_id) for m in matches},
                   "concepts": {m.prompt: m.concept for m in matches},
                   "datasets": {m.prompt: m.dataset for m in matches},
                   "window": window, "engine": engine, "scheme": scheme, "amp": amp,
                   "batch_size_auto": batch is None}
        size = batch or auto_batch_size(self.device, window, amp)
        report = {k: details[k] for k in ("modality_id", "modality_source", "task_ids", "concepts", "datasets",
                                          "engine", "scheme")}
        report["window"] = list(window)
        return Plan(batch_size=size, units=f"window(s) of {window[0]}^3", details=details, report=report)

    def run(self, volume: Volume, prompts, plan: Plan, *, progress, cancelled) -> ModelOutput:
        from .inference import predict_on_volume

        details = plan.details
        if cancelled():
            raise CancelledError("Hermes inference was cancelled; nothing was written.")
        batch = plan.batch_size
        self.last_run = {**details, "batch_size": batch}
        progress(f"Hermes: preparing ({batch} window{'s' if batch > 1 else ''} per pass)", 0, 1)
        prob = predict_on_volume(self.net, volume, details["task_ids"], details["modality_id"],
                                 scheme=details["scheme"], device=self.device, window=details["window"],
                                 sw_batch_size=batch, engine=details["engine"], amp=details["amp"],
                                 progress=progress, cancelled=cancelled)
        progress("Hermes: done", 1, 1)
        return ModelOutput({p: np.ascontiguousarray(prob[c], dtype=np.float32)
                            for p, c in details["prompt_channel"].items()}, report={"batch_size": batch})
