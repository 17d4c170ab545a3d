"""Named, coloured segments and how a target name maps to standard terminology.

A ``Segment`` is what every writer and the Slicer bridge consume: a boolean (k, j, i)
mask plus a name, an RGB colour in 0..1 and a terminology entry in the dict form
``slicerio`` uses (``category``/``type``/``typeModifier``/``anatomicRegion`` as [scheme, code,
meaning]). ``resources/terminology.json`` gives every target of every bundled model a code and
a colour; its ``_comment`` says where they come from.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Iterable, Mapping

import numpy as np

from .errors import InputError

#: Colours for targets no terminology entry knows (Slicer's generic anatomy palette feel).
PALETTE = [(128, 174, 128), (241, 214, 145), (177, 122, 101), (111, 184, 210), (216, 101, 79),
           (221, 130, 101), (144, 238, 144), (192, 104, 88), (220, 245, 20), (78, 63, 0),
           (255, 250, 220), (230, 220, 70), (200, 200, 235), (250, 250, 210), (244, 214, 49)]


@dataclass
class Segment:
    name: str
    mask: np.ndarray
    color: tuple[float, float, float] | None = None
    terminology: dict | None = None
    #: Optional label value for labelmap outputs (1, 2, ... by order when absent).
    label: int | None = None
    extra: dict = field(default_factory=dict)


def segment_size(volume, voxels: int) -> dict:
    """A mask's size: ``voxels`` and ``volume_ml`` for a volume; ``voxels`` and ``area_mm2`` for a one-slice
    image (along any axis: the area of the plane it lies in). Unrounded; callers round for people."""
    spacing_kji = [float(s) for s in volume.spacing[::-1]]
    if min(volume.shape) == 1:
        thin = int(np.argmin(volume.shape))
        area = float(np.prod([s for axis, s in enumerate(spacing_kji) if axis != thin]))
        return {"voxels": int(voxels), "area_mm2": voxels * area}
    return {"voxels": int(voxels), "volume_ml": voxels * float(np.prod(spacing_kji)) / 1000.0}


@lru_cache(maxsize=1)
def _terminology_table() -> dict:
    text = resources.files("biomedseg.resources").joinpath("terminology.json").read_text()
    return json.loads(text)


_SIDE_WORDS = {"l": "left", "lt": "left", "left": "left", "r": "right", "rt": "right", "right": "right"}
_WORD_FIXES = {"tumour": "tumor", "tumours": "tumors", "grey": "gray", "oesophagus": "esophagus",
               "oedema": "edema", "foetal": "fetal", "haemorrhage": "hemorrhage"}


def _words(text: str) -> list[str]:
    """Lower case, punctuation to spaces ('/' kept), UK spellings fixed, 'of'/'the' dropped."""
    text = re.sub(r"\s*/\s*", "/", str(text).lower())
    words = re.sub(r"[^a-z0-9/]+", " ", text).split()
    return [_WORD_FIXES.get(w, w) for w in words if w not in ("of", "the")]


def _split_side(words: list[str]) -> tuple[str | None, list[str]]:
    """('left', ['kidney']) for 'kidney left' / 'L kidney'; (None, words) without exactly one side word."""
    sides = [w for w in words if w in _SIDE_WORDS]
    if len(sides) != 1:
        return None, words
    return _SIDE_WORDS[sides[0]], [w for w in words if w not in _SIDE_WORDS]


def _phrase(text: str) -> str:
    side, rest = _split_side(_words(text))
    return " ".join(([side] if side else []) + rest)


@lru_cache(maxsize=1)
def _phrases() -> dict[str, str]:
    """Normalised name or synonym -> entry name (entry names win over synonyms)."""
    targets = _terminology_table()["targets"]
    out: dict[str, str] = {}
    for name, entry in targets.items():
        for alt in entry.get("synonyms", []):
            out.setdefault(_phrase(alt), name)
    for name in targets:
        out[_phrase(name)] = name
    return out


def _resolve(target: str) -> tuple[str, str | None] | None:
    """(entry name, side or None) for a target name, or None when no entry knows it."""
    phrases = _phrases()
    side, rest = _split_side(_words(target))
    whole = " ".join(([side] if side else []) + rest)
    if whole in phrases:  # names whose side is part of the structure: 'left ventricle', 'left atrium'
        return phrases[whole], None
    base = " ".join(rest)
    candidates = [base]
    if rest and rest[-1].endswith("s"):  # plurals: 'kidneys', 'ribs', 'boxes'
        candidates += [" ".join(rest[:-1] + [rest[-1][:-1]]), " ".join(rest[:-1] + [rest[-1][:-2]])]
    for candidate in candidates:
        if candidate in phrases:
            return phrases[candidate], side
    return None


def canonical_target(target: str) -> str | None:
    """The terminology entry a target name resolves to ('Left Kidney' -> 'kidney', 'lv' ->
    'left ventricle', 'tumour' -> 'tumor'), or None for names no entry knows."""
    found = _resolve(target)
    return found[0] if found else None


def _shade(rgb, how: str) -> list[int]:
    """The side rule of terminology.json: 'right' darkens each channel to 75 %, 'both' (no side
    given) mixes in 40 % white; 'left' keeps the listed colour."""
    if how == "right":
        return [round(c * 0.75) for c in rgb]
    return [round(c + (255 - c) * 0.4) for c in rgb]


def terminology_for(target: str) -> tuple[dict, tuple[float, float, float]] | None:
    """Terminology entry and colour for a target name ('liver', 'left kidney', 'tumour').

    The dict has ``category``/``type`` and, where they apply, ``typeModifier`` (laterality, or
    a qualifier such as 'Anterior'), ``anatomicRegion`` and ``anatomicRegionModifier`` (the
    side of the region: 'left kidney tumor'), each [scheme, code, meaning].
    """
    found = _resolve(target)
    if found is None:
        return None
    name, side = found
    table = _terminology_table()
    entry = table["targets"][name]
    term = {
        "contextName": table["dicom_context"] if entry.get("context") == "dicom" else table["context"],
        "category": list(table["categories"][entry["category"]]),
        "type": list(entry["type"]),
        "anatomicContextName": table["anatomic_context"],
    }
    if entry.get("typeModifier"):
        term["typeModifier"] = list(entry["typeModifier"])
    if entry.get("anatomicRegion"):
        term["anatomicRegion"] = list(entry["anatomicRegion"])
    sided = entry.get("sided")
    color = list(entry["color"])
    if sided:
        if side != "left":  # Slicer's lists give both sides one colour: the rule in the JSON's _comment
            color = _shade(color, side or "both")
        if side:
            if sided == "region" and "anatomicRegion" in term:
                term["anatomicRegionModifier"] = list(table["modifiers"][side])
            elif "typeModifier" not in term:
                term["typeModifier"] = list(table["modifiers"][side])
    return term, tuple(c / 255.0 for c in color)


def default_terminology() -> dict:
    """'Tissue' -- what Slicer itself assigns to a segment it knows nothing about."""
    table = _terminology_table()
    tissue = list(table["categories"]["tissue"])
    return {"contextName": table["context"], "category": tissue, "type": list(tissue),
            "anatomicContextName": table["anatomic_context"]}


def prepare_segments(segments: Mapping[str, np.ndarray] | Iterable[Segment], shape: tuple[int, int, int],
                     where: str = "output") -> list[Segment]:
    """Normalise what callers pass (dict name -> mask, or Segments) into complete Segments.

    Fills in colour and terminology from the target name, checks every mask fits the
    reference grid, and refuses duplicate names so no segment silently replaces another.
    """
    if isinstance(segments, Mapping):
        items = [s if isinstance(s, Segment) else Segment(name, s) for name, s in segments.items()]
    else:
        items = list(segments)
    if not items:
        raise InputError(f"Nothing to write to {where}: no segments were given.")
    seen: set[str] = set()
    out = []
    for index, seg in enumerate(items):
        if not seg.name or not str(seg.name).strip():
            raise InputError(f"Segment {index + 1} has no name.")
        if seg.name in seen:
            raise InputError(f"Two segments are named '{seg.name}'; names must be unique in {where}.")
        seen.add(seg.name)
        mask = np.asarray(seg.mask)
        if mask.shape != tuple(shape):
            raise InputError(f"Segment '{seg.name}' has shape {mask.shape} but the reference image is {tuple(shape)} "
                             "(k, j, i).")
        if mask.dtype != bool:
            values = np.unique(mask)
            if not np.all(np.isin(values, (0, 1))):
                raise InputError(f"Segment '{seg.name}' is not a binary mask (values {values[:5].tolist()}...); "
                                 "threshold probabilities first.")
            mask = mask.astype(bool)
        known = terminology_for(seg.name)
        color = seg.color
        terminology = seg.terminology
        if color is None:
            color = known[1] if known else tuple(c / 255.0 for c in PALETTE[index % len(PALETTE)])
        if terminology is None:
            terminology = known[0] if known else default_terminology()
        out.append(Segment(seg.name, mask, tuple(float(c) for c in color), terminology, seg.label, dict(seg.extra)))
    labels = [s.label for s in out if s.label is not None]
    if len(labels) != len(set(labels)):
        raise InputError(f"Label values {labels} repeat; each segment needs its own label value.")
    next_label = 1
    for seg in out:
        if seg.label is None:
            while next_label in labels:
                next_label += 1
            seg.label = next_label
            labels.append(next_label)
    return out
