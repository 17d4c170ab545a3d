"""INPUTS to cases: a folder, a glob, or a CSV/JSON manifest with per-case prompts and options.

Each case gets a name that is unique in the batch (its outputs and its row in the summary are
named after it): the file's stem, with its parent folders' names in front where stems collide
(``sub-01/T1.nii.gz`` and ``sub-02/T1.nii.gz`` are ``sub-01_T1`` and ``sub-02_T1``).
"""
from __future__ import annotations

import csv
import glob
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from ..io.readers import DICOM_SUFFIXES, READABLE, suffix_of

#: What a manifest row may hold; per-case fields replace the command line's (options are merged).
MANIFEST_FIELDS = ("input", "case", "prompt", "prompts", "options", "modality", "site")
#: Files that are never cases (our own outputs if OUTDIR lies inside INPUTS, label tables).
_NOT_IMAGES = (".seg.nrrd", ".labels.json", ".labels.csv")


@dataclass
class Case:
    """One image to segment, with what its manifest row adds to the command line."""

    name: str
    input: Path
    #: text targets of this case (None: the command line's)
    prompt: list[str] | None = None
    #: typed prompts in the worker's form (JSON manifests only; None: the command line's)
    prompts: list[dict] | None = None
    #: model options of this case, over the command line's
    options: dict = field(default_factory=dict)


def find_cases(inputs: str) -> list[Case]:
    """The cases INPUTS names, in a stable order (sorted paths; a manifest's own order)."""
    path = Path(inputs)
    if path.is_file() and suffix_of(path).lower() in (".csv", ".json"):
        cases = read_manifest(path)
    elif path.is_dir():
        cases = [Case("", p) for p in _images_in(path)]
        if not cases:
            raise InputError(f"Folder '{path}' holds no image files or DICOM folders.",
                             hint=f"Images end in {', '.join(READABLE)}.")
    elif path.is_file():
        cases = [Case("", path)]
    else:
        matches = sorted(Path(p) for p in glob.glob(str(inputs), recursive=True))
        cases = [Case("", p) for p in matches if _is_image(p) or _is_dicom_folder(p)]
        if not cases:
            raise InputError(f"'{inputs}' is no file, folder or glob that matches an image.",
                             hint="Give a folder, a quoted glob such as 'data/*/T1.nii.gz', or a CSV/JSON manifest.")
    return _named(cases)


def _is_image(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and not name.startswith(".") and suffix_of(path).lower() in READABLE \
        and not name.endswith(_NOT_IMAGES)


def _is_dicom_folder(path: Path) -> bool:
    return path.is_dir() and any(suffix_of(p).lower() in DICOM_SUFFIXES for p in path.iterdir() if p.is_file())


def _images_in(folder: Path) -> list[Path]:
    """Image files of the folder, and its sub-folders that hold DICOM files (one case each)."""
    entries = sorted(folder.iterdir())
    return [p for p in entries if _is_image(p) or _is_dicom_folder(p)]


def _stem(path: Path) -> str:
    name = path.name
    suffix = suffix_of(path)
    return name[: -len(suffix)] if suffix and name.lower().endswith(suffix.lower()) else name


def _safe(name: str) -> str:
    """A file name part: anything but letters, digits, '.', '-', '_' becomes '_'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "case"


def _auto_name(path: Path, folders: int) -> str:
    """The stem with the names of ``folders`` parent folders in front."""
    parents = path.resolve().parent.parts[1:]
    return _safe("_".join([*parents[len(parents) - folders:], _stem(path)] if folders else [_stem(path)]))


def _named(cases: list[Case]) -> list[Case]:
    """Fill in missing names from the paths, adding parent folders where names collide; refuse two
    cases of one name that no folder tells apart (or that a manifest named so)."""
    auto = {id(c): 0 for c in cases if not c.name}
    while True:
        for case in cases:
            if id(case) in auto:
                case.name = _auto_name(case.input, auto[id(case)])
        groups: dict[str, list[Case]] = {}
        for case in cases:
            groups.setdefault(case.name, []).append(case)
        clashes = [group for group in groups.values() if len(group) > 1]
        grow = [c for group in clashes for c in group
                if id(c) in auto and auto[id(c)] < len(c.input.resolve().parent.parts) - 1]
        if not grow:
            break
        for case in grow:
            auto[id(case)] += 1
    if clashes:
        raise InputError(f"Case name '{clashes[0][0].name}' is given to {len(clashes[0])} inputs "
                         f"({', '.join(str(c.input) for c in clashes[0][:3])}).",
                         hint="Give each case its own name in the manifest's 'case' column.")
    return cases


# ---- manifests ------------------------------------------------------------------------------

def read_manifest(path: Path) -> list[Case]:
    """A CSV (a header row with an ``input`` column) or JSON (a list of objects, or {"cases": [...]})
    manifest. Relative inputs are relative to the manifest's folder."""
    if suffix_of(path).lower() == ".csv":
        rows = _csv_rows(path)
    else:
        rows = _json_rows(path)
    if not rows:
        raise InputError(f"Manifest '{path}' lists no cases.")
    return [_case_of(row, n + 1, path) for n, row in enumerate(rows)]


def _csv_rows(path: Path) -> list[dict]:
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"Manifest '{path}' cannot be read as CSV ({exc}).") from None
    out = []
    for row in rows:
        row = {str(k).strip(): (v or "").strip() for k, v in row.items() if k is not None}
        row = {k: v for k, v in row.items() if v != ""}
        if "options" in row:
            row["options"] = _json_field(row["options"], "options", path)
        if row:
            out.append(row)
    return out


def _json_rows(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise InputError(f"Manifest '{path}' cannot be read ({exc.strerror or exc}).") from None
    except ValueError as exc:
        raise InputError(f"Manifest '{path}' is not JSON ({exc}).") from None
    if isinstance(data, dict) and isinstance(data.get("cases"), list):
        data = data["cases"]
    if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
        raise InputError(f"Manifest '{path}' must hold a list of cases (objects with an 'input'), "
                         "or {\"cases\": [...]}.")
    return data


def _json_field(text: str, what: str, path: Path):
    try:
        return json.loads(text)
    except ValueError:
        raise InputError(f"The '{what}' column of '{path}' must hold JSON (e.g. {{\"mode\": \"fast\"}}), "
                         f"got {text!r}.") from None


def _case_of(row: dict, n: int, manifest: Path) -> Case:
    unknown = sorted(set(row) - set(MANIFEST_FIELDS))
    if unknown:
        raise InputError(f"Case {n} of '{manifest}' has unknown field(s) {', '.join(map(repr, unknown))}; "
                         f"a case takes {', '.join(MANIFEST_FIELDS)}.")
    if not row.get("input"):
        raise InputError(f"Case {n} of '{manifest}' has no 'input'.")
    source = Path(str(row["input"])).expanduser()
    source = source if source.is_absolute() else manifest.parent / source
    options = row.get("options") or {}
    if not isinstance(options, dict):
        raise InputError(f"'options' of case {n} in '{manifest}' must be an object, got {json.dumps(options)}.")
    options = dict(options)
    for key in ("modality", "site"):
        if row.get(key):
            options[key] = str(row[key])
    prompt = row.get("prompt")
    if prompt is not None:
        from ..prompts import parse_text_prompts

        prompt = parse_text_prompts(prompt if isinstance(prompt, list) else str(prompt))
    prompts = row.get("prompts")
    if prompts is not None and not isinstance(prompts, list):
        raise InputError(f"'prompts' of case {n} in '{manifest}' must be a list of prompts "
                         '(e.g. [{"type": "box", ...}]).')
    name = _safe(str(row["case"])) if row.get("case") else ""
    return Case(name, source, prompt, prompts, options)
