"""Loading backends and keeping them warm: the one place that imports model code.

A backend class comes from its model folder (``model.json``'s ``backend``); the engine
finds and verifies its weights (``runtime.weights``: --weights, $BIOMEDSEG_WEIGHTS_DIR, the
package, the hub cache, a download) and hands them over in a ``LoadContext``. Loaded
backends stay warm, least recently used first out when memory runs short or
``BIOMEDSEG_MAX_WARM`` is reached.
"""
from __future__ import annotations

import gc
import os
from pathlib import Path
from collections import OrderedDict

from ..catalog import ModelEntry, get_model
from ..errors import BiomedSegError, DependencyMissingError, InputError, WeightsMissingError
from ..models.base import LoadContext
from ..runtime.device import free_memory_bytes, is_out_of_memory, release_memory, resolve_device
from ..runtime.weights import resolve_weights

#: Loaded backends, least recently used first; evicted when memory runs short.
_WARM: "OrderedDict[tuple, object]" = OrderedDict()
MAX_WARM = int(os.environ.get("BIOMEDSEG_MAX_WARM", "2"))
#: Called with a backend just before it is evicted (the session store closes its sessions).
EVICTION_HOOKS: list = []


def check_runnable(entry: ModelEntry) -> None:
    """Refuse a model whose backend is absent or whose packages are missing, saying what to do."""
    if not entry.backend:
        raise InputError(f"Model '{entry.id}' is in the catalogue but its backend is not part of this release.")
    missing = entry.missing_requirements()
    if missing:
        raise DependencyMissingError(f"Model '{entry.id}' needs {', '.join(missing)}, which is not installed in "
                                     "this Python environment.", hint=f"pip install {' '.join(missing)}")


def backend_class(entry: ModelEntry):
    return entry.resolve(entry.backend)


def new_backend(entry: ModelEntry, device: str):
    """An unloaded instance: cheap, for ``plan`` before any weights are needed."""
    return backend_class(entry)(device=device)


def warm_key(model_id: str, device: str, weights: str | None) -> tuple:
    return (model_id, device, str(weights or ""))


def warm_backend(model_id: str, device: str, weights: str | None):
    """The warm backend for this key, or None."""
    key = warm_key(model_id, device, weights)
    if key in _WARM:
        _WARM.move_to_end(key)
        return _WARM[key]
    return None


def load_backend(model_id: str, device: str = "auto", weights: str | None = None, backend=None):
    """Load (or reuse a warm) backend; returns (backend, device reason).

    ``backend``: an unloaded instance made by ``new_backend`` for this device (after ``plan``).
    Errors say what is missing and how to get it.
    """
    entry = get_model(model_id)
    check_runnable(entry)
    device, reason = resolve_device(device)
    warm = warm_backend(model_id, device, weights)
    if warm is not None:
        return warm, reason
    paths = resolve_weights(entry.weights, local_path=weights)  # WeightsMissingError with what to do
    _make_room(entry.weights.get("size_bytes", 0), device)
    backend = backend if backend is not None and backend.device == device else new_backend(entry, device)
    try:
        backend.load(LoadContext(model_id, device, list(paths), entry.folder, dict(entry.data)))
    except BiomedSegError:
        raise
    except OSError as exc:  # unreadable, vanished or not a file
        raise WeightsMissingError(f"Weights for '{model_id}' could not be opened: "
                                  f"{exc.filename or ', '.join(map(str, paths))}: {exc.strerror or exc}.",
                                  hint="Check the file, or pass another one with --weights.") from None
    except RuntimeError as exc:  # torch: not a checkpoint, truncated, another format
        if is_out_of_memory(exc):
            raise
        raise WeightsMissingError(f"Weights for '{model_id}' could not be loaded from "
                                  f"{', '.join(map(str, paths))}: {str(exc).splitlines()[0][:300]}.",
                                  hint="The file is damaged or not this model's; download it again or pass "
                                       "another one with --weights.") from None
    _WARM[warm_key(model_id, device, weights)] = backend
    _WEIGHT_FILES[warm_key(model_id, device, weights)] = (list(paths), dict(entry.weights))
    return backend, reason


#: warm key -> (weight files, the catalogue's weights entry): what a run report names and hashes.
_WEIGHT_FILES: dict = {}


def weights_used(model_id: str, device: str, weights: str | None) -> list[dict]:
    """[{file, path, sha256}] of the weights the warm backend was loaded from (for run reports); sha256 is
    None where it would have to be hashed now (the front end that writes a report hashes it)."""
    from ..runtime.weights import file_sha256

    paths, spec = _WEIGHT_FILES.get(warm_key(model_id, device, weights), ([], {}))
    return [{"file": Path(p).name, "path": str(p), "sha256": file_sha256(p, spec, compute=False)} for p in paths]


def _evict_oldest() -> None:
    _, backend = _WARM.popitem(last=False)
    for hook in EVICTION_HOOKS:
        hook(backend)
    release = getattr(backend, "release", None)
    if release is not None:
        release()
    release_memory(backend.device)


def _make_room(model_bytes: int, device: str) -> None:
    """Evict least recently used models until the new one (about 2x its weights) fits."""
    while _WARM and (len(_WARM) >= MAX_WARM or free_memory_bytes(device) < 2 * model_bytes):
        _evict_oldest()


def warm_models() -> list[dict]:
    return [{"model": k[0], "device": k[1], "weights": k[2] or None} for k in _WARM]


def unload_all() -> None:
    """Drop every loaded model and give its memory back."""
    while _WARM:
        _evict_oldest()
    gc.collect()
