"""Modality, site and intensity rules of BiomedParse v2, without torch.

v2's network takes 8-bit volumes: the authors' inference code "does not perform windowing or
intensity normalization for raw acquisitions". What the inputs must look like is written in
their README ("Recommended Preprocessing (Important!)", branch v2 at f571d5cc), the CVPR 2025
challenge's rule the model was trained with:

* CT: a window by site/anatomy -- soft tissues W400/L40, lung W1500/L-160, brain W80/L40,
  bone W1800/L400 (``V2_CT_WINDOWS``);
* everything else: clip to the 0.5 / 99.5 percentiles and rescale; "if the original intensity
  range was already in [0, 255], no preprocessing needed".

Both are then rescaled to 0..255 by the clipped volume's own minimum and maximum and truncated
to uint8. The engine runs that rule by default (``ct_window="v2"``). ``ct_window="v1"`` uses
BiomedParse v1's CT windows by site instead (``models.biomedparse.preprocess.CT_WINDOWS``, v1's
site names and v1's site resolution) -- the windows the v1-era ``processing_utils`` of the authors'
tree applies, and what the v2 parity fixture was made with. The non-CT percentiles are v1's own
function (``preprocess.intensity_bounds``: percentiles of the positive voxels, the challenge's rule).

The modalities are those of the v2 README's table ("v2 | 3D | CT, MRI, Ultrasound, PET, 3D
Microscopy"); for 2D X-ray, pathology, endoscopy, fundus, dermoscopy and OCT the authors point
to v1. The panel and the CLI may call everything here before any model loads.
"""
from __future__ import annotations

from biomedseg.errors import InputError
from biomedseg.imaging_guess import modality_from_words

MODALITIES = ("CT", "MRI", "Ultrasound", "PET", "Microscopy")
#: Words for 3D microscopy (the imaging vocabulary has none).
MICROSCOPY_WORDS = {"microscopy", "em", "electronmicroscopy", "lightsheet", "lightsheetmicroscopy", "lsm",
                    "3dmicroscopy"}
#: The v2 README's CT windows as (lower, upper) HU: level -/+ width / 2.
V2_CT_WINDOWS = {
    "soft tissue": (-160.0, 240.0),  # W400 L40
    "lung": (-910.0, 590.0),  # W1500 L-160
    "brain": (0.0, 80.0),  # W80 L40
    "bone": (-500.0, 1300.0),  # W1800 L400
}
V2_WINDOW_NAMES = {"soft tissue": "W400/L40", "lung": "W1500/L-160", "brain": "W80/L40", "bone": "W1800/L400"}
DEFAULT_V2_SITE = "soft tissue"
#: Body-site words (lower case, as people and DICOM headers write them) -> the v2 window they need.
V2_SITE_WORDS = {
    **{w: "lung" for w in ("lung", "lungs", "chest", "thorax", "thoracic", "pulmonary", "airway")},
    **{w: "brain" for w in ("brain", "head", "neuro", "cerebral", "cranial", "skull", "cerebrum")},
    **{w: "bone" for w in ("bone", "bones", "spine", "spinal", "skeleton", "skeletal", "msk", "vertebra",
                           "vertebrae", "cspine", "tspine", "lspine")},
    **{w: "soft tissue" for w in ("soft tissue", "soft-tissue", "softtissue", "abdomen", "abdominal", "abd",
                                  "pelvis", "pelvic", "liver", "hepatic", "pancreas", "colon", "colorectal",
                                  "kidney", "renal", "neck", "head and neck", "heart", "cardiac", "whole body",
                                  "wholebody", "body", "prostate", "bladder", "uterus")},
}


def _key(value) -> str:
    return " ".join(str(value).strip().lower().replace("_", " ").split())


def resolve_modality(value, why: str = "") -> str:
    """A modality name, DICOM code or the engine's guess -> one of ``MODALITIES``; InputError for images
    the authors point to v1 for, or words that name no modality."""
    key = _key(value).replace(" ", "").replace("-", "")
    if key in MICROSCOPY_WORDS:
        return "Microscopy"
    name = modality_from_words(value) or ("Ultrasound" if key == "us" else None)
    if name is None:
        for known in MODALITIES:
            if known.lower() == key:
                return known
        raise InputError(f"'{value}' names no modality BiomedParse v2 knows.",
                         hint="Use CT, MRI (or MR, T1, T2 ...), Ultrasound (US), PET (PT) or Microscopy.")
    if name.startswith("MRI"):
        return "MRI"
    if name in MODALITIES:
        return name
    seen = f" ({why})" if why else ""
    raise InputError(f"BiomedParse v2 was trained on 3D CT, MRI, ultrasound, PET and microscopy, not on "
                     f"{name} images{seen}.",
                     hint="The authors point to BiomedParse v1 (--model biomedparse-v1) for 2D X-ray, pathology, "
                          "endoscopy, fundus, dermoscopy and OCT; state --modality if the guess is wrong.")


def v2_site(value) -> str | None:
    """The v2 CT window a site word needs ('chest' -> 'lung'), or None for a word it does not know."""
    key = _key(value)
    return V2_SITE_WORDS.get(key) or (key if key in V2_CT_WINDOWS else None)


def v2_site_choices() -> list[str]:
    return sorted(set(V2_SITE_WORDS) | set(V2_CT_WINDOWS))


def site_from_tags(meta: dict, resolve) -> tuple[str | None, str]:
    """(site, source) from the DICOM body part or series description, word by word, as v1 reads them."""
    for key in ("body_part", "series_description"):
        text = meta.get(key)
        if isinstance(text, str) and text.strip():
            for word in text.replace("^", " ").replace("_", " ").split():
                site = resolve(word)
                if site is not None:
                    return site, f"DICOM {key.replace('_', ' ')} '{text}'"
    return None, "unknown"


def describe_rule(modality: str, ct_window: str, site: str | None, window, as_is: bool) -> str:
    """The sentence the report gives for the intensity rule that ran."""
    if modality == "CT":
        if ct_window == "v1":
            return f"BiomedParse v1's CT window for {site} ({window[0]:g}..{window[1]:g} HU), min-max to 0..255, uint8"
        return (f"the v2 README's CT window for {site} ({V2_WINDOW_NAMES[site]}: {window[0]:g}..{window[1]:g} HU), "
                "min-max to 0..255, uint8")
    if as_is:
        return "used as is: the intensities already lie in 0..255 (the v2 README's rule)"
    return ("0.5 / 99.5 percentiles of the positive voxels (v1's MR rule, the v2 README's rule for non-CT), "
            "min-max to 0..255, uint8")
