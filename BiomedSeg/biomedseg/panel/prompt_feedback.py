"""What the panel says under the prompt line while the person types, by the CLI's own rules.

Each prompt is checked as ``catalog.check_prompts`` and ``vocabulary.target_warnings`` will
check it at Segment: a name the model does not know is an error with the closest names
(unless *Free text* is ticked), a known name the model was not trained on for the chosen
modality is a warning. So the panel never lets a typo reach the worker, and never refuses
what the CLI would run.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..catalog import get_model
from ..errors import InputError
from ..imaging_guess import modality_from_words
from ..vocabulary import check_texts, free_text_warnings, target_warnings
from .state import parse_prompts


@dataclass
class PromptNote:
    prompt: str
    #: 'ok', 'warning' (runs, with the sentence) or 'error' (Segment refuses it)
    level: str
    text: str = ""


def prompt_notes(model_id: str, prompt_text: str, modality: str = "", free_text: bool = False) -> list[PromptNote]:
    """One note per prompt on the line (in order)."""
    entry = get_model(model_id)
    if "text" not in entry.prompt_types:
        return []
    notes = []
    for prompt in parse_prompts(prompt_text):
        try:
            spelled = check_texts(entry, [prompt], free_text)[0]
        except InputError as err:
            notes.append(PromptNote(prompt, "error", err.message))
            continue
        warning = (target_warnings(entry, [spelled], modality_from_words(modality) or modality or None)
                   or free_text_warnings(entry, [spelled], free_text))
        if warning:
            notes.append(PromptNote(prompt, "warning", warning[0]))
        else:
            notes.append(PromptNote(prompt, "ok", f"sent as '{spelled}'" if spelled != prompt else ""))
    return notes


def notes_line(notes: list[PromptNote]) -> str:
    """The sentence under the prompt line: errors first, then warnings; empty when all is well."""
    return " ".join(n.text for n in sorted(notes, key=lambda n: n.level != "error") if n.level != "ok")


def can_segment(notes: list[PromptNote]) -> bool:
    return not any(n.level == "error" for n in notes)


__all__ = ["PromptNote", "prompt_notes", "notes_line", "can_segment"]
