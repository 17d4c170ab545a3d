"""What UniBiomed is asked, in the authors' phrasing, and what its answer says.

Requests (each starts with ``<image>``, which the remote code replaces by the image tokens):

* segment: "Please segment {target}." -- the template of the authors' 3D demo (``demo/demo_seg3D.py``)
  and one of their training questions; the target goes in as typed ("the left lung" or "liver");
* findings of the whole image: "Could you describe the abnormality in this image? Please highlight the
  region with interleaved segmentation masks." -- their report-generation request (``example.py``);
* findings of one region: "Can we observe any signs of abnormality in {about}? Please respond with
  interleaved segmentation masks for the corresponding parts." -- their grounded-VQA question;
* a question: the person's own words, followed (``ground``) by the sentence their questions end with
  when they want masks.

Answers: the model writes text and a ``[SEG]`` token for every object it grounds; the remote code
returns one mask stack per ``[SEG]``, in order. The authors' answers come in three shapes, and
``parse_answer`` reads each phrase the way their own evaluation scripts do:

* ``<p> phrase </p> [SEG]`` (grounded reports and VQA): the phrase inside the tags;
* ``It is [SEG]. phrase.`` (disease recognition): a stock sentence, the phrase in the next one;
* ``Sure, [SEG].`` (segmentation): no phrase at all -- the target asked for.

An empty answer, or one without ``[SEG]``, is a result ("answered without a mask"), never an error;
a count of masks that differs from the count of ``[SEG]`` tokens, or unbalanced tags, are noted.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

IMAGE = "<image>"
SEG = "[SEG]"
#: Every request of the authors' that wants masks ends with one of these sentences; this one is theirs.
GROUNDING = "Please respond with interleaved segmentation masks for the corresponding parts."
REPORT = "Could you describe the abnormality in this image? Please highlight the region with interleaved segmentation masks."
REGION = "Can we observe any signs of abnormality in {about}? " + GROUNDING
SEGMENT = "Please segment {target}."
#: Special tokens the decoder leaves in (``skip_special_tokens=False``) and the role prefix of some templates.
_SPECIAL = re.compile(r"<\|im_end\|>|<\|im_start\|>|<\|endoftext\|>|</s>|<s>|^\s*(ASSISTANT|assistant)\s*:\s*")
#: Words of the sentences that only carry a [SEG] (the authors' answer templates: "Sure, it is [SEG]."):
#: such a sentence says nothing about the object; its phrase is elsewhere.
_STOCK_WORDS = {"sure", "yes", "ok", "okay", "it", "is", "its", "this", "here", "the", "segmentation", "result",
                "and", "mask", "masks", "s", "there", "a", "an"}


def _stock(text: str) -> bool:
    return set(re.findall(r"[a-z]+", text.lower())) <= _STOCK_WORDS


MAX_PHRASE_CHARS = 80


def build_request(task: str, target: str | None = None, about: str | None = None, question: str | None = None,
                  ground: bool = True) -> str:
    """The text ``predict_forward`` is given for one request."""
    if task == "segment":
        return IMAGE + SEGMENT.format(target=" ".join(str(target).split()).rstrip(".") if target else "")
    if task == "findings":
        about = " ".join(str(about or "").split()).rstrip("?.")
        return IMAGE + (REGION.format(about=about) if about else REPORT)
    if task == "question":
        asked = " ".join(str(question or "").split())
        if ground and "segmentation mask" not in asked.lower():
            asked = f"{asked} {GROUNDING}" if asked else GROUNDING
        return IMAGE + asked
    raise ValueError(f"unknown UniBiomed task {task!r}")


@dataclass
class Grounded:
    """One ``[SEG]`` of an answer: its phrase, the sentence it belongs to, and whether a mask came with it."""

    phrase: str
    sentence: int
    has_mask: bool = True


@dataclass
class Answer:
    """An answer read: ``text`` without tags or tokens, its ``sentences``, one ``Grounded`` per ``[SEG]``."""

    raw: str
    text: str
    sentences: list[str] = field(default_factory=list)
    grounded: list[Grounded] = field(default_factory=list)
    masks: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        """'empty', 'no [SEG]' (text only), or 'grounded'."""
        if not self.text and not self.grounded:
            return "empty"
        return "grounded" if any(g.has_mask for g in self.grounded) else "no [SEG]"


def clean_raw(raw) -> str:
    return " ".join(_SPECIAL.sub(" ", str(raw or "")).split())


def _tidy(text: str) -> str:
    """Text as a person reads it: tags and [SEG] gone, no space before punctuation, no doubled stops."""
    text = text.replace(SEG, " ").replace("<p>", " ").replace("</p>", " ")
    text = re.sub(r"<[^<>]{0,20}>", " ", text)  # stray tags (<img>, </s>, ...)
    text = " ".join(text.split())
    text = re.sub(r"\s+([,.;:!?])", r"\1", text)
    text = re.sub(r"([,;:])(?=[.!?])", "", text)
    return re.sub(r"([.!?])(\s*[.!?])+", r"\1", text).strip(" ,;:")


def _phrase(text: str) -> str:
    phrase = _tidy(text).strip(" .,;:!?\"'")
    return phrase[:MAX_PHRASE_CHARS].rstrip() if phrase else ""


def _sentences(text: str) -> list[str]:
    """Split after . ! ? followed by space, never inside <p> ... </p>."""
    out, start, depth = [], 0, 0
    for m in re.finditer(r"<p>|</p>|[.!?](?=\s|$)", text):
        token = m.group()
        if token == "<p>":
            depth += 1
        elif token == "</p>":
            depth = max(0, depth - 1)
        elif depth == 0:
            out.append(text[start:m.end()])
            start = m.end()
    if text[start:].strip():
        out.append(text[start:])
    return [s.strip() for s in out if s.strip()]


def parse_answer(raw, n_masks: int, default_phrase: str | None = None) -> Answer:
    """Read ``raw`` (``predict_forward``'s ``prediction``) given how many mask stacks came with it.

    ``default_phrase`` names a ``[SEG]`` whose answer says nothing about it (the target of a segment
    request); without one such a mask is called "finding N"."""
    cleaned = clean_raw(raw)
    answer = Answer(str(raw or ""), "", masks=int(n_masks))
    if cleaned.count("<p>") != cleaned.count("</p>"):
        answer.notes.append("unbalanced <p> tags in the answer; phrases read up to the next [SEG]")
    parts = _sentences(cleaned)
    consumed: set[int] = set()
    for s, sentence in enumerate(parts):
        pieces = sentence.split(SEG)
        for n in range(len(pieces) - 1):
            before = pieces[n]
            tagged = re.search(r"<p>((?:(?!<p>).)*?)(</p>)?\s*$", before)
            phrase = _phrase(tagged.group(1)) if tagged else ""
            if (not phrase and default_phrase is None and _stock(_tidy(sentence)) and s + 1 < len(parts)
                    and SEG not in parts[s + 1]):
                phrase = _phrase(parts[s + 1])  # "It is [SEG]. liver tumor."
                consumed.add(s + 1)
            if not phrase and not _stock(_tidy(before)):
                phrase = _phrase(before)
            answer.grounded.append(Grounded(phrase or default_phrase or f"finding {len(answer.grounded) + 1}", s))
    answer.sentences = [_tidy(p) for p in parts]
    for s in sorted(consumed, reverse=True):  # the phrase sentence takes the place of its stock sentence
        answer.sentences[s - 1] = answer.sentences[s]
        answer.sentences[s] = ""
    for s, sentence in enumerate(answer.sentences):  # "Sure, [SEG]." reads as what it grounds
        phrases = [g.phrase for g in answer.grounded if g.sentence == s]
        if phrases and s + 1 not in consumed and _stock(sentence):
            answer.sentences[s] = "; ".join(dict.fromkeys(phrases))
    answer.text = " ".join(s for s in answer.sentences if s)
    seg_count = len(answer.grounded)
    if n_masks != seg_count:
        answer.notes.append(f"the answer has {seg_count} [SEG] token(s) but {n_masks} mask(s) came back; "
                            "masks were matched to tokens in order")
        for g in answer.grounded[n_masks:]:
            g.has_mask = False
        for extra in range(seg_count, n_masks):
            answer.grounded.append(Grounded(default_phrase or f"finding {extra + 1}", max(0, len(parts) - 1)))
    return answer


def segment_names(answer: Answer, taken: list[str] | tuple = ()) -> list[str]:
    """A segment name per grounded phrase, unique among themselves and ``taken`` ('lesion', 'lesion 2')."""
    used = {t.lower() for t in taken}
    names = []
    for g in answer.grounded:
        base = g.phrase or "finding"
        name, n = base, 1
        while name.lower() in used:
            n += 1
            name = f"{base} {n}"
        used.add(name.lower())
        names.append(name)
    return names


def sentence_findings(answer: Answer, names: list[str]) -> list[tuple[str, list[str]]]:
    """(sentence, segment names it grounds) per sentence of the answer (a sentence that only carried a
    [SEG] reads as its phrase); masks beyond the [SEG] tokens belong to the last sentence."""
    out = []
    for s, sentence in enumerate(answer.sentences):
        targets = [name for g, name in zip(answer.grounded, names) if g.sentence == s and g.has_mask]
        if sentence:
            out.append((sentence, targets))
    return out
