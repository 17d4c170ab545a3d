"""Named, coloured segments and how a target name maps to standard terminology.

A ``Segment`` is what every writer and the Slicer bridge consume: a boolean (k, j, i)
mask plus a name, an RGB colour in 0..1 and a terminology entry in the dict form
``slicerio`` uses (``category``/``type``/``typeModifier`` as [scheme, code, meaning]).
"""
from __future__ import annotations

import json
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


@lru_cache(maxsize=1)
def _terminology_table() -> dict:
    text = resources.files("biomedseg.resources").joinpath("terminology.json").read_text()
    return json.loads(text)


def terminology_for(target: str) -> tuple[dict, tuple[float, float, float]] | None:
    """Terminology entry and colour for a target name ('liver', 'left kidney', 'tumour')."""
    table = _terminology_table()
    words = target.strip().lower().replace("_", " ").split()
    side = None
    if words and words[0] in table["modifiers"]:
        side, words = words[0], words[1:]
    elif words and words[-1] in table["modifiers"]:
        side, words = words[-1], words[:-1]
    base = " ".join(words)
    entry = None
    for name, candidate in table["targets"].items():
        if base == name or base in candidate.get("synonyms", []) or base.rstrip("s") == name:
            entry = candidate
            break
    if entry is None:
        return None
    term = {
        "contextName": table["context"],
        "category": list(table["categories"][entry["category"]]),
        "type": list(entry["type"]),
        "anatomicContextName": table["anatomic_context"],
    }
    if side and entry.get("sided"):
        term["typeModifier"] = list(table["modifiers"][side])
    color = tuple(c / 255.0 for c in entry["color"])
    return term, color


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
