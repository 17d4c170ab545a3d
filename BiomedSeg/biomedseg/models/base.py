"""The model contract: what a model folder provides and what the engine guarantees it.

A model is one folder, ``models/<name>/`` (or any folder named in ``$BIOMEDSEG_EXTRA_MODELS``):

* ``model.json`` -- its catalogue entry, checked against ``resources/model.schema.json``: id,
  title, task, input (2d/3d), modalities, ``prompt_types`` it takes (text, box, point, mask),
  ``results`` it returns (masks, labels, text), declared ``options`` (name -> type, default,
  one-line help), default post-processing, devices, weights (package, hub repo + file +
  sha256, or the user's file) and licence. ``backend`` names ``module:Class`` relative to the
  folder, so a copied folder with a new id is a new model; its targets file and torch-free
  ``targets_provider`` / ``prompt_check`` functions are relative to it too.
* a backend class implementing ``Backend`` below, plus its network code and resources.
  Inside the folder, code imports its own files relatively and the engine as ``biomedseg.*``.

The engine (``biomedseg.engine``) does, for every model, everything that is not the model:
the catalogue and prompt checks, refusing undeclared options (before any weights are
needed), the device, finding and verifying the weights, keeping loaded models warm, the
region (slice range or ROI: the backend is given the cropped volume and the result is put
back on the full grid), converting geometric prompts from patient RAS millimetres to the
backend's voxel grid, one out-of-memory policy (free memory, halve ``Plan.batch_size``,
retry down to 1, then a clear error), thresholds and post-processing, names, colours and
terminology. A backend knows nothing about Slicer, files or processes.

Lifecycle, per run:
1. ``cls(device)`` -- cheap: no weights, no big imports.
2. ``plan(volume, prompts, options, plane=...)`` -- validate what the declared types cannot
   (ranges, combinations, the modality of this image), settle defaults and size the work.
   ``volume`` is the whole image (so what it *is* is judged on all of it) and ``prompts`` are on
   its grid; raises InputError. Returns a ``Plan``. Called on a fresh or a warm instance; must
   not need the weights.
3. ``load(context)`` -- once per warm instance: read the weights from ``context.weights``.
4. ``run(volume, prompts, plan, progress=, cancelled=)`` -- ``volume`` is the region to work on
   (the whole image, or the crop a slice range or ROI makes: ``volume.meta['cropped_from']``) and
   ``prompts`` are on *its* grid, so indices from ``plan`` do not carry over; returns a
   ``ModelOutput`` keyed by ``prompts.targets`` on that volume's grid. Call
   ``progress(stage, done, total)`` between units of work and stop with ``CancelledError`` when
   ``cancelled()`` is true; list the torch modules it uses in ``modules()`` and the engine also
   stops inside their forward passes. Out-of-memory errors propagate (the engine handles them).

Interactive models (``"interactive": true``) also implement ``open_session(volume, plan,
progress=, cancelled=)`` returning a ``Session``: it keeps the image embedding warm, and each
``Session.run(prompts, plan, ...)`` (a new click) re-runs only what depends on the prompts.
The engine keeps sessions by id (``engine.sessions``) so a click sends no voxels again.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..prompts import PromptSet
from ..results import ModelOutput
from ..runtime.callbacks import CancelCheck, Progress
from ..volume import Volume


@dataclass
class LoadContext:
    """What ``Backend.load`` gets: where its weights are, found and verified by the engine."""

    model_id: str
    device: str
    #: the weight files, in the order model.json lists them
    weights: list[Path]
    #: the model's folder (for resources next to the backend)
    folder: Path
    #: the model's catalogue entry (model.json as loaded)
    entry: dict = field(default_factory=dict)

    def weight(self, name: str) -> Path:
        """The weight file whose name ends with ``name``."""
        for path in self.weights:
            if Path(path).name == Path(name).name:
                return Path(path)
        raise KeyError(f"{name} is not among the weights {', '.join(Path(p).name for p in self.weights)}")


@dataclass
class Plan:
    """What a run will do, settled before any heavy work.

    ``batch_size`` is the number of ``units`` (slices, windows) per forward pass, or None for a
    model without batches; the engine halves it when memory runs out. ``details`` holds the
    backend's own settled choices; ``report`` what to tell the person (JSON-able).
    """

    batch_size: int | None = None
    units: str = "units"
    details: Any = None
    report: dict = field(default_factory=dict)


class Session(Protocol):
    """An interactive model's warm state for one image."""

    def run(self, prompts: PromptSet, plan: Plan, *, progress: Progress, cancelled: CancelCheck) -> ModelOutput:
        ...

    def close(self) -> None:
        ...


class Backend:
    """Base class of every model backend (see the module docstring for the lifecycle)."""

    def __init__(self, device: str = "cpu"):
        self.device = device

    def plan(self, volume: Volume, prompts: PromptSet, options: dict, *, plane: str = "axial") -> Plan:
        return Plan()

    def load(self, context: LoadContext) -> None:
        raise NotImplementedError

    def run(self, volume: Volume, prompts: PromptSet, plan: Plan, *, progress: Progress,
            cancelled: CancelCheck) -> ModelOutput:
        raise NotImplementedError

    def release(self) -> None:
        """Drop caches before the engine evicts this model (optional)."""

    def modules(self) -> list:
        """The torch modules ``run`` computes with; the engine checks for a cancel before each of their
        submodules runs (``runtime.cancel``), so Cancel stops inside a long forward pass."""
        return []
