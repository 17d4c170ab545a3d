"""Modality and site guessed for an input volume, put in the chosen model's own words.

The guess (DICOM tags, else intensities and field of view) is only a starting point the
person can change; what matters is that it lands on a modality and site the model knows,
so the catalogue can suggest prompts for them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ..catalog import get_model
from ..imaging_guess import guess_modality, modality_from_tags
from ..io.dicom_files import read_dicom_tags
from ..volume import Volume
from .state import PanelState, chosen_prompts


@dataclass
class Guess:
    modality: str
    site: str
    reason: str
    #: the DICOM tags state the modality (Modality) / the site (body part, description words): what a
    #: zero-shot recognition must not overrule (``panel.recognition``)
    modality_stated: bool = False
    site_stated: bool = False


#: Words in BodyPartExamined / descriptions -> site; sites that name the same region.
SITE_WORDS = [(r"head|brain|skull|neuro|cerebr", "head"), (r"chest|thorax|lung", "chest"),
              (r"abdomen|abd|liver|kidney|pancrea", "abdomen"), (r"pelvis|prostate|bladder", "pelvis"),
              (r"heart|card", "heart"), (r"breast|mamm", "breast")]
SITE_SYNONYMS = [{"head", "brain", "neuro"}, {"chest", "thorax", "lung"}, {"abdomen", "liver", "abdominal"},
                 {"pelvis", "prostate", "transperineal"}, {"heart", "cardiac"}, {"retinal", "retina", "eye"}]


def guess_modality_site(volume: Volume, tags: dict | None = None) -> Guess:
    """Modality (``imaging_guess``: DICOM tags, else the voxels) and site (body part and
    description words, else the field of view).

    ``tags`` (modality, body_part, series_description) default to what the reader put in
    ``volume.meta``. The answer is a starting point the person can change.
    """
    tags = dict(tags or {})
    for key in ("modality", "body_part", "series_description"):
        if key not in tags and isinstance(volume.meta.get(key), str):
            tags[key] = volume.meta[key]
    modality, why = guess_modality(volume, tags)
    reasons = [why]
    words = " ".join(str(tags.get(k, "")) for k in ("series_description", "body_part")).lower()
    site = next((s for pattern, s in SITE_WORDS if re.search(pattern, words)), "") if words.strip() else ""
    site_stated = bool(site)
    if site:
        reasons.append(f"body part '{tags.get('body_part') or tags.get('series_description')}'")
    else:
        site, why = _site_from_size(volume, modality)
        if why:
            reasons.append(why)
    stated = modality_from_tags(tags.get("modality"), tags.get("series_description")) is not None
    return Guess(modality, site, "Guessed from " + " and ".join(reasons) + ". Change them if they are wrong.",
                 modality_stated=stated, site_stated=site_stated)


def _site_from_size(volume: Volume, modality: str) -> tuple[str, str]:
    extent = volume.spacing * np.array(volume.shape[::-1])
    if volume.shape[0] > 1 and modality.startswith(("MRI", "CT", "PET")) and 120 <= extent.min() and extent.max() <= 300:
        return "head", f"a head-sized field of view ({extent.max():.0f} mm)"
    return "", ""


def modalities_for(model_id: str) -> list[str]:
    entry = get_model(model_id)
    names = list(entry.data.get("modalities", []))
    for mod in entry.target_table():
        if mod not in names:
            names.append(mod)
    return names


def sites_for(model_id: str, modality: str = "") -> list[str]:
    table = get_model(model_id).target_table()
    sites: list[str] = []
    for mod, by_site in table.items():
        if modality and mod.lower() != modality.lower():
            continue
        sites += [s for s in by_site if s not in sites]
    return sites


def match_modality(guess: str, choices: list[str]) -> str:
    """The model's name for a guessed modality: exact, else the same family ('MRI-T1' ~ 'MRI')."""
    if not guess or not choices:
        return guess
    lower = {c.lower(): c for c in choices}
    if guess.lower() in lower:
        return lower[guess.lower()]
    family = guess.split("-")[0].lower()
    if family in lower:
        return lower[family]
    same = [c for c in choices if c.split("-")[0].lower() == family]
    return same[0] if same else guess


def match_site(guess: str, choices: list[str]) -> str:
    """The model's name for a guessed site: exact, else one that names the same region ('head' ~ 'brain')."""
    if not guess or not choices:
        return guess
    lower = {c.lower(): c for c in choices}
    if guess.lower() in lower:
        return lower[guess.lower()]
    for group in SITE_SYNONYMS:
        if guess.lower() in group:
            for c in choices:
                if c.lower() in group:
                    return c
    return guess


def state_for_guess(model: str, prompts: list[str], guess: Guess) -> PanelState:
    """A run request for ``model`` with the guessed modality and site in the model's own names."""
    return PanelState(model=model, prompts=list(prompts), modality=match_modality(guess.modality, modalities_for(model)),
                      site=match_site(guess.site, sites_for(model)))


def suggestions(model_id: str, modality: str = "", site: str = "") -> list[str]:
    """Prompts the catalogue recommends for the model, modality and site (wider if none match)."""
    entry = get_model(model_id)
    for mod, st in ((modality, site), (modality, ""), ("", "")):
        found = entry.targets(mod or None, st or None)
        if found:
            return found
    return []


@dataclass
class ModelView:
    """What the model-dependent widgets show: modality and site lists in the model's words, the
    chosen ones matched to them, and the suggestions with a tick for those already in the prompt line."""

    modalities: list[str]
    modality: str
    sites: list[str]
    site: str
    suggestions: list[tuple[str, bool]]


def model_view(model_id: str, modality: str, site: str, prompt_text: str = "") -> ModelView:
    modalities = modalities_for(model_id)
    modality = match_modality(modality, modalities)
    sites = sites_for(model_id, modality)
    site = match_site(site, sites)
    chosen = chosen_prompts(prompt_text)
    return ModelView(modalities, modality, sites, site,
                     [(t, t.lower() in chosen) for t in suggestions(model_id, modality, site)])


__all__ = ["Guess", "SITE_WORDS", "SITE_SYNONYMS", "guess_modality_site", "read_dicom_tags", "modalities_for",
           "sites_for", "match_modality", "match_site", "state_for_guess", "suggestions", "ModelView", "model_view"]
