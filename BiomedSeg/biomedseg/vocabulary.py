"""Whether a text prompt names a target the model knows, and for which modalities.

A free-text model draws *something* for any phrase: "livr" gave a 3-voxel segment called
"livr". So every text prompt is checked against the model's own target table (model.json
``targets``, ``targets_file`` or ``targets_provider``) before anything runs:

* a name the model knows (case, spacing, "tumour"/"tumor", a plural) is sent as the model's
  own spelling;
* anything else is refused with the closest names, unless the person asks for free text
  (``--free-text``, the panel's checkbox) and the model can take it (``prompt_kind: text``);
* a known name the model was not trained on for *this* modality ("left lung" is an X-ray
  target of BiomedParse, not a CT one) runs with a warning that names where it was trained.

Models with their own vocabulary code (``prompt_check``: Hermes' task ids) check themselves;
models whose prompts are labels of any wording (``prompts_free_text``: BiomedCLIP) are not
checked. Nothing here imports torch.
"""
from __future__ import annotations

import difflib
import re

from .errors import InputError

#: Spellings folded before names are compared (the names themselves are sent unchanged).
_FOLD = {"tumour": "tumor", "tumours": "tumors", "oesophagus": "esophagus", "grey": "gray", "haemorrhage":
         "hemorrhage", "oedema": "edema", "foetal": "fetal"}


def fold(text: str) -> str:
    """The form two spellings of one name share: lower case, single spaces, US spelling, no plural 's'."""
    words = re.sub(r"[^a-z0-9+/]+", " ", str(text).lower()).split()
    words = [_FOLD.get(w, w) for w in words if w not in ("the", "a", "an")]
    if words and len(words[-1]) > 3 and words[-1].endswith("s") and not words[-1].endswith("ss"):
        words[-1] = words[-1][:-1]
    return " ".join(words)


def modality_family(name: str) -> str:
    """'MRI-T1' -> 'MRI'; the family a sequence belongs to (colour photographs share one)."""
    name = str(name or "")
    if name.upper().startswith("MR"):
        return "MRI"
    if name in ("Pathology", "Endoscope", "Fundus", "Dermoscopy"):
        return "photo"
    return name


def same_modality(a: str, b: str) -> bool:
    """True when an image of modality ``a`` is what a table entry ``b`` was trained on: the same name,
    or a bare 'MRI' (sequence unknown) against any MRI sequence."""
    if not a or not b:
        return False
    if a.lower() == b.lower():
        return True
    return modality_family(a) == modality_family(b) == "MRI" and "MRI" in (a.upper(), b.upper())


def known_targets(entry) -> dict[str, str]:
    """folded name -> the model's own spelling, over every modality and site of its table."""
    out: dict[str, str] = {}
    for sites in entry.target_table().values():
        for names in sites.values():
            for name in names:
                out.setdefault(fold(name), name)
    return out


def trained_modalities(entry, target: str) -> list[str]:
    """Modalities whose table lists ``target`` (in the table's order)."""
    key = fold(target)
    return [modality for modality, sites in entry.target_table().items()
            if any(fold(name) == key for names in sites.values() for name in names)]


def close_names(entry, text: str, n: int = 3) -> list[str]:
    """The model's names closest to ``text`` (spelling), then names that contain its words."""
    known = known_targets(entry)
    key = fold(text)
    close = [known[k] for k in difflib.get_close_matches(key, list(known), n=n, cutoff=0.6)]
    if not close and key:
        words = set(key.split())
        close = [name for k, name in sorted(known.items()) if words <= set(k.split())][:n]
    return close


def check_texts(entry, texts: list[str], free_text: bool = False) -> list[str]:
    """The texts in the model's own spelling; InputError (exit 2) for a name the model does not know,
    with the closest names, unless ``free_text`` and the model takes free text."""
    model_id = entry.id
    if entry.data.get("prompts_free_text"):
        return list(texts)
    if entry.data.get("prompt_check"):  # the model's own vocabulary code (synonyms, task ids)
        entry.resolve(entry.data["prompt_check"])(texts)
        return list(texts)
    known = known_targets(entry)
    if not known:
        return list(texts)
    out, unknown = [], []
    for text in texts:
        name = known.get(fold(text))
        if name is None:
            unknown.append(text)
            out.append(text)
        else:
            out.append(text if text.lower() == name.lower() else name)
    if not unknown or (free_text and entry.prompt_kind == "text"):
        return out
    first = unknown[0]
    close = close_names(entry, first)
    names = ", ".join(repr(u) for u in unknown)
    lead = f"Model '{model_id}' has no target {names}."
    if close:
        lead += f" Did you mean {' or '.join(repr(c) for c in close)}?"
    if entry.prompt_kind == "text":
        hint = ("Fix the spelling, or pass --free-text (the panel's 'Free text' box) to send it as written; "
                f"`biomedseg models {model_id}` lists every target.")
    else:
        hint = f"It segments only its own targets: see `biomedseg models {model_id}`."
    raise InputError(lead, hint=hint)


def target_warnings(entry, texts: list[str], modality: str | None) -> list[str]:
    """A sentence for each known target the model was not trained on for ``modality``."""
    if not modality or entry.data.get("prompts_free_text"):
        return []
    table = entry.target_table()
    if not table or not any(same_modality(modality, m) for m in table):
        return []  # the modality guard speaks about the modality itself
    out = []
    for text in texts:
        where = trained_modalities(entry, text)
        if where and not any(same_modality(modality, m) for m in where):
            out.append(f"{entry.title} was trained on '{text}' in {', '.join(where)} images, not in {modality}; "
                       "the result may be meaningless.")
    return out


def is_listed(entry, text: str) -> bool:
    """True when ``text`` names one of the model's targets (or the model lists none)."""
    known = known_targets(entry)
    return not known or fold(text) in known


def free_text_warnings(entry, texts: list[str], free_text: bool) -> list[str]:
    """A sentence for each text sent as free text (``free_text`` on, and not one of the model's targets)."""
    if not free_text:
        return []
    return [f"'{t}' is not among {entry.title}'s targets; sent as free text." for t in texts if not is_listed(entry, t)]
