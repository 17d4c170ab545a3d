"""The findings of a text-with-masks model (UniBiomed) in the panel: each grounded phrase linked to its segment.

A run's ``RunOutcome`` has the findings (``Finding(text, targets)``: a sentence and the names of the
masks it talks about) and the segments it wrote (``segment_ids``, with the result's own name of each
in ``result_names`` and the name the node shows in ``names``: the writer makes a new segment
'lesion 2' when 'lesion' is taken). ``phrase_segments`` maps each finding target to the
segment ids this run wrote for it; ``finding_views`` finds each phrase in its sentence, so the view
can show the text with every phrase as a link (``findings_html``, ``segment:ID`` anchors) whose
click selects and shows the segment (``segment_of_link``). Nothing here touches Qt or MRML.
"""
from __future__ import annotations

import html
import re
from dataclasses import dataclass, field

LINK_SCHEME = "segment:"


@dataclass
class PhraseLink:
    """A phrase of a finding that names a segment: its place in the text (None when the sentence does not
    contain it, e.g. a long phrase cut short) and the segment ids it stands for."""

    target: str
    segment_ids: list[str]
    start: int | None = None
    end: int | None = None


@dataclass
class FindingView:
    text: str
    links: list[PhraseLink] = field(default_factory=list)

    @property
    def segment_ids(self) -> list[str]:
        return [sid for link in self.links for sid in link.segment_ids]


def _written_as(target: str, name: str) -> bool:
    return name == target or re.fullmatch(re.escape(target) + r" \d+", name) is not None


def phrase_segments(outcome) -> dict[str, list[str]]:
    """{finding target: [segment id, ...]} for the segments ``outcome`` wrote (empty list: none written, e.g.
    a phrase whose mask was empty). The result's own names (``result_names``) say it exactly; an outcome
    without them is matched on the written names, an exact name before the writer's 'name N'."""
    ids = list(getattr(outcome, "segment_ids", []) or [])
    targets = list(dict.fromkeys(t for f in getattr(outcome, "findings", []) or [] for t in f.targets))
    own = list(getattr(outcome, "result_names", []) or [])
    if own and len(own) == len(ids):
        return {t: [sid for name, sid in zip(own, ids) if name == t] for t in targets}
    names = list(getattr(outcome, "names", []) or [])
    used: set[int] = set()
    out: dict[str, list[str]] = {}
    for exact in (True, False):
        for target in targets:
            if target in out:
                continue
            hits = [i for i, name in enumerate(names) if i not in used and
                    (name == target if exact else _written_as(target, name))]
            if hits:
                used.add(hits[0])
                out[target] = [ids[hits[0]]]
    return {t: out.get(t, []) for t in targets}


def _find(text: str, target: str, after: int) -> tuple[int, int] | None:
    """Where ``target`` (or its name without the writer's ' N') is in ``text`` from ``after`` on, any case."""
    for word in dict.fromkeys([target, re.sub(r" \d+$", "", target)]):
        m = re.search(re.escape(word), text[after:], re.IGNORECASE)
        if m:
            return after + m.start(), after + m.end()
    return None


def finding_views(outcome) -> list[FindingView]:
    """One view per finding, its phrases located in order and linked to the segments of ``outcome``."""
    segments = phrase_segments(outcome)
    views = []
    for finding in getattr(outcome, "findings", []) or []:
        view, at = FindingView(finding.text), 0
        for target in finding.targets:
            place = _find(finding.text, target, at)
            link = PhraseLink(target, list(segments.get(target, [])))
            if place is not None:
                link.start, link.end = place
                at = place[1]
            view.links.append(link)
        views.append(view)
    return views


def _anchor(label: str, link: PhraseLink) -> str:
    if not link.segment_ids:
        return html.escape(label)
    return f'<a href="{LINK_SCHEME}{html.escape(link.segment_ids[0], quote=True)}">{html.escape(label)}</a>'


def findings_html(views: list[FindingView]) -> str:
    """The findings as rich text for a QLabel / QTextBrowser: one paragraph each, phrases as links; a phrase
    not found in its sentence is linked after it, in brackets."""
    paragraphs = []
    for view in views:
        placed = sorted((link for link in view.links if link.start is not None), key=lambda link: link.start)
        parts, at = [], 0
        for link in placed:
            parts.append(html.escape(view.text[at:link.start]))
            parts.append(_anchor(view.text[link.start:link.end], link))
            at = link.end
        parts.append(html.escape(view.text[at:]))
        extra = [_anchor(link.target, link) for link in view.links if link.start is None]
        if extra:
            parts.append(" [" + ", ".join(extra) + "]")
        paragraphs.append("<p>" + "".join(parts) + "</p>")
    return "".join(paragraphs)


def segment_of_link(href: str) -> str | None:
    """The segment id of a link the view reported clicked, or None for any other link."""
    return href[len(LINK_SCHEME):] if isinstance(href, str) and href.startswith(LINK_SCHEME) else None


__all__ = ["PhraseLink", "FindingView", "phrase_segments", "finding_views", "findings_html", "segment_of_link",
           "LINK_SCHEME"]
