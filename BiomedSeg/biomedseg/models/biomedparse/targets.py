"""Modality, site and target bookkeeping for BiomedParse v1, without torch.

Three tables meet here:
* the catalogue's recommended targets per (modality, site) (``biomedparse_v1_targets.json``,
  from the model card), whose modality names are CT, MRI, MRI-FLAIR, MRI-T1-Gd, MRI-T2,
  X-Ray, Ultrasound, Pathology, Endoscope, Fundus, Dermoscopy, OCT;
* the CT windows of the authors' preprocessing (``preprocess.CT_WINDOWS``: abdomen, lung,
  pelvis, liver, colon, pancreas);
* the authors' p-value reference distributions (``target_dist.json``), keyed by "modality
  types" such as CT-Abdomen, CT-Chest, MRI-Cardiac, X-Ray-Chest.

``resolve_modality`` / ``resolve_site`` turn what a person or a DICOM header says (``MR``,
``CHEST``, ``T1 post Gd`` ...) into the catalogue's names; ``pvalue_types`` lists the
modality types whose distributions apply; ``recognition_targets`` is the candidate list of
recognition mode. The panel and the CLI may call all of these before any model loads.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from biomedseg.errors import InputError

#: Lower-case names and DICOM Modality codes -> the catalogue's modality names.
MODALITY_NAMES = {
    "ct": "CT",
    "mr": "MRI", "mri": "MRI", "mri-t1": "MRI", "t1": "MRI", "mri-cine": "MRI", "cine": "MRI", "mri-pd": "MRI",
    "mri-t2": "MRI-T2", "t2": "MRI-T2",
    "mri-flair": "MRI-FLAIR", "flair": "MRI-FLAIR",
    "mri-t1-gd": "MRI-T1-Gd", "t1-gd": "MRI-T1-Gd", "t1gd": "MRI-T1-Gd", "t1ce": "MRI-T1-Gd", "t1c": "MRI-T1-Gd",
    "mri-adc": "MRI-ADC", "adc": "MRI-ADC",
    "x-ray": "X-Ray", "xray": "X-Ray", "xr": "X-Ray", "cr": "X-Ray", "dx": "X-Ray", "dr": "X-Ray",
    "us": "Ultrasound", "ultrasound": "Ultrasound",
    "pathology": "Pathology", "histology": "Pathology", "histopathology": "Pathology", "sm": "Pathology",
    "gm": "Pathology",
    "endoscope": "Endoscope", "endoscopy": "Endoscope", "es": "Endoscope",
    "fundus": "Fundus", "op": "Fundus",
    "dermoscopy": "Dermoscopy", "xc": "Dermoscopy",
    "oct": "OCT", "opt": "OCT",
}
#: Words for body sites -> one spelling; then ``EQUIVALENT_SITES`` bridges the modalities' own names.
SITE_WORDS = {
    "thorax": "chest", "thoracic": "chest", "lungs": "lung", "head": "brain", "neuro": "brain",
    "cerebral": "brain", "cardiac": "heart", "abdominal": "abdomen", "abd": "abdomen", "pelvic": "pelvis",
    "retina": "retinal", "eye": "retinal", "ovary": "ovarian", "ovaries": "ovarian", "colorectal": "colon",
    "rectum": "colon", "hepatic": "liver", "renal": "kidney",
}
EQUIVALENT_SITES = [{"chest", "lung"}, {"pelvis", "prostate", "transperineal"}, {"abdomen", "liver", "pancreas"},
                    {"brain"}, {"heart"}]
#: Default CT window when nothing says otherwise: the abdominal one, which most CT targets use.
DEFAULT_CT_SITE = "abdomen"
#: (catalogue modality, site or None) -> p-value modality types, most specific first.
_CT_TYPES = {"lung": ["CT-Chest"], "chest": ["CT-Chest"]}
_MRI_TYPES = {"abdomen": ["MRI-Abdomen"], "heart": ["MRI-Cardiac"], "brain": ["MRI-FLAIR-Brain", "MRI-T1-Gd-Brain"]}
_FIXED_TYPES = {"MRI-FLAIR": ["MRI-FLAIR-Brain"], "MRI-T1-Gd": ["MRI-T1-Gd-Brain"], "X-Ray": ["X-Ray-Chest"],
                "Ultrasound": ["Ultrasound-Cardiac"], "Pathology": ["Pathology"], "Endoscope": ["Endoscopy"],
                "Fundus": ["Fundus"], "Dermoscopy": ["Dermoscopy"], "OCT": ["OCT"]}
def _key(value) -> str:
    return "-".join(str(value).strip().lower().replace("_", " ").replace("-", " ").split())


@lru_cache(maxsize=1)
def catalogue_table() -> dict:
    """{modality: {site: [target, ...]}} of the model card (the catalogue's targets file)."""
    text = (Path(__file__).parent / "biomedparse_v1_targets.json").read_text()
    return json.loads(text)["targets"]


def catalogue_modalities() -> list[str]:
    return sorted(set(catalogue_table()) | set(MODALITY_NAMES.values()))


def resolve_modality(value) -> str:
    """A modality name or DICOM code -> the catalogue's name; InputError for modalities v1 never saw."""
    name = MODALITY_NAMES.get(_key(value))
    if name is None:
        for known in catalogue_modalities():
            if _key(known) == _key(value):
                return known
        raise InputError(f"BiomedParse v1 was not trained on '{value}' images.",
                         hint="It knows " + ", ".join(catalogue_modalities()) + " (DICOM codes CT, MR, US, CR, DX, "
                              "SM, ES, OP, XC, OCT are understood too).")
    return name


def normalise_site(value) -> str:
    word = " ".join(str(value).strip().lower().split())
    return SITE_WORDS.get(word, word)


def site_choices(modality: str) -> list[str]:
    """Sites the catalogue lists for a modality (CT: every window of the authors' preprocessing)."""
    if modality == "CT":
        from .preprocess import CT_WINDOWS

        return sorted(set(CT_WINDOWS) | set(catalogue_table().get("CT", {})))
    return sorted(catalogue_table().get(modality, {}))


def resolve_site(modality: str, value) -> str | None:
    """The modality's own name for a site ('chest' is CT's 'lung'), or None when it has none."""
    if value is None or str(value).strip() == "":
        return None
    site = normalise_site(value)
    choices = site_choices(modality)
    if site in choices:
        return site
    for group in EQUIVALENT_SITES:
        if site in group:
            match = sorted(group & set(choices))
            if match:
                return match[0]
    return None


def pvalue_types(modality: str, site: str | None) -> list[str]:
    """The authors' modality types whose reference distributions apply, most specific first."""
    if modality == "CT":
        if site is None:
            return ["CT-Abdomen", "CT-Chest"]
        return _CT_TYPES.get(site, ["CT-Abdomen"])
    if modality in _FIXED_TYPES:
        return list(_FIXED_TYPES[modality])
    if modality.startswith("MRI"):
        if site in _MRI_TYPES:
            return list(_MRI_TYPES[site])
        return ["MRI-Abdomen", "MRI-Cardiac", "MRI-FLAIR-Brain", "MRI-T1-Gd-Brain"] if site is None else []
    return []


@dataclass(frozen=True)
class Check:
    """Which reference distribution tests a prompt: ``modality_type`` None means unchecked (see ``reason``)."""

    prompt: str
    target: str | None
    modality_type: str | None
    reason: str = ""


def find_check(prompt: str, modality: str, site: str | None, target_dist: dict | None) -> Check:
    """The first modality type of ``pvalue_types`` whose distribution lists ``prompt`` (case and spaces ignored)."""
    if not target_dist:
        return Check(prompt, None, None, "no target_dist.json")
    key = " ".join(prompt.lower().split())
    types = pvalue_types(modality, site)
    for mtype in types:
        for target in target_dist.get(mtype, {}):
            if " ".join(target.lower().split()) == key:
                return Check(prompt, target, mtype)
    where = ", ".join(types) if types else f"{modality}{' ' + site if site else ''}"
    return Check(prompt, None, None, f"no reference distribution for '{prompt}' in {where}")


def recognition_targets(modality: str, site: str | None, target_dist: dict) -> list[str]:
    """Recognition candidates: the catalogue's targets for the modality (and site, when known) that the
    authors' p-value test can check. Targets without a reference distribution are left out, because
    recognition ranks and rejects masks by that test."""
    by_site = catalogue_table().get(modality, {})
    if modality == "CT" and site is not None and site not in by_site:
        site_list = by_site.get("lung" if site == "chest" else DEFAULT_CT_SITE, [])
        names = site_list
    elif site is not None and site in by_site:
        names = by_site[site]
    else:
        names = [t for ts in by_site.values() for t in ts]
    out = []
    for name in names:
        if name not in out and find_check(name, modality, site, target_dist).modality_type:
            out.append(name)
    return out
