"""The engine's backend for Hermes-R: the user's checkpoint, typed prompts, the authors'
pre- and post-processing, and a batched sliding window with progress and cancel.

``predict`` works in this order, so that mistakes cost nothing:
1. options are checked and the modality is settled (``options['modality']``, else the
   image's DICOM modality ``CT`` / ``MR`` / ``PT``, else a CT guess from Hounsfield-like
   intensities, else "unknown MR");
2. every prompt is mapped to a task id (``tasks.resolve_prompt``; an unknown prompt is an
   InputError with close matches) -- the catalogue's ``prompt_check`` already did this
   before the model was loaded;
3. only then the volume is resampled to 1.5 mm, windows run ``batch_size`` at a time
   (float16 autocast on CUDA) with a progress event per forward pass and a cancel check
   before each, and the probabilities are resampled back onto the input grid.

Options (all optional): ``modality`` (CT, PET, T1, T2, cine, MR or an id -1..4),
``batch_size`` (windows per forward pass; default: as many as fit in free memory, at
most 8 on CUDA and 1 on a CPU, halved on its own if memory still runs out),
``engine`` ("authors" or "monai" stitching), ``scheme`` (the authors' resampling
scheme, see ``preprocess.SCHEMES``), ``amp`` (False turns CUDA autocast off) and
``window`` (edge of the cubic window, default 128 as trained; smaller windows are
faster and lighter but see less context than the network was trained with).

Hermes is multi-label and its prompts interact: every task token attends to the image
and to the other tokens, so one prompt's map can change a little with the others
asked for in the same run (as in the authors' validation, which asks for a whole
dataset's labels at once).
"""
from __future__ import annotations

import math

import numpy as np

from ...catalog import get_model
from ...errors import DependencyMissingError, InputError, OutOfMemoryError
from ...imaging_guess import guess_modality
from ...inference.device import device_kind, free_memory_bytes, is_out_of_memory, release_memory
from ...volume import Volume
from ...weights import resolve_weights
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
    if free_bytes is None:
        free_bytes = free_memory_bytes(device)
    per_window = WINDOW_BYTES["cuda_amp" if kind == "cuda" and amp is not False else
                              "cuda" if kind == "cuda" else "cpu"] * math.prod(window) / 128 ** 3
    return max(1, min(MAX_BATCH[kind], int(free_bytes * MEMORY_SHARE // per_window)))


class HermesBackend:
    model_id = "hermes"
    #: Hermes is multi-label and its targets can be several pieces (lesions): no post-processing by default.
    default_postprocess = {"keep_largest": False, "fill_holes": False}

    def __init__(self, device: str = "cpu", weights: str | None = None):
        spec = get_model(self.model_id).weights
        paths = resolve_weights(spec, local_path=weights)  # WeightsMissingError with the catalogue's instructions
        from .checkpoint import load_hermes_r

        self.device = device
        self.weights_path = str(paths[0])
        self.net = load_hermes_r(paths[0], device)
        #: What the last ``predict`` used (modality, task ids, batch size ...), for logs and tests.
        self.last_run: dict = {}

    def plan(self, volume: Volume, prompts: list[str], options: dict | None = None) -> dict:
        """Check options and prompts and settle everything ``predict`` will use; no heavy work."""
        from .preprocess import SCHEMES

        options = dict(options or {})
        mod, mod_source = modality_from(volume, options)
        matches = tasks.resolve_prompts(list(prompts), mod)  # InputError with suggestions
        ids: list[int] = []
        for m in matches:
            if m.task_id not in ids:
                ids.append(m.task_id)
        window = window_from(options)
        engine = options.get("engine", "authors")
        if engine not in ("authors", "monai"):
            raise InputError(f"Unknown Hermes sliding-window engine '{engine}'; use 'authors' or 'monai'.")
        if engine == "monai":
            import importlib.util

            if importlib.util.find_spec("monai") is None:
                raise DependencyMissingError("The 'monai' sliding-window engine needs MONAI.", hint="pip install monai")
        scheme = options.get("scheme", "two_step")
        if scheme not in SCHEMES:
            raise InputError(f"Unknown Hermes resampling scheme '{scheme}'; use one of {', '.join(SCHEMES)}.")
        amp = options.get("amp")
        if amp is not None and not isinstance(amp, bool):
            raise InputError(f"Hermes option 'amp' must be true or false, got {amp!r}.")
        batch = options.get("batch_size")
        if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
            raise InputError(f"Hermes option 'batch_size' must be a whole number of windows >= 1, got {batch!r}.")
        return {"modality_id": mod, "modality_source": mod_source, "task_ids": ids,
                "prompt_channel": {m.prompt: ids.index(m.task_id) for m in matches},
                "concepts": {m.prompt: m.concept for m in matches},
                "datasets": {m.prompt: m.dataset for m in matches},
                "window": window, "engine": engine, "scheme": scheme, "amp": amp,
                "batch_size": batch, "batch_size_auto": batch is None}

    def predict(self, volume: Volume, prompts: list[str], *, progress, cancelled, options=None):
        from ...errors import CancelledError
        from .inference import predict_on_volume

        plan = self.plan(volume, prompts, options)
        if cancelled():
            raise CancelledError("Hermes inference was cancelled; nothing was written.")
        batch = plan["batch_size"] or auto_batch_size(self.device, plan["window"], plan["amp"])
        while True:
            self.last_run = {**plan, "batch_size": batch}
            progress(f"Hermes: preparing ({batch} window{'s' if batch > 1 else ''} per pass)", 0, 1)
            try:
                prob = predict_on_volume(self.net, volume, plan["task_ids"], plan["modality_id"], scheme=plan["scheme"],
                                         device=self.device, window=plan["window"], sw_batch_size=batch,
                                         engine=plan["engine"], amp=plan["amp"], progress=progress,
                                         cancelled=cancelled)
                break
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
            # out of memory; the exception (and the frames holding its tensors) is gone here
            self._free_memory()
            if not (plan["batch_size_auto"] and batch > 1):
                raise OutOfMemoryError(f"Hermes ran out of memory on {self.device} with {batch} window(s) of "
                                       f"{plan['window'][0]}^3 per pass.",
                                       hint="Use a smaller batch_size, close other programs, or run on a GPU.")
            batch //= 2  # our own guess was too big: halve it and start again
            progress(f"Hermes: out of memory, retrying with {batch} window(s) per pass", 0, 1)
        progress("Hermes: done", 1, 1)
        return {p: np.ascontiguousarray(prob[c], dtype=np.float32) for p, c in plan["prompt_channel"].items()}

    def _free_memory(self) -> None:
        release_memory(self.device)
