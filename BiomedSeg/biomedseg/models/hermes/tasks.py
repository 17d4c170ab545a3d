"""Typed prompts -> Hermes task ids.

Hermes knows 71 tasks by integer id (``hermes_tasks.json`` in this folder); the same organ
often has several ids, one per training dataset (liver: LiTS 0, AMOS 9, BCV 24, CHAOS
38). A prompt is normalised (case, punctuation, "l"/"lt" -> left, side word moved to
the front: "kidney left" -> "left kidney"), looked up among organ names and synonyms,
and the id is picked from the dataset that best fits the image modality (AMOS-CT for
CT, CHAOS / AMOS-MR for MR, AutoPET for PET). Power users can force one with
``"bcv: liver"`` or ``"#24"``. Unknown prompts raise InputError with close matches.
"""
from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from biomedseg.errors import InputError

#: Modality ids the network was trained with (``mod_idx``).
MODALITY_IDS = {"CT": 0, "PET": 1, "T1": 2, "T2": 3, "CINE": 4, "UNKNOWN": -1}
_MODALITY_WORDS = {
    "ct": 0, "cta": 0, "pet": 1, "pt": 1, "suv": 1,
    "t1": 2, "t1w": 2, "t1 mri": 2, "mr t1": 2, "t1 mr": 2,
    "t2": 3, "t2w": 3, "t2 mri": 3, "mr t2": 3, "t2 mr": 3,
    "cine": 4, "cine mri": 4, "cine mr": 4,
    "mr": -1, "mri": -1, "unknown": -1, "": -1,
}

#: Datasets whose ids suit each modality, best first; others follow as a fallback.
_PREFERENCE = {
    0: ("amos_ct", "bcv", "structseg_oar", "structseg_head_oar", "lits", "kits"),
    1: ("autopet",),
    2: ("chaos", "amos_mr", "brain_structure"),
    3: ("chaos", "amos_mr"),
    4: ("mnm",),
    -1: ("amos_mr", "chaos", "brain_structure", "mnm"),
}
_FALLBACK = ("amos_ct", "bcv", "structseg_oar", "structseg_head_oar", "lits", "kits", "chaos", "amos_mr",
             "mnm", "brain_structure", "autopet")

#: Dataset names in the file whose organ name should be read as another concept's.
_SAME_CONCEPT = {"postcava (inferior vena cava)": "inferior vena cava"}
#: Display names for concepts whose label text is long.
_DISPLAY = {
    "left ventricle (lv) blood pool": "left ventricle",
    "left ventricular myocardium (myo)": "myocardium",
    "right ventricle (rv)": "right ventricle",
    "lesion (fdg-avid tumor)": "lesion",
    "portal vein and splenic vein": "portal and splenic vein",
}
#: Other words people type for a concept (after normalisation, sides in front).
_SYNONYMS = {
    "inferior vena cava": ["ivc", "vena cava", "postcava", "inferior cava"],
    "gallbladder": ["gall bladder"],
    "esophagus": ["oesophagus", "gullet"],
    "bladder": ["urinary bladder"],
    "prostate/uterus": ["prostate", "uterus", "prostate uterus", "prostate or uterus"],
    "portal and splenic vein": ["portal vein", "splenic vein", "portal splenic vein", "portal vein and splenic vein",
                                "portal and splenic veins", "portal vein splenic vein"],
    "liver tumor": ["liver tumour", "liver lesion", "liver cancer", "hepatic tumor", "liver tumors"],
    "kidney": ["kidneys", "both kidneys", "renal"],
    "kidney tumor": ["kidney tumour", "renal tumor", "renal tumour", "kidney lesion", "kidney cancer",
                     "renal cancer", "renal mass"],
    "brain stem": ["brainstem"],
    "optic chiasma": ["optic chiasm", "chiasm", "chiasma"],
    "pituitary": ["pituitary gland", "hypophysis"],
    "spinal cord": ["cord"],
    "trachea": ["windpipe"],
    "left ventricle": ["lv", "lv blood pool", "left ventricle blood pool", "left ventricular blood pool",
                       "left ventricular cavity", "left ventricle cavity"],
    "myocardium": ["myo", "lv myocardium", "left ventricular myocardium", "left ventricle myocardium",
                   "myocardium of the left ventricle", "heart muscle"],
    "right ventricle": ["rv", "right ventricular blood pool", "right ventricle blood pool", "right ventricle cavity"],
    "gray matter": ["grey matter", "gm", "cortex", "cortical gray matter"],
    "white matter": ["wm"],
    "cerebrospinal fluid": ["csf"],
    "lesion": ["lesions", "fdg avid tumor", "fdg avid lesion", "pet lesion", "tumor lesion", "hypermetabolic lesion",
               "fdg lesion"],
}
#: Words that may stand for a body part on either side ("l adrenal" -> "left adrenal gland").
_SIDED_SYNONYMS = {
    "adrenal gland": ["adrenal", "suprarenal gland", "suprarenal"],
    "kidney": ["renal"],
    "lung": [],
    "eye": ["eyeball", "globe"],
    "lens": ["lens of eye"],
    "optic nerve": [],
    "temporal lobe": [],
    "parotid gland": ["parotid"],
    "inner ear": ["cochlea"],
    "middle ear": [],
    "temporomandibular joint": ["tmj", "jaw joint"],
    "mandible": ["jaw", "mandible bone"],
}
_SIDE_WORDS = {"l": "left", "lt": "left", "left": "left", "r": "right", "rt": "right", "right": "right"}
_WORD_FIXES = {"tumour": "tumor", "tumours": "tumors", "grey": "gray", "oesophagus": "esophagus"}
_DATASET_ALIASES = {"btcv": "bcv", "synapse": "bcv", "amos": "amos_ct", "amosct": "amos_ct", "amosmr": "amos_mr",
                    "structseg": "structseg_oar", "structseg_thorax": "structseg_oar", "structseg_han": "structseg_head_oar",
                    "structseg_head": "structseg_head_oar", "mms": "mnm", "m&ms": "mnm", "brain": "brain_structure"}


def normalise(text: str) -> str:
    """Lower case, punctuation to spaces, UK spellings and side words fixed, side first."""
    words = re.sub(r"[^a-z0-9/&+]+", " ", str(text).lower().replace("/", " / ")).split()
    words = [_WORD_FIXES.get(w, w) for w in words if w not in ("of", "the")]
    sides = [w for w in words if w in _SIDE_WORDS]
    if len(sides) == 1:
        rest = [w for w in words if w not in _SIDE_WORDS]
        words = [_SIDE_WORDS[sides[0]]] + rest
    return " ".join(words).replace(" / ", "/")


@dataclass(frozen=True)
class Task:
    id: int
    dataset: str
    local_label: int
    name: str


@dataclass(frozen=True)
class TaskMatch:
    """A resolved prompt: the concept, the chosen id and every id that means the same."""

    prompt: str
    concept: str
    task_id: int
    dataset: str
    #: (task id, dataset) for every dataset that has this concept, in preference order.
    candidates: tuple[tuple[int, str], ...]
    #: False when no dataset of the requested modality has the concept (id from another).
    modality_matched: bool


@lru_cache(maxsize=1)
def task_table() -> dict:
    """The packaged task file (ids, datasets, names, modality ids)."""
    return json.loads((Path(__file__).parent / "hermes_tasks.json").read_text())


@lru_cache(maxsize=1)
def tasks() -> tuple[Task, ...]:
    return tuple(Task(t["id"], t["dataset"], t["local_label"], t["name"]) for t in task_table()["tasks"])


def dataset_task_ids(dataset: str) -> list[int]:
    """All ids of one training dataset, in label order (the prompt rows seen in training)."""
    table = task_table()["dataset_tasks"]
    if dataset not in table:
        raise InputError(f"Unknown Hermes dataset '{dataset}'; use one of {', '.join(table)}.")
    return list(table[dataset])


def _concept_of(name: str) -> str:
    key = name.lower()
    key = _SAME_CONCEPT.get(key, key)
    return normalise(_DISPLAY.get(key, key))


@lru_cache(maxsize=1)
def _vocabulary() -> tuple[dict, dict]:
    """(phrase -> concept, concept -> [Task, ...])."""
    by_concept: dict[str, list[Task]] = {}
    for task in tasks():
        by_concept.setdefault(_concept_of(task.name), []).append(task)
    phrases: dict[str, str] = {}
    for concept in by_concept:
        phrases[concept] = concept
        for alt in _SYNONYMS.get(concept, []):
            phrases.setdefault(normalise(alt), concept)
        side, _, body = concept.partition(" ")
        if side in ("left", "right") and body:
            for alt in _SIDED_SYNONYMS.get(body, []):
                phrases.setdefault(normalise(f"{side} {alt}"), concept)
    for concept in by_concept:  # plain concepts win over synonyms that collide with them
        phrases[concept] = concept
    return phrases, by_concept


def concepts() -> list[str]:
    """Every organ/structure name Hermes can segment (one per concept, ids merged)."""
    return sorted(_vocabulary()[1])


def modality_id(modality) -> int:
    """'CT' / 'PT' / 'T1' / 'MR' / 0..4 / -1 / None -> the network's modality id."""
    if modality is None:
        return -1
    if isinstance(modality, int) and not isinstance(modality, bool):
        if -1 <= modality <= 4:
            return modality
        raise InputError(f"Hermes modality id must be -1..4, got {modality}.")
    key = re.sub(r"[^a-z0-9]+", " ", str(modality).lower()).strip()
    if key in _MODALITY_WORDS:
        return _MODALITY_WORDS[key]
    raise InputError(f"Unknown modality '{modality}' for Hermes.", hint="Use CT, PET, T1, T2, cine or MR.")


def _order(candidates: list[Task], mod: int) -> list[Task]:
    preferred = _PREFERENCE.get(mod, ())
    rank = {d: i for i, d in enumerate(preferred + tuple(d for d in _FALLBACK if d not in preferred))}
    return sorted(candidates, key=lambda t: (rank.get(t.dataset, len(rank)), t.id))


def _suggest(key: str) -> list[str]:
    phrases, _ = _vocabulary()
    close = difflib.get_close_matches(key, list(phrases), n=6, cutoff=0.6)
    seen, out = set(), []
    for phrase in close:
        concept = phrases[phrase]
        label = phrase if phrase == concept else f"{phrase} ({concept})"
        if concept not in seen:
            seen.add(concept)
            out.append(label)
    if not out:  # a word contained in a longer name ("tumor" -> liver tumor, kidney tumor; "lungs" -> left lung)
        words = {w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w for w in key.split()}
        out = [c for c in concepts() if words and words <= set(c.split())][:5]
    return out[:3] if len(out) > 3 else out


def resolve_prompt(prompt: str, modality=None) -> TaskMatch:
    """One typed prompt -> TaskMatch; ``modality`` as in ``modality_id``."""
    mod = modality_id(modality)
    raw = str(prompt)
    text = raw.strip()
    forced_dataset = None
    m = re.fullmatch(r"(?:#|task\s*)(\d+)", text.lower())
    if m:
        tid = int(m.group(1))
        hits = [t for t in tasks() if t.id == tid]
        if not hits:
            raise InputError(f"Hermes has no task #{tid}; ids run from 0 to 70.")
        ordered = _order(hits, mod)
        concept = _concept_of(ordered[0].name)
        return TaskMatch(raw, concept, tid, ordered[0].dataset, tuple((t.id, t.dataset) for t in ordered),
                         any(t.dataset in _PREFERENCE.get(mod, ()) for t in ordered))
    if ":" in text:
        ds, _, text = text.partition(":")
        ds = re.sub(r"[\s\-]+", "_", ds.strip().lower())
        forced_dataset = _DATASET_ALIASES.get(ds.replace("_", ""), _DATASET_ALIASES.get(ds, ds))
        if forced_dataset not in task_table()["dataset_tasks"]:
            raise InputError(f"Unknown Hermes dataset '{ds}' in prompt '{raw}'.",
                             hint=f"Use one of {', '.join(task_table()['dataset_tasks'])}.")
    key = normalise(text)
    if not key:
        raise InputError("An empty prompt cannot be mapped to a Hermes task.")
    phrases, by_concept = _vocabulary()
    concept = phrases.get(key)
    if concept is None:
        suggestions = _suggest(key)
        hint = f"Did you mean: {', '.join(suggestions)}? (`biomedseg models hermes` lists every target)" \
            if suggestions else "`biomedseg models hermes` lists every target."
        raise InputError(f"Hermes has no task for '{raw.strip()}'.", hint=hint)
    candidates = _order(by_concept[concept], mod)
    if forced_dataset is not None:
        candidates = [t for t in candidates if t.dataset == forced_dataset]
        if not candidates:
            have = ", ".join(t.dataset for t in by_concept[concept])
            raise InputError(f"Dataset '{forced_dataset}' has no '{concept}' task; it exists in: {have}.")
    best = candidates[0]
    return TaskMatch(raw, concept, best.id, best.dataset, tuple((t.id, t.dataset) for t in candidates),
                     best.dataset in _PREFERENCE.get(mod, ()) or forced_dataset is not None)


def resolve_prompts(prompts, modality=None) -> list[TaskMatch]:
    """Several prompts; all unknown ones are reported together."""
    if isinstance(prompts, str):
        prompts = [prompts]
    matches, errors = [], []
    for p in prompts:
        try:
            matches.append(resolve_prompt(p, modality))
        except InputError as err:
            errors.append(str(err))
    if errors:
        raise InputError(" ".join(errors))
    return matches


def task_ids(prompts, modality=None) -> list[int]:
    """The chosen id for each prompt, in prompt order (duplicates kept once)."""
    out: list[int] = []
    for m in resolve_prompts(prompts, modality):
        if m.task_id not in out:
            out.append(m.task_id)
    return out


#: Where each training dataset belongs in the catalogue's (modality, site) table. AMOS-MR
#: was trained as "unknown MR" (modality -1), so it is listed under both T1 and T2.
_CATALOG_PLACES = {
    "amos_ct": (("CT", "abdomen"),), "bcv": (("CT", "abdomen"),), "lits": (("CT", "abdomen"),),
    "kits": (("CT", "abdomen"),), "structseg_oar": (("CT", "thorax"),),
    "structseg_head_oar": (("CT", "head and neck"),),
    "chaos": (("MRI-T1", "abdomen"), ("MRI-T2", "abdomen")),
    "amos_mr": (("MRI-T1", "abdomen"), ("MRI-T2", "abdomen")),
    "brain_structure": (("MRI-T1", "brain"),),
    "mnm": (("MRI-cine", "heart"),),
    "autopet": (("PET", "whole body"),),
}


def catalog_targets() -> dict:
    """{modality: {site: [prompt, ...]}} for the model catalogue (its ``targets_provider``):
    every concept under the modality and body site of the datasets that taught it."""
    table: dict[str, dict[str, set]] = {}
    for task in tasks():
        for modality, site in _CATALOG_PLACES.get(task.dataset, ()):
            table.setdefault(modality, {}).setdefault(site, set()).add(_concept_of(task.name))
    return {m: {s: sorted(names) for s, names in sites.items()} for m, sites in table.items()}


def check_prompts(prompts) -> None:
    """The catalogue's ``prompt_check``: raise InputError (with close matches) for every
    prompt that maps to no task, before any model is loaded."""
    resolve_prompts(list(prompts))


def synonyms() -> dict:
    """{concept: [other phrases that select it]} (the catalogue's ``synonyms_provider``)."""
    phrases, _ = _vocabulary()
    out: dict[str, list[str]] = {}
    for phrase, concept in sorted(phrases.items()):
        if phrase != concept:
            out.setdefault(concept, []).append(phrase)
    return out
