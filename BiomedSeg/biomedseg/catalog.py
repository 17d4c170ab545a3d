"""The model catalogue: which models exist, what they take, where their weights come from.

It is assembled from the model folders (``models/<name>/model.json``, each checked against
``resources/model.schema.json``) plus what ``$BIOMEDSEG_EXTRA_MODELS`` names
(``os.pathsep``-separated): a model folder, a folder of model folders, or a catalogue file
``{"schema_version": 1, "models": [...]}`` whose entries live in the file's folder. So the
panel, the CLI and the worker agree on one list, and a site adds a model by adding a folder.

Nothing here imports torch or backend code; the state of a model on this machine is found
by looking, not by loading. Names in a model.json (``backend``, ``targets_provider``,
``prompt_check``, ``targets_file``) are relative to its folder; the folder is imported as a
package of its own, so its code can import its neighbours relatively.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import math
import os
import re
import shutil
import sys
import types
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from .errors import InputError
from .prompts import MaskPrompt, TextPrompt, as_prompts, clean_text
from .runtime.weights import cache_dir, weights_state

MODELS_DIR = Path(__file__).resolve().parent / "models"
EXTRA_PACKAGE = "biomedseg_extra_models"


@dataclass(frozen=True, eq=False)
class ModelEntry:
    """One model's catalogue entry and the folder it lives in."""

    data: dict
    folder: Path | None = None
    #: the Python package the folder is imported as
    package: str = ""

    def __getattr__(self, key):
        try:
            return self.data[key]
        except KeyError:
            raise AttributeError(key) from None

    @property
    def weights(self) -> dict:
        return self.data["weights"]

    @property
    def prompt_types(self) -> list[str]:
        return list(self.data.get("prompt_types", ["text"]))

    @property
    def results(self) -> list[str]:
        return list(self.data.get("results", ["masks"]))

    @property
    def options(self) -> dict:
        """Declared options: name -> {type, default, help, ...}."""
        return dict(self.data.get("options", {}))

    @property
    def interactive(self) -> bool:
        return bool(self.data.get("interactive", False))

    @property
    def postprocess_defaults(self) -> dict:
        defaults = {"keep_largest": False, "fill_holes": False}
        defaults.update(self.data.get("postprocess", {}))
        return defaults

    def resource(self, name: str) -> Path:
        """A file of the model's folder (targets, terminology, ...)."""
        return (self.folder or MODELS_DIR) / name

    def target_table(self) -> dict:
        """{modality: {site: [prompt, ...]}} from ``targets``, ``targets_file`` or ``targets_provider``."""
        table = self.data.get("targets")
        if table is None and self.data.get("targets_file"):
            table = json.loads(self.resource(self.data["targets_file"]).read_text())["targets"]
        if table is None and self.data.get("targets_provider"):
            table = _provided_targets(self, self.data["targets_provider"])
        return table or {}

    def targets(self, modality: str | None = None, site: str | None = None) -> list[str]:
        """Recommended prompts, for one modality/site or all of them (sorted, unique)."""
        names = set()
        for mod, sites in self.target_table().items():
            if modality and mod.lower() != modality.lower():
                continue
            for s, targets in sites.items():
                if site and s.lower() != site.lower():
                    continue
                names.update(targets)
        return sorted(names)

    def missing_requirements(self) -> list[str]:
        importlib.invalidate_caches()
        return [name for name in self.data["requires"] if importlib.util.find_spec(name) is None]

    def state(self) -> dict:
        """Whether this model can run here, and if not, what is missing (for CLI and panel).

        A model that runs only on CUDA says "needs an NVIDIA GPU" on a machine without one, before its
        packages or weights are looked at (nothing is offered for download); a model with an
        ``environment`` of its own is checked there (``biomedseg env create``), not in this Python."""
        if not self.data.get("backend"):
            return {"ready": False, "state": "not available in this version",
                    "detail": "the backend for this model is not part of this release yet"}
        devices = self.data.get("devices") or []
        if devices and all(d == "cuda" for d in devices):
            gpu, why = nvidia_gpu()
            if not gpu:
                return {"ready": False, "state": "needs an NVIDIA GPU",
                        "detail": f"this model runs only on CUDA (an NVIDIA GPU), and {why}; nothing is downloaded "
                                  "for it here"}
        env = self.data.get("environment")
        if env and not inside_environment(env["name"]):
            if environment_python(env["name"]) is None:
                return {"ready": False, "state": "environment to create",
                        "detail": f"it runs in a Python environment of its own: run `biomedseg env create "
                                  f"{env['name']}`"}
            missing = []  # its packages were installed and checked when the environment was made
        else:
            missing = self.missing_requirements()
        if missing:
            return {"ready": False, "state": "dependencies missing",
                    "detail": f"install {', '.join(missing)} in the worker's Python environment"}
        weights = weights_state(self.data["weights"])
        if not weights["present"]:
            return {"ready": False, "state": "weights to download" if self.weights["source"] == "hub"
                    else "weights missing", "detail": weights["detail"]}
        return {"ready": True, "state": "ready", "detail": weights["detail"]}

    def worker_python(self) -> str | None:
        """The Python this model's worker runs in when it has an environment of its own (None: any)."""
        env = self.data.get("environment")
        return environment_python(env["name"]) if env else None

    def resolve(self, path: str):
        """The object a 'module:name' of this model.json names (module relative to the folder)."""
        module_name, _, attr = path.partition(":")
        return getattr(import_model_module(self, module_name), attr)


# ---- where a model can run: an NVIDIA GPU, its own environment ----------------------------

def nvidia_gpu() -> tuple[bool, str]:
    """(whether an NVIDIA GPU can be used here, why not), found without torch: a driver, and
    CUDA_VISIBLE_DEVICES not hiding every device."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False, "CUDA_VISIBLE_DEVICES hides every GPU"
    if sys.platform == "darwin":
        return False, "macOS has no CUDA"
    if os.path.exists("/proc/driver/nvidia/version") or shutil.which("nvidia-smi"):
        return True, "an NVIDIA driver is installed"
    if os.name == "nt" and (Path(os.environ.get("SystemRoot", r"C:\Windows")) / "System32" / "nvcuda.dll").is_file():
        return True, "an NVIDIA driver is installed"
    return False, "this machine has no NVIDIA GPU driver (no nvidia-smi, no /proc/driver/nvidia)"


def environment_record_path(name: str) -> Path:
    """Where ``biomedseg env create NAME`` records the environment it made (its prefix, pins, checks)."""
    return cache_dir() / "envs" / f"{name}.json"


def environment_record(name: str) -> dict | None:
    try:
        record = json.loads(environment_record_path(name).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("prefix") else None


def environment_python(name: str) -> str | None:
    """The Python of the recorded environment NAME, when it is still there."""
    record = environment_record(name)
    python = record and record.get("python")
    return str(python) if python and Path(python).is_file() else None


def inside_environment(name: str) -> bool:
    """True in the Python of environment NAME itself (its worker checks its own packages)."""
    record = environment_record(name)
    try:
        return bool(record) and Path(sys.prefix).resolve() == Path(record["prefix"]).resolve()
    except OSError:
        return False


# ---- importing a model folder's code -----------------------------------------------------

def _extra_package_name(folder: Path) -> str:
    digest = hashlib.sha1(str(folder).encode()).hexdigest()[:10]
    safe = re.sub(r"\W", "_", folder.name) or "model"
    return f"{EXTRA_PACKAGE}.{safe}_{digest}"


def _ensure_package(name: str, folder: Path) -> None:
    """Register ``folder`` as the package ``name`` (no __init__.py needed) so relative imports work.
    ``name`` lives under the synthetic top-level package ``EXTRA_PACKAGE``."""
    if name in sys.modules:
        return
    if EXTRA_PACKAGE not in sys.modules:
        root = types.ModuleType(EXTRA_PACKAGE)
        root.__path__ = []
        sys.modules[EXTRA_PACKAGE] = root
    init = folder / "__init__.py"
    if init.is_file():
        spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(folder)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    else:
        module = types.ModuleType(name)
        module.__path__ = [str(folder)]
        module.__file__ = None
        sys.modules[name] = module


def import_model_module(entry: ModelEntry, module_name: str):
    """Import ``module_name`` from the model's folder; names that are not files there are absolute."""
    folder = entry.folder
    relative = folder is not None and ((folder / (module_name.replace(".", "/") + ".py")).is_file()
                                       or (folder / module_name.replace(".", "/")).is_dir())
    if not relative:
        return importlib.import_module(module_name)
    if entry.package.startswith(EXTRA_PACKAGE + "."):
        _ensure_package(entry.package, folder)
    return importlib.import_module(f"{entry.package}.{module_name}")


#: (package, 'module:function') -> the table a targets_provider returned (vocabularies do not change).
_PROVIDED: dict = {}


def _provided_targets(entry: ModelEntry, path: str) -> dict:
    key = (entry.package, path)
    if key not in _PROVIDED:
        _PROVIDED[key] = entry.resolve(path)()
    return _PROVIDED[key]


# ---- assembling the catalogue --------------------------------------------------------------

def _resource_text(name: str) -> str:
    return resources.files("biomedseg.resources").joinpath(name).read_text()


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{what} '{path}' cannot be read ({exc}).") from None


def expand_variants(data: dict) -> list[dict]:
    """An entry and its ``variants`` (other checkpoints of the same model: same folder, backend and
    options, their own id, title and weight files), each a catalogue entry of its own."""
    if not isinstance(data, dict) or not isinstance(data.get("variants"), list):
        return [data]
    base = {k: v for k, v in data.items() if k != "variants"}
    out = [base]
    for variant in data["variants"]:
        if not isinstance(variant, dict):
            return [data]  # the schema check reports it
        entry = json.loads(json.dumps(base))
        entry.update({k: variant[k] for k in ("id", "title", "task") if k in variant})
        entry["weights"].update({k: variant[k] for k in ("files", "size_bytes") if k in variant})
        entry["weights"]["sha256"] = variant.get("sha256")  # never the base file's checksum
        entry["variant_of"] = base.get("id")
        out.append(entry)
    return out


def _folder_entries(folder: Path, what: str) -> list[tuple[dict, Path]]:
    return [(data, folder) for data in expand_variants(_read_json(folder / "model.json", what))]


def _extra_entries(path: Path) -> list[tuple[dict, Path]]:
    what = "Extra model catalogue"
    if path.is_dir() and (path / "model.json").is_file():
        return _folder_entries(path, what)
    if path.is_dir():
        return [pair for sub in sorted(path.iterdir()) if (sub / "model.json").is_file()
                for pair in _folder_entries(sub, what)]
    if path.is_file():
        data = _read_json(path, what)
        if not isinstance(data, dict) or not isinstance(data.get("models"), list):
            raise InputError(f"{what} '{path}' has no 'models' list.")
        return [(m, path.parent) for m in data["models"]]
    raise InputError(f"{what} '{path}' does not exist.", hint="Fix $BIOMEDSEG_EXTRA_MODELS.")


#: Extra catalogue entries that could not be used, as sentences (refreshed with the catalogue):
#: a broken site model is reported and skipped; the bundled models keep working.
PROBLEMS: list[str] = []


def _package_for(folder: Path, bundled: bool) -> str:
    if bundled and folder.name.isidentifier():
        return f"biomedseg.models.{folder.name}"
    return _extra_package_name(folder)


@lru_cache(maxsize=1)
def load_catalog() -> tuple[ModelEntry, ...]:
    """The bundled model folders plus what ``$BIOMEDSEG_EXTRA_MODELS`` names, each checked.

    A bundled entry that fails its schema is an error of this release; an extra one that cannot
    be read, fails the schema or repeats an id is left out and described in ``PROBLEMS``."""
    import jsonschema

    pairs = [pair for folder in sorted(MODELS_DIR.iterdir()) if (folder / "model.json").is_file()
             for pair in _folder_entries(folder, "Model catalogue entry")]
    pairs.sort(key=lambda pair: (pair[0].get("id") != default_model_id(), pair[1].name))  # the default first
    validate_entries([data for data, _ in pairs])
    entries = [ModelEntry(data, folder, _package_for(folder, True)) for data, folder in pairs]
    PROBLEMS.clear()
    for extra in filter(None, os.environ.get("BIOMEDSEG_EXTRA_MODELS", "").split(os.pathsep)):
        try:
            found = _extra_entries(Path(extra).expanduser().resolve())
        except InputError as exc:
            PROBLEMS.append(str(exc))
            continue
        for data, folder in found:
            where = f"'{folder / 'model.json'}'" if (folder / "model.json").is_file() else f"in '{extra}'"
            try:
                jsonschema.validate(data, model_schema())
            except jsonschema.ValidationError as exc:
                PROBLEMS.append(f"Extra model {where} was left out: {exc.message}"
                                + (f" (at {'/'.join(map(str, exc.absolute_path))})" if exc.absolute_path else "") + ".")
                continue
            if any(e.id == data["id"] for e in entries):
                PROBLEMS.append(f"Extra model {where} was left out: the id '{data['id']}' is taken.")
                continue
            entries.append(ModelEntry(data, folder, _package_for(folder, False)))
    return tuple(entries)


@lru_cache(maxsize=1)
def model_schema() -> dict:
    return json.loads(_resource_text("model.schema.json"))


def validate_entries(models: list[dict]) -> None:
    """Check model.json data against the schema, and that ids are unique."""
    import jsonschema

    schema = model_schema()
    for data in models:
        jsonschema.validate(data, schema)
    ids = [m["id"] for m in models]
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


# ---- declared options ----------------------------------------------------------------------
# Backend options are declared in each model.json and everything else is refused here, against
# the declarations: a typo (``--option p_vlaue=0``) or a value of the wrong type fails at once
# with the list of the model's options, before any weights are looked for or any model is
# loaded. Backends still check what a type cannot say (ranges that depend on each other, the
# modality of this image) in ``plan``.

TYPE_WORDS = {"bool": "true or false", "int": "a whole number", "number": "a number", "string": "text",
              "choice": "one of", "path": "a file path", "any": "a value"}


def describe_options(declared: dict) -> str:
    """'a (int), b (bool)' -- for error messages and `biomedseg models`."""
    return ", ".join(f"{name} ({spec['type']})" for name, spec in sorted(declared.items())) or "none"


def _check_value(model_id: str, name: str, spec: dict, value):
    kind = spec["type"]
    what = f"Option '{name}' of model '{model_id}'"
    if kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "number":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    elif kind in ("string", "path"):
        ok = isinstance(value, str)
    elif kind == "choice":
        ok = value in spec["choices"]
        if not ok:
            raise InputError(f"{what} must be one of {', '.join(map(str, spec['choices']))}, got {value!r}.",
                             hint=spec["help"])
    else:
        ok = True
    if not ok:
        raise InputError(f"{what} must be {TYPE_WORDS[kind]}, got {value!r}.", hint=spec["help"])
    if kind in ("int", "number"):
        if "min" in spec and value < spec["min"]:
            raise InputError(f"{what} must be at least {spec['min']}, got {value!r}.", hint=spec["help"])
        if "max" in spec and value > spec["max"]:
            raise InputError(f"{what} must be at most {spec['max']}, got {value!r}.", hint=spec["help"])
    return value


#: Options every model takes: what the image is, for the modality guard and the target checks. They
#: reach a backend only when its model.json declares them too.
ENGINE_OPTIONS = ("modality", "site")


def check_options(model_id: str, declared: dict, options: dict | None) -> dict:
    """The options with every declared name present (defaults filled in); InputError naming an
    undeclared option and listing the declared ones, or a value of the wrong type. ``modality`` and
    ``site`` are taken from every model (``ENGINE_OPTIONS``) and dropped for those that do not declare them."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(declared) - set(ENGINE_OPTIONS))
    if unknown:
        names = ", ".join(repr(u) for u in unknown)
        raise InputError(f"Model '{model_id}' has no option {names}.",
                         hint=f"Its options are: {describe_options(declared)} (see `biomedseg models`).")
    out = {}
    for name, spec in declared.items():
        value = options.get(name)
        out[name] = spec.get("default") if value is None else _check_value(model_id, name, spec, value)
    return out


# ---- prompts -----------------------------------------------------------------------------
#: The most prompts one run takes, and the longest text prompt (the same in the worker and in-process).
MAX_PROMPTS = 1000
MAX_PROMPT_CHARS = 1000


def check_prompts(model_id: str, prompts, free_text: bool = False) -> list:
    """Typed, cleaned prompts the model can take: text stripped and de-duplicated, prompt types
    the model declares, and text checked against the model's targets (``vocabulary``): a name it
    does not know is refused with the closest ones unless ``free_text``. A model with one target
    (deepbet's brain) needs no prompt."""
    from .vocabulary import check_texts

    entry = get_model(model_id)
    cleaned, seen = [], set()
    prompts = as_prompts(prompts)
    if len(prompts) > MAX_PROMPTS:
        raise InputError(f"{len(prompts)} prompts are more than one run takes ({MAX_PROMPTS}).",
                         hint="Split them over several runs.")
    for p in prompts:
        if isinstance(p, TextPrompt) and len(p.text) > MAX_PROMPT_CHARS:
            raise InputError(f"A prompt of {len(p.text)} characters is longer than any target name "
                             f"({MAX_PROMPT_CHARS}).", hint="Name the target in a few words.")
        if isinstance(p, TextPrompt):
            text = clean_text(p.text)
            if not text or text.lower() in seen:
                continue
            seen.add(text.lower())
            p = TextPrompt(text)
        elif isinstance(p, MaskPrompt) and not p.mask.any():
            raise InputError(f"The mask prompt for {p.target!r} is empty.", hint="Choose a segment that has voxels.")
        if p.type not in entry.prompt_types:
            raise InputError(f"Model '{model_id}' does not take {p.type} prompts; it takes "
                             f"{', '.join(entry.prompt_types)}.")
        cleaned.append(p)
    if not cleaned and entry.data.get("prompts_optional"):
        return []  # the model has a use without prompts (BiomedCLIP recognises the image)
    if not cleaned and "text" in entry.prompt_types and len(entry.targets()) == 1:
        return [TextPrompt(entry.targets()[0])]  # its one target: nothing to choose
    if not cleaned:
        suggestions = ", ".join(entry.targets()[:8])
        raise InputError(f"No prompt given for model '{model_id}'.",
                         hint=f"Try: {suggestions}." if suggestions else None)
    texts = [p.text for p in cleaned if isinstance(p, TextPrompt)]
    if texts:
        spelled = iter(check_texts(entry, texts, free_text))
        respelled, seen = [], set()
        for p in cleaned:  # 'livers' and 'the liver' are one target once spelled as the model does
            if isinstance(p, TextPrompt):
                p = TextPrompt(next(spelled))
                if p.text.lower() in seen:
                    continue
                seen.add(p.text.lower())
            respelled.append(p)
        cleaned = respelled
    return cleaned
