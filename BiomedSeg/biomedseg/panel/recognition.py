"""BiomedCLIP in the panel, without Qt: recognise the image, check the prompts, rank the slices.

Three uses of the ``biomedclip`` model (labels only, never masks), each through the worker:

- **recognise** the selected volume when it is chosen: zero-shot modality, body site and view from a
  few representative slices. The result becomes the panel's modality/site guess with its source
  ("BiomedCLIP: CT 62%, chest 48%"); what the DICOM tags state (Modality, body part) still wins, and
  when the two disagree the line says both (``merge_guess``).
- **check** the typed prompts, debounced, against the chosen model's own targets for the modality and
  site (``guessing.suggestions``: the catalogue's ``ModelEntry.targets``): a prompt far less plausible
  than the alternatives gets a warning that names the better-fitting targets. A warning, never a block;
  skipped for models without a target list and while BiomedCLIP is not ready.
- **rank** the slices along the slice axis for a target: the best slice's array index and the RAS
  centre of that slice, so the view can jump there ("Find slices"; "Suggest key slice" for a MedSAM2
  box in the Correct section).

Cheap by construction: one worker session per volume (``session=``), so the image is sent once and
the backend's per-slice embedding cache is hit by every later check and ranking; the image is sent
again only when it or its geometry changed, or when the worker lost the session. Only the chosen
volume's session stays open (choosing another closes the previous one, so the worker's few session
places stay free for the Correct section; the embeddings stay in the backend's content-keyed cache). These requests run in
a second run slot (``_Lane``) on the main controller's worker client, so they never take the one run
the Segment button and the Correct section use, and never make the panel look busy; the worker runs
jobs in order, so a Segment pressed meanwhile starts after a short recognition. ``poll()`` is called
from the view's own timer; nothing here blocks.

Readiness is the catalogue state of ``biomedclip`` in the worker's Python (``set_choices`` /
``set_states``), or a local weights folder (``weights``). Nothing is sent while it is not ready.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from .. import slicer_bridge
from ..catalog import get_model
from ..errors import BiomedSegError, InputError
from ..runtime.weights import weights_state
from .controller import PanelController
from .guessing import SITE_SYNONYMS, Guess, match_modality, match_site, modalities_for, sites_for, suggestions
from .messages import RunOutcome, describe_error
from .request import build_request
from .state import PanelState

CLIP = "biomedclip"
#: Seconds a prompt must stay unchanged before it is checked (typing does not send a request per key).
DEBOUNCE_S = 0.8
#: Slices named by a ranking.
TOP = 5
#: Order in which waiting requests go: recognition first (the check's alternatives depend on its
#: modality and site), then what the person asked for, then the background check.
ORDER = ("recognize", "rank", "check")
_NOT_LOCAL = ("dependencies missing", "not available in this version", "not supported on this device")


# ---- recognition result and the guess it gives ----------------------------------------------

@dataclass
class Recognition:
    """BiomedCLIP's zero-shot answer: per family (modality, site, view) every class with its probability."""

    scores: dict  # family -> [(name, probability), ...] best first
    slices: list = field(default_factory=list)  # the representative slices it looked at

    @classmethod
    def from_labels(cls, labels, report: dict | None = None) -> "Recognition":
        scores: dict = {}
        for label in labels:
            scores.setdefault(label.target, []).append((label.name, float(label.score)))
        for family in scores:
            scores[family].sort(key=lambda item: -item[1])
        return cls(scores, list((report or {}).get("slices") or []))

    def best(self, family: str) -> tuple[str, float] | None:
        found = self.scores.get(family)
        return found[0] if found else None

    @property
    def modality(self) -> str:
        return (self.best("modality") or ("", 0.0))[0]

    @property
    def site(self) -> str:
        return (self.best("site") or ("", 0.0))[0]

    @property
    def view(self) -> str:
        return (self.best("view") or ("", 0.0))[0]

    def named(self, family: str) -> str:
        """'CT 62%' for the best class of a family ('' when the family was not recognised)."""
        best = self.best(family)
        return f"{best[0]} {best[1]:.0%}" if best else ""

    @property
    def source(self) -> str:
        """'BiomedCLIP: CT 62%, chest 48%'."""
        return "BiomedCLIP: " + ", ".join(filter(None, (self.named("modality"), self.named("site"))))


@dataclass
class RecognizedGuess:
    """The modality and site the panel takes (in the chosen model's words), where each came from, and the
    'Recognised: ...' line with any disagreement between the DICOM tags or the rules and BiomedCLIP."""

    modality: str
    site: str
    modality_from: str  # "DICOM tags", "BiomedCLIP"
    site_from: str
    source: str  # what goes into PanelState.guess_source
    line: str
    disagreements: list = field(default_factory=list)


def same_modality(a: str, b: str) -> bool:
    """One family ('MRI-T1' and 'MRI' agree; 'CT' and 'MRI' do not)."""
    return bool(a) and bool(b) and a.split("-")[0].lower() == b.split("-")[0].lower()


def same_site(a: str, b: str) -> bool:
    """The same region ('head' and 'brain' agree), by ``guessing.SITE_SYNONYMS``."""
    a, b = (a or "").lower(), (b or "").lower()
    return bool(a) and (a == b or any(a in group and b in group for group in SITE_SYNONYMS))


#: BiomedCLIP's answer replaces a rule-based guess only when its best class has at least this
#: probability (zero-shot scores spread thin; its accuracy with the real weights is not measured here).
MIN_CONFIDENCE = 0.5


def confident(recognition: Recognition, family: str) -> bool:
    best = recognition.best(family)
    return best is not None and bool(best[0]) and best[1] >= MIN_CONFIDENCE


def _strong_rule(guess: Guess) -> bool:
    """CT from Hounsfield-like intensities (air at -1000) is evidence a zero-shot score should not overrule."""
    return guess.modality == "CT" and "Hounsfield" in (guess.reason or "")


def _kept_from(guess: Guess | None, family: str) -> str:
    stated = guess is not None and (guess.modality_stated if family == "modality" else guess.site_stated)
    return "DICOM tags" if stated or guess is None else "rules"


def merge_guess(model_id: str, guess: Guess | None, recognition: Recognition) -> RecognizedGuess:
    """The panel's modality/site once BiomedCLIP has spoken: the DICOM tags win where they state the
    modality (or the body part), and so does CT from Hounsfield-like intensities; BiomedCLIP replaces
    the other intensity and field-of-view rules when it is confident (``MIN_CONFIDENCE``); both are
    named when they disagree. Names go into the model's own words (``match_modality``)."""
    rec_modality, rec_site = recognition.modality, recognition.site
    modalities = modalities_for(model_id)
    modality_kept = guess is not None and (guess.modality_stated or _strong_rule(guess))
    if modality_kept or not confident(recognition, "modality"):
        modality, modality_from = (guess.modality if guess is not None else ""), _kept_from(guess, "modality")
    else:
        modality, modality_from = rec_modality, "BiomedCLIP"
    modality = match_modality(modality, modalities)
    if guess is not None and guess.site_stated or not confident(recognition, "site"):
        site, site_from = (guess.site if guess is not None else ""), _kept_from(guess, "site")
    else:
        site, site_from = rec_site, "BiomedCLIP"
    site = match_site(site, sites_for(model_id, modality))
    pieces: dict[str, list[str]] = {"DICOM tags": [], "rules": [], "BiomedCLIP": []}
    pieces[modality_from].append(recognition.named("modality") if modality_from == "BiomedCLIP" else modality)
    pieces[site_from].append(recognition.named("site") if site_from == "BiomedCLIP" else site)
    source = "; ".join(f"{where}: {', '.join(filter(None, names))}" for where, names in pieces.items()
                       if any(names))
    disagreements = []
    if guess is not None and guess.modality and rec_modality and not same_modality(guess.modality, rec_modality):
        disagreements.append(f"the DICOM tags say {guess.modality}, which is kept" if guess.modality_stated
                             else f"the intensity rules say {guess.modality}, which is kept" if modality_from == "rules"
                             else f"the intensity rules said {guess.modality}")
    if guess is not None and guess.site and rec_site and not same_site(guess.site, rec_site):
        disagreements.append(f"the DICOM body part says {guess.site}, which is kept" if guess.site_stated
                             else f"the field of view suggests {guess.site}, which is kept" if site_from == "rules"
                             else f"the field of view suggested {guess.site}")
    seen = [recognition.named("modality"), recognition.named("site")]
    if recognition.best("view"):
        seen.append(f"{recognition.view} view {recognition.best('view')[1]:.0%}")
    line = "Recognised: " + ", ".join(filter(None, seen)) + " (BiomedCLIP)"
    line += ("; " + "; ".join(disagreements) + ". Check the modality and site.") if disagreements else "."
    return RecognizedGuess(modality, site, modality_from, site_from, source, line, disagreements)


# ---- geometry of a ranked slice ----------------------------------------------------------------

def slice_centre(grid, plane: str, index: int) -> np.ndarray:
    """World RAS of the centre of slice ``index`` (array index along ``plane``'s axis) of a volume grid."""
    orientation = grid.slice_orientation(plane)
    centre = [(n - 1) / 2.0 for n in grid.shape[:3]]  # (k, j, i)
    centre[orientation.slice_axis] = float(index)
    return (np.asarray(grid.ijk_to_ras, float) @ np.array([centre[2], centre[1], centre[0], 1.0]))[:3]


# ---- outcomes ---------------------------------------------------------------------------------

@dataclass
class ClipOutcome(RunOutcome):
    """A finished BiomedCLIP request: ``kind`` recognize, check or rank, and what it gives the panel."""

    kind: str = ""
    volume_node: object = None
    image_sent: bool = False
    #: recognize: BiomedCLIP's answer, the merged guess, and the submitted panel state with the guess in it
    recognition: Recognition | None = None
    guess: RecognizedGuess | None = None
    panel_state: PanelState | None = None
    #: check: the prompts, the alternatives they were compared with and the model's warnings
    prompts: list = field(default_factory=list)
    alternatives: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    #: rank: the target, its slices best first ({"slice", "score"}), the best one and its centre in RAS
    target: str = ""
    purpose: str = ""  # "find" (Find slices) or "key slice" (Suggest key slice)
    plane: str = "axial"
    ranking: list = field(default_factory=list)
    slice: int | None = None
    ras: tuple | None = None

    @property
    def warning(self) -> str:
        """The warning line under the prompts ('' when every prompt fits)."""
        return " ".join(self.warnings)

    @property
    def summary(self) -> str:
        if self.state != "done":
            what = {"recognize": "recognise the image", "check": "check the prompts",
                    "rank": "rank the slices"}.get(self.kind, "run")
            return f"BiomedCLIP could not {what}: " + (self.message.text if self.message else "it stopped.")
        if self.kind == "recognize":
            return self.guess.line
        if self.kind == "check":
            return self.warning or f"The prompts fit this image as well as {len(self.alternatives)} alternatives."
        best = self.ranking[0]
        rest = ", ".join(str(r["slice"]) for r in self.ranking[1:])
        text = f"Best {self.plane} slice for '{self.target}': {best['slice']} (score {best['score']:.2f})"
        return text + (f"; then {rest}." if rest else ".")


@dataclass
class _Request:
    kind: str
    state: PanelState  # the panel's state when asked
    volume_node: object
    due: float = 0.0
    target: str = ""
    purpose: str = ""
    guess: Guess | None = None
    alternatives: list = field(default_factory=list)
    options: dict = field(default_factory=dict)
    key: tuple = ()


class _Lane(PanelController):
    """A second run slot on the main controller's worker client (its own run, poll and cancel)."""

    def __init__(self, main: PanelController):
        super().__init__(main.scene)
        self.main = main

    def client_for(self, worker_python: str = "", state=None):
        self._client, self._own_client = self.main.client_for(worker_python, state), False
        return self._client


# ---- the controller ---------------------------------------------------------------------------

class RecognitionController:
    """Recognise, check and rank through the worker for the panel; call ``poll()`` from a timer.

    ``panel``: the module's ``PanelController`` (its worker client is shared); ``weights``: a local
    BiomedCLIP folder ('' = the catalogue's: hub cache or $BIOMEDSEG_WEIGHTS_DIR); ``ratio``: the check's
    warning ratio (None = the model's default); ``clock``: seconds (tests step it for the debounce).
    """

    def __init__(self, panel: PanelController, weights: str = "", *, ratio: float | None = None,
                 debounce_s: float = DEBOUNCE_S, top: int = TOP, clock: Callable[[], float] = time.monotonic):
        self.panel = panel
        self.lane = _Lane(panel)
        self.weights = weights
        self.ratio = ratio
        self.debounce_s = debounce_s
        self.top = top
        self.clock = clock
        self.clip_state: dict | None = None  # the catalogue state of biomedclip in the worker's Python
        self.pending: dict[str, _Request] = {}
        self.current: _Request | None = None
        self.last_job = None
        #: volume node ID -> the last recognition of it
        self.recognitions: dict[str, Recognition] = {}
        self.last_check: ClipOutcome | None = None
        self.last_check_key: tuple = ()  # what the last finished check answered
        self._check_key: tuple | None = None  # what the prompt line asks for now
        self._refused: list[ClipOutcome] = []  # requests refused before the worker, for the next poll
        self._stamps: dict[str, tuple] = {}  # session -> the image it holds

    # ---- readiness ----
    def set_states(self, states: dict | None) -> None:
        """``model_states()``' answer (or None: unknown, so not ready)."""
        self.clip_state = dict(states[CLIP]) if states and CLIP in states else None

    def set_choices(self, choices) -> None:
        """The panel's model list (``model_choices``: states with the device taken into account)."""
        found = next((c for c in choices or [] if c.id == CLIP), None)
        self.clip_state = None if found is None else {"ready": found.ready, "state": found.state,
                                                      "detail": found.detail}

    def _weights_for(self, state: PanelState | None = None) -> str:
        return self.weights or (state.weights if state is not None and state.model == CLIP else "")

    def is_ready(self, state: PanelState | None = None) -> bool:
        st = self.clip_state
        if st is None:
            return False
        if st.get("ready"):
            return True
        local = self._weights_for(state)
        return bool(local) and st.get("state") not in _NOT_LOCAL and \
            weights_state(get_model(CLIP).weights, local)["present"]

    @property
    def ready(self) -> bool:
        return self.is_ready()

    def why_not_ready(self) -> str:
        st = self.clip_state
        if st is None:
            return "BiomedCLIP's state on this machine is not known yet."
        if self.is_ready():
            return ""
        return f"BiomedCLIP is not ready here ({st.get('state')}: {st.get('detail', '')})."

    # ---- requests ----
    def recognize(self, state: PanelState, volume_node, guess: Guess | None = None) -> bool:
        """Recognise ``volume_node`` in the background (the panel calls it when a volume is chosen).
        ``guess``: the tag/rule guess the result is merged with. False when nothing was queued."""
        if volume_node is None or not self.is_ready(state):
            return False
        self.pending["recognize"] = _Request("recognize", state, volume_node, self.clock(), guess=guess,
                                             options={"task": "recognize"})
        return True

    def check_alternatives(self, state: PanelState) -> list[str]:
        """The targets a prompt is compared with: the chosen model's for the modality and site (wider
        when none match); [] for models without a target list."""
        try:
            entry = get_model(state.model)
        except InputError:
            return []
        if state.model == CLIP or not entry.target_table():
            return []
        return suggestions(state.model, state.modality, state.site)

    def check(self, state: PanelState, volume_node, ratio: float | None = None) -> bool:
        """Check the typed prompts after ``debounce_s`` without a change (each call restarts the wait).
        False when there is nothing to check: no volume or prompt, no target list, BiomedCLIP not ready;
        the warning line is then empty."""
        alternatives = self.check_alternatives(state)
        ratio = self.ratio if ratio is None else ratio
        if volume_node is None or not state.prompts or not alternatives or not self.is_ready(state):
            self.pending.pop("check", None)
            self._check_key = None
            return False
        key = (volume_node.GetID(), state.model, tuple(p.lower() for p in state.prompts), tuple(alternatives),
               ratio, state.slice_axis, self._image_stamp(volume_node))
        self._check_key = key
        if self.last_check is not None and self.last_check.state == "done" and self.last_check_key == key:
            self.pending.pop("check", None)  # answered already: the warning stays as it is
            return False
        options = {"task": "check", "alternatives": list(alternatives)}
        if ratio is not None:
            options["ratio"] = float(ratio)
        self.pending["check"] = _Request("check", state, volume_node, self.clock() + self.debounce_s,
                                         alternatives=list(alternatives), options=options, key=key)
        return True

    @property
    def warning(self) -> str:
        """The warning for the prompt line as it is now ('' while its check is waiting or was skipped)."""
        if self.last_check is None or self._check_key is None or self.last_check_key != self._check_key:
            return ""
        return self.last_check.warning

    def rank(self, state: PanelState, volume_node, target: str | None = None, purpose: str = "find") -> bool:
        """The slices most likely to show ``target`` (default: the first prompt), best first; the outcome
        names the best slice and its centre in RAS. Refused with a sentence when it cannot run."""
        if volume_node is None:
            raise InputError("No input volume is selected.", hint="Choose a volume under Inputs.")
        target = (target or (state.prompts[0] if state.prompts else "")).strip()
        if not target:
            raise InputError("Type what to look for first.", hint="For example 'liver' in the prompt line.")
        if not self.is_ready(state):
            raise InputError(self.why_not_ready(),
                             hint="Choose BiomedCLIP in the model list and download its weights (MIT licence).")
        self.pending["rank"] = _Request("rank", state, volume_node, self.clock(), target=target, purpose=purpose,
                                        options={"task": "rank", "top": int(self.top)})
        return True

    def suggest_key_slice(self, state: PanelState, volume_node, segment_name: str = "") -> bool:
        """The best slice for a MedSAM2 box: the one most likely to show the segment's name (a new
        segment: the first prompt)."""
        name = (segment_name or "").strip() or (state.prompts[0] if state.prompts else "")
        if not name.strip():
            raise InputError("Name what the segment shows first.",
                             hint="Choose a named segment, or type its name in the prompt line.")
        return self.rank(state, volume_node, name, purpose="key slice")

    # ---- running ----
    @property
    def busy(self) -> bool:
        """Something runs or waits (the view keeps its timer going)."""
        return self.lane.running or bool(self.pending) or bool(self._refused)

    def poll(self) -> ClipOutcome | None:
        """Call from a timer: the request that ended (at most one per call), and the next one started."""
        out = None
        if self.lane.running:
            result = self.lane.poll()
            if result.finished:
                out = result.outcome
                req, self.current = self.current, None
                if not isinstance(out, ClipOutcome):  # failed or cancelled before the apply
                    out = ClipOutcome(out.state, message=out.message, kind=req.kind, volume_node=req.volume_node,
                                      target=req.target, purpose=req.purpose)
                if out.kind == "check":
                    self.last_check, self.last_check_key = out, req.key
        if not self.lane.running:
            self._start_next()
        if out is None and self._refused:
            out = self._refused.pop(0)
        return out

    def wait(self, timeout: float = 120.0, interval: float = 0.02) -> list[ClipOutcome]:
        """Poll until nothing runs or waits (scripts and tests; the panel uses its timer)."""
        deadline, out = time.monotonic() + timeout, []
        while self.busy:
            found = self.poll()
            if found is not None:
                out.append(found)
            if time.monotonic() > deadline:
                self.cancel()
                raise TimeoutError(f"BiomedCLIP's requests did not finish within {timeout} s")
            time.sleep(interval)
        return out

    def _start_next(self) -> None:
        now = self.clock()
        for kind in ORDER:
            req = self.pending.get(kind)
            if req is None or req.due > now:
                continue
            del self.pending[kind]
            if req.volume_node.GetScene() is None:
                continue  # the volume went away while the request waited
            try:
                self._submit(req)
            except BiomedSegError as exc:  # refused before the worker: said like any failure
                self.current = None
                self._refused.append(ClipOutcome("failed", message=describe_error(exc), kind=req.kind,
                                                 volume_node=req.volume_node, target=req.target,
                                                 purpose=req.purpose))
                continue
            return

    def session_of(self, volume_node) -> str:
        return f"{CLIP}-{volume_node.GetID()}"

    @staticmethod
    def _image_stamp(volume_node) -> tuple:
        image = volume_node.GetImageData()
        return (image.GetMTime() if image is not None else 0,)

    def _submit(self, req: _Request) -> None:
        node, state = req.volume_node, req.state
        grid = slicer_bridge.grid_of(node)
        sid = self.session_of(node)
        stamp = self._image_stamp(node) + (tuple(np.round(grid.ijk_to_ras, 6).ravel()), grid.shape)
        client = self.lane.client_for(state.worker_python, state)
        send = sid not in client.sessions or self._stamps.get(sid) != stamp
        clip_state = replace(state, model=CLIP, prompts=[req.target] if req.kind == "rank" else
                             ([] if req.kind == "recognize" else list(state.prompts)),
                             slice_range=None, postprocess="model default", modality="", site="",
                             weights=self._weights_for(state), options=dict(req.options), guess_source="")
        if send:  # one BiomedCLIP session at a time, so interactive models' sessions are not pushed out
            for other in [o for o in self._stamps if o != sid]:
                self._close_session(client, other)
        volume = slicer_bridge.volume_from_node(node, harden_transform=True) if send else grid
        request = build_request(clip_state, volume)

        def apply(result, sent=send):
            self._stamps[sid] = stamp
            return self._apply(req, grid, sent, result)

        def retry(error):  # the worker lost the session (restarted, or more sessions were opened): send the image
            if "is not open" not in getattr(error, "message", "") or request.volume is not grid:
                return None
            request.volume = slicer_bridge.volume_from_node(node, harden_transform=True)
            self.lane.run.apply = lambda result: apply(result, True)
            self.last_job = client.submit(request.volume, request.model, request.prompts, session=sid,
                                          **request.kwargs)
            return self.last_job

        self.current = req
        self.last_job = self.lane.submit(request, node, None, clip_state, apply=apply, retry=retry, session=sid,
                                         send_volume=send)

    def _apply(self, req: _Request, grid, sent: bool, result) -> ClipOutcome:
        out = ClipOutcome("done", seconds=result.seconds, device=result.device, labels=list(result.labels),
                          report=dict(result.report), kind=req.kind, volume_node=req.volume_node, image_sent=sent,
                          plane=req.state.slice_axis)
        if req.kind == "recognize":
            out.recognition = Recognition.from_labels(result.labels, result.report)
            self.recognitions[req.volume_node.GetID()] = out.recognition
            out.guess = merge_guess(req.state.model, req.guess, out.recognition)
            out.panel_state = replace(req.state, modality=out.guess.modality, site=out.guess.site,
                                guess_source=out.guess.source)
        elif req.kind == "check":
            out.prompts, out.alternatives = list(req.state.prompts), list(req.alternatives)
            out.warnings = [str(w) for w in result.report.get("warnings") or []]
        else:
            ranking = result.report.get("ranking") or {}
            found = ranking.get(req.target) or (next(iter(ranking.values())) if len(ranking) == 1 else None)
            if not found:
                raise InputError(f"BiomedCLIP returned no ranking for '{req.target}'.")
            out.target, out.purpose, out.ranking = req.target, req.purpose, list(found)
            out.slice = int(found[0]["slice"])
            out.ras = tuple(float(v) for v in slice_centre(grid, req.state.slice_axis, out.slice))
        return out

    # ---- ending ----
    def cancel(self) -> None:
        """Drop what waits and stop what runs (its result is thrown away)."""
        self.pending.clear()
        self._refused.clear()
        self.lane.cancel()

    def forget(self) -> None:
        """The scene is closing: stop, and let the worker forget the images of this scene's volumes."""
        self.cancel()
        for sid in list(self._stamps):
            self._close_session(self.panel._client, sid)
        self.recognitions.clear()
        self.last_check, self.last_check_key, self._check_key = None, (), None

    def _close_session(self, client, sid: str) -> None:
        self._stamps.pop(sid, None)
        if client is not None and sid in client.sessions:
            try:
                client.close_session(sid)
            except Exception:  # a worker that went away has forgotten it already
                pass

    def close(self) -> None:
        self.cancel()


__all__ = ["CLIP", "DEBOUNCE_S", "TOP", "Recognition", "RecognizedGuess", "ClipOutcome", "RecognitionController",
           "merge_guess", "same_modality", "same_site", "slice_centre"]
