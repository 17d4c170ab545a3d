"""The model catalogue: which models exist, what they take, where their weights come from.

The data lives in ``resources/models.json`` (checked against ``models.schema.json``) so
the panel, the CLI and the worker agree on one list. Nothing here imports torch or model
code; the state of a model on this machine is found by looking, not by loading. A model
with a large fixed vocabulary may name torch-free functions instead of listing it:
``targets_provider`` (returns the {modality: {site: [prompt]}} table) and
``prompt_check`` (raises InputError for prompts it cannot do, before anything loads).
"""
from __future__ import annotations

import difflib
import importlib.util
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from .errors import InputError
from .weights import weights_state


@dataclass(frozen=True)
class ModelEntry:
    data: dict

    def __getattr__(self, key):
        try:
            return self.data[key]
        except KeyError:
            raise AttributeError(key) from None

    @property
    def weights(self) -> dict:
        return self.data["weights"]

    def target_table(self) -> dict:
        """{modality: {site: [prompt, ...]}} from ``targets``, ``targets_file`` or ``targets_provider``."""
        table = self.data.get("targets")
        if table is None and self.data.get("targets_file"):
            table = json.loads(_resource_text(self.data["targets_file"]))["targets"]
        if table is None and self.data.get("targets_provider"):
            table = _provided_targets(self.data["targets_provider"])
        return table or {}

    def targets(self, modality: str | None = None, site: str | None = None) -> list[str]:
        """Recommended prompts, for one modality/site or all of them (sorted, unique)."""
        table = self.target_table()
        names = set()
        for mod, sites in table.items():
            if modality and mod.lower() != modality.lower():
                continue
            for s, targets in sites.items():
                if site and s.lower() != site.lower():
                    continue
                names.update(targets)
        return sorted(names)

    def missing_requirements(self) -> list[str]:
        return [name for name in self.data["requires"] if importlib.util.find_spec(name) is None]

    def state(self) -> dict:
        """Whether this model can run here, and if not, what is missing (for CLI and panel)."""
        if not self.data.get("backend"):
            return {"ready": False, "state": "not available in this version",
                    "detail": "the backend for this model is not part of this release yet"}
        missing = self.missing_requirements()
        if missing:
            return {"ready": False, "state": "dependencies missing",
                    "detail": f"install {', '.join(missing)} in the worker's Python environment"}
        weights = weights_state(self.data["weights"])
        if not weights["present"]:
            return {"ready": False, "state": "weights to download" if self.weights["source"] == "hub"
                    else "weights missing", "detail": weights["detail"]}
        return {"ready": True, "state": "ready", "detail": weights["detail"]}


def _call(path: str, *args):
    """Call a torch-free 'package.module:function' named by the catalogue."""
    module_name, _, func = path.partition(":")
    return getattr(importlib.import_module(module_name), func)(*args)


@lru_cache(maxsize=None)
def _provided_targets(path: str) -> dict:
    return _call(path)


def _resource_text(name: str) -> str:
    return resources.files("biomedseg.resources").joinpath(name).read_text()


@lru_cache(maxsize=1)
def load_catalog() -> tuple[ModelEntry, ...]:
    """The bundled catalogue plus any files listed in ``$BIOMEDSEG_EXTRA_MODELS``.

    Extra files (``os.pathsep``-separated) use the same schema; they let a site add its own
    models (and the tests add controllable ones) without editing the package.
    """
    data = json.loads(_resource_text("models.json"))
    for extra in filter(None, os.environ.get("BIOMEDSEG_EXTRA_MODELS", "").split(os.pathsep)):
        try:
            data["models"] += json.loads(Path(extra).read_text())["models"]
        except (OSError, ValueError, KeyError) as exc:
            raise InputError(f"Extra model catalogue '{extra}' cannot be read ({exc}).") from None
    validate_catalog(data)
    return tuple(ModelEntry(m) for m in data["models"])


def validate_catalog(data: dict) -> None:
    """Check catalogue data against its JSON schema (and that ids are unique)."""
    import jsonschema

    schema = json.loads(_resource_text("models.schema.json"))
    jsonschema.validate(data, schema)
    ids = [m["id"] for m in data["models"]]
    if len(ids) != len(set(ids)):
        raise ValueError(f"duplicate model ids in catalogue: {ids}")


def get_model(model_id: str) -> ModelEntry:
    for entry in load_catalog():
        if entry.id == model_id:
            return entry
    known = ", ".join(e.id for e in load_catalog())
    raise InputError(f"Unknown model '{model_id}'. Known models: {known} (see `biomedseg models`).")


def default_model_id() -> str:
    return "deepbet"


def check_prompts(model_id: str, prompts: list[str]) -> list[str]:
    """Clean prompts (strip, drop duplicates) and refuse ones a fixed-vocabulary model can't do."""
    entry = get_model(model_id)
    cleaned = []
    for p in prompts:
        p = " ".join(str(p).split())
        if p and p.lower() not in {c.lower() for c in cleaned}:
            cleaned.append(p)
    if not cleaned:
        suggestions = ", ".join(entry.targets()[:8])
        raise InputError(f"No prompt given for model '{model_id}'.",
                         hint=f"Try: {suggestions}." if suggestions else None)
    if entry.data.get("prompt_check"):  # the model's own vocabulary check (synonyms, close matches)
        _call(entry.data["prompt_check"], cleaned)
    elif entry.prompt_kind == "fixed":
        known = entry.targets()
        for p in cleaned:
            if p.lower() not in {k.lower() for k in known}:
                close = difflib.get_close_matches(p.lower(), known, n=3, cutoff=0.5)
                raise InputError(f"Model '{model_id}' cannot segment '{p}'; it knows only: {', '.join(known)}.",
                                 hint=f"Did you mean {', '.join(close)}?" if close else None)
    return cleaned
