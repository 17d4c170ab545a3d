"""What kind of image a volume is: the modality from its DICOM tags, else from its voxels.

One set of rules, so the panel's suggestion, the CLI's default and every backend agree on
what an image is. Names are the catalogue's generic ones (CT, PET, MRI, MRI-T1, MRI-T1-Gd,
MRI-T2, MRI-FLAIR, MRI-ADC, MRI-cine, X-Ray, Ultrasound, Pathology, Endoscope, Fundus,
Dermoscopy, OCT); each backend maps them to its own vocabulary and refuses what it was not
trained on. Body sites are not guessed here: each model names its sites differently (the
CT windows of BiomedParse, the regions of the panel's suggestions).
"""
from __future__ import annotations

import re

import numpy as np

from .volume import Volume

#: DICOM Modality (0008,0060) -> the catalogue's modality names.
DICOM_MODALITIES = {"CT": "CT", "MR": "MRI", "PT": "PET", "US": "Ultrasound", "CR": "X-Ray", "DX": "X-Ray",
                    "DR": "X-Ray", "MG": "X-Ray", "RF": "X-Ray", "XA": "X-Ray", "OCT": "OCT", "OPT": "OCT",
                    "OP": "Fundus", "SM": "Pathology", "GM": "Pathology", "ES": "Endoscope", "XC": "Dermoscopy"}
#: Words in a series description -> MRI sequence (first match wins, so contrast-enhanced T1 comes first).
MRI_SEQUENCES = [(r"flair", "MRI-FLAIR"), (r"\badc\b|apparent diff", "MRI-ADC"),
                 (r"(t1|mprage|spgr|bravo).*(gd|gad|\+c|post|contrast)|(gd|gad|contrast).*(t1)", "MRI-T1-Gd"),
                 (r"\bt1|mprage|spgr|bravo|tfl", "MRI-T1"), (r"\bt2|tse|haste", "MRI-T2"),
                 (r"cine|ssfp|fiesta|trufi", "MRI-cine")]
#: An image without a stated modality whose minimum is below this is taken for CT: air is
#: -1000 HU, while MR, PET, X-ray and photographs have no negative values to speak of.
HU_AIR_BELOW = -500.0


def modality_from_tags(dicom_modality: str | None, series_description: str | None = "") -> str | None:
    """Catalogue modality from a DICOM Modality code (MR refined by the series description);
    None for codes that name no imaging modality (OT, SC, SEG ...) or none at all."""
    code = str(dicom_modality or "").strip().upper()
    name = DICOM_MODALITIES.get(code)
    if name == "MRI" and series_description:
        text = str(series_description).lower()
        name = next((seq for pattern, seq in MRI_SEQUENCES if re.search(pattern, text)), name)
    return name


def modality_from_voxels(volume: Volume) -> tuple[str, str]:
    """(modality, why) guessed from the voxels alone; always an answer, always worth a look."""
    if volume.channels_last:
        return "Pathology", "a colour image (could also be endoscopy, dermoscopy or fundus)"
    low = float(np.min(volume.array)) if volume.array.size else 0.0
    if low < HU_AIR_BELOW:
        return "CT", "Hounsfield-like intensities"
    if min(volume.shape) == 1:
        return "X-Ray", "a single grey slice (could also be ultrasound)"
    return "MRI", "MRI-like intensities (sequence unknown)"


def tag_reason(code, description: str | None = None) -> str:
    """How a modality read from DICOM tags is said: "DICOM modality MR ('t2_tse')"."""
    return f"DICOM modality {str(code).strip()}" + (f" ('{description}')" if description else "")


def guess_modality(volume: Volume, tags: dict | None = None) -> tuple[str, str]:
    """(modality, why): from ``tags`` (default: what the reader put in ``volume.meta``), else the voxels."""
    tags = tags if tags is not None else volume.meta
    code = tags.get("modality")
    description = tags.get("series_description")
    name = modality_from_tags(code, description)
    if name is not None:
        return name, tag_reason(code, description)
    name, why = modality_from_voxels(volume)
    if isinstance(code, str) and code.strip():
        why += f" (DICOM modality '{code.strip()}' names no imaging modality)"
    return name, why


#: What people type for a modality (lower case, spaces and dashes dropped) -> the catalogue's name.
MODALITY_WORDS = {
    "ct": "CT", "cta": "CT", "pet": "PET", "pt": "PET", "mr": "MRI", "mri": "MRI",
    "t1": "MRI-T1", "t1w": "MRI-T1", "mrit1": "MRI-T1", "mprage": "MRI-T1",
    "t1gd": "MRI-T1-Gd", "t1ce": "MRI-T1-Gd", "t1c": "MRI-T1-Gd", "mrit1gd": "MRI-T1-Gd",
    "t2": "MRI-T2", "t2w": "MRI-T2", "mrit2": "MRI-T2", "flair": "MRI-FLAIR", "mriflair": "MRI-FLAIR",
    "adc": "MRI-ADC", "mriadc": "MRI-ADC", "cine": "MRI-cine", "mricine": "MRI-cine",
    "xray": "X-Ray", "xr": "X-Ray", "cr": "X-Ray", "dx": "X-Ray", "radiograph": "X-Ray",
    "us": "Ultrasound", "ultrasound": "Ultrasound", "echo": "Ultrasound",
    "pathology": "Pathology", "histology": "Pathology", "histopathology": "Pathology", "sm": "Pathology",
    "endoscope": "Endoscope", "endoscopy": "Endoscope", "fundus": "Fundus", "dermoscopy": "Dermoscopy",
    "oct": "OCT",
}


def modality_from_words(text: str | None) -> str | None:
    """'mr', 'T1', 'x-ray' -> the catalogue's name; None for words that name no modality we know."""
    key = re.sub(r"[\s_\-]+", "", str(text or "").lower())
    return MODALITY_WORDS.get(key)
