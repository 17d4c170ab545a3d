"""Refuse a model on an image it was not made for, before anything loads.

deepbet wrote a 14.5-litre "brain" on a chest CT with exit 0, although the engine's own
guess said "CT, Hounsfield-like intensities". A model declares its ``modalities`` in its
model.json; when the image clearly is something else, the run is refused with the reason,
and the person can say what the image is (``--modality``) or run anyway (``--force``, the
panel's *Use anyway*).

"Clearly" means evidence that does not guess: a DICOM Modality tag, intensities only CT
has (at least 0.5% of the voxels near -1000 HU: air), or colour pixels. The fallbacks of ``imaging_guess`` ("MRI-like",
"a single grey slice") never refuse anything. A stated or tagged sequence of the right
family but another weighting (a T2 series for a T1 model) runs with a warning.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import ModalityMismatchError
from .imaging_guess import modality_from_tags, modality_from_voxels, modality_from_words, tag_reason
from .vocabulary import modality_family, same_modality
from .volume import Volume, strided_sample


@dataclass
class ModalityDecision:
    """What the engine takes the image to be, and why."""

    modality: str
    #: where it comes from: 'stated' (--modality / the panel), 'tags', 'intensities', 'default'
    source: str
    #: the sentence a person reads ("DICOM modality CT", "Hounsfield-like intensities")
    why: str
    #: True when the evidence does not guess (stated, tags, HU intensities, colour pixels)
    certain: bool
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"modality": self.modality, "source": self.source, "why": self.why, "certain": self.certain,
                "warnings": list(self.warnings)}


def decide_modality(volume: Volume, stated: str | None = None) -> ModalityDecision:
    """The image's modality: what the person said, else the DICOM tags, else the voxels."""
    if stated:
        name = modality_from_words(stated)  # a word we do not know names nothing to refuse against
        return ModalityDecision(name or str(stated), "stated", f"given as '{stated}'", name is not None)
    code, description = volume.meta.get("modality"), volume.meta.get("series_description")
    tagged = modality_from_tags(code, description)
    if tagged is not None:
        return ModalityDecision(tagged, "tags", tag_reason(code, description), True)
    name, why = modality_from_voxels(volume)
    certain = volume.channels_last or (name == "CT" and air_fraction(volume) >= MIN_AIR_FRACTION)
    return ModalityDecision(name, "intensities", why, bool(certain))


#: Share of voxels near -1000 HU that makes "CT" certain: a CT holds air around the body or in the
#: lungs; an MRI with a -32768 padding slab or a few ringing voxels below -500 holds none.
MIN_AIR_FRACTION = 0.005


def air_fraction(volume: Volume) -> float:
    """Share of (strided, ``strided_sample``) voxels between -1200 and -800."""
    sample = strided_sample(volume.array)
    if sample.size == 0:
        return 0.0
    return float(np.count_nonzero((sample >= -1200) & (sample <= -800))) / sample.size


def _fits(modality: str, declared: list[str], colour_guess: bool) -> bool:
    if colour_guess:  # a colour image could be any photograph modality
        return any(modality_family(m) == "photo" for m in declared)
    return any(same_modality(modality, m) or modality_family(modality) == modality_family(m) for m in declared)


def check_modality(entry, volume: Volume, stated: str | None = None, force: bool = False) -> ModalityDecision:
    """The decision for this model; ModalityMismatchError when the image clearly is not one of the
    model's modalities (unless ``force``: then a warning says so)."""
    decision = decide_modality(volume, stated)
    declared = [m for m in entry.data.get("modalities", []) if m]
    if not declared or "any" in declared:
        return decision
    colour_guess = decision.source == "intensities" and volume.channels_last
    if not _fits(decision.modality, declared, colour_guess):
        if not decision.certain:
            return decision
        trained = ", ".join(declared)
        said = {"stated": "you said it is", "tags": "its DICOM tags say", "intensities": "its intensities say"}
        message = (f"{entry.title} is made for {trained} images, but {said.get(decision.source, 'it looks like')} "
                   f"{'a colour photograph' if colour_guess else decision.modality} ({decision.why}).")
        if not force:
            raise ModalityMismatchError(message, hint="Choose a model for this image; if the image really is one of "
                                                      f"{trained}, say so with --modality, or run anyway with --force "
                                                      "(the panel's 'Use anyway').")
        decision.warnings.append(message + " Run anyway (--force).")
    elif not any(same_modality(decision.modality, m) for m in declared) and decision.source != "intensities":
        decision.warnings.append(f"{entry.title} was trained on {', '.join(declared)}; this image is "
                                 f"{decision.modality} ({decision.why}).")
    return decision
