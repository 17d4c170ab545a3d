"""What the engine decides about a request before any model loads, and the warnings it owes.

The modality guard (``modality_guard``) and the per-target modality check (``vocabulary``)
run here once for the worker, ``--in-process`` and the front ends (the CLI and the panel
call ``decide`` before they start a worker, so a refusal comes in well under a second);
what was decided goes into the run report under ``decisions``.
"""
from __future__ import annotations

from .modality_guard import check_modality
from .prompts import TextPrompt
from .vocabulary import free_text_warnings, target_warnings
from .volume import Volume


def decide(entry, volume: Volume, prompts, options: dict | None, *, force: bool = False,
           free_text: bool = False) -> dict:
    """The ``decisions`` report: the modality with its source, the site asked for, warnings.
    Raises ModalityMismatchError when the image clearly is not the model's (unless ``force``)."""
    options = options or {}
    stated = options.get("modality")
    decision = check_modality(entry, volume, None if stated in (None, "") else str(stated), force)
    texts = [p.text for p in prompts if isinstance(p, TextPrompt)]
    # a guess that guesses ("MRI-like", "a colour image: pathology or fundus or ...") names no modality to warn about
    sure = decision.certain and not (decision.source == "intensities" and volume.channels_last)
    warnings = list(decision.warnings) + (target_warnings(entry, texts, decision.modality) if sure else [])
    warnings += free_text_warnings(entry, texts, free_text)
    return {"modality": decision.to_dict(), "site": options.get("site"), "force": bool(force),
            "free_text": bool(free_text), "warnings": warnings}

