"""The Correct section: boxes and clicks on slices, propagation over a slice range, refining an existing
segment, corrections in the same worker session, and undo -- for any interactive model (MedSAM2, the
toy of the tests), without Qt.

One ``CorrectionSession`` per (volume, model, segmentation, segment): it holds the worker session id,
the target name the model tracks, the plane and slice range, and every prompt so far in order (the
box, then each click). Each run sends the prompts in full -- an interactive model recognises the ones
it has seen and applies only the new ones as corrections -- in the same worker session, so neither
the image nor its embedding are sent or computed again (the image goes again only when the worker
lost the session). The result replaces the segment's voxels inside the Segment Editor's editable
area and the run's slice range only (``slicer_bridge.write_in_editable_area``); each run is one undo
step that restores the voxels and takes its prompts (and their markups) back.

The view (``BiomedSegLib/correct.py`` in Slicer) places markups, calls ``add_box`` / ``add_point``
as they are placed (``True``: a result exists, so run ``update`` now), ``propagate`` / ``refine`` /
``undo`` from its buttons and keys, shows ``hint(ras)`` under the mouse, and polls the
``PanelController`` it shares (one run at a time; progress and Cancel as for any run).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace

import numpy as np

from .. import slicer_bridge
from ..catalog import get_model
from ..errors import InputError
from ..prompts import BoxPrompt, MaskPrompt, PointPrompt, ras_to_index
from .controller import PanelController
from .messages import PanelMessage, RunOutcome, device_label, format_seconds
from .request import build_request
from .state import PanelState

#: Tool -> what the panel calls it.
TOOLS = {"box": "Box", "include": "Include point", "exclude": "Exclude point"}
#: Action -> keys, active while the module is shown (none of Slicer's slice-view keys b, f, r, v, g, t;
#: the Segment Editor's own Z and I are installed only while the Segment Editor is shown).
SHORTCUTS = {"box": ["D"], "include": ["I"], "exclude": ["E"], "propagate": ["P"], "refine": ["M"],
             "undo": ["Z", "Ctrl+Z"]}
DEFAULT_NAME = "object"


def key_of(action: str) -> str:
    return SHORTCUTS[action][0]


def is_interactive(model_id: str) -> bool:
    """Whether the Correct section is shown for a model (its catalogue entry says ``interactive: true``)."""
    try:
        return get_model(model_id).interactive
    except InputError:
        return False


@dataclass
class Step:
    """One run that wrote: undo puts the voxels and the prompt list back and takes its markups away."""

    action: str  # propagated, corrected, refined
    prompts_before: list
    record: dict
    markups: list  # (markups node, control point ID, or None for the whole node)


@dataclass
class CorrectionSession:
    id: str
    model: str
    volume_node: object
    grid: object  # the volume's grid (a geometry-only Volume)
    plane: str
    target: str  # the name the model tracks; the segment's name when it was made
    segmentation_node: object = None
    segment_id: str = ""
    slice_range: tuple[int, int] | None = None
    prompts: list = field(default_factory=list)
    sent: int = 0  # prompts the last finished run had
    steps: list[Step] = field(default_factory=list)
    markups: list = field(default_factory=list)  # (prompt index, node, control point ID) not yet run
    #: ``slicer_bridge.image_stamp`` of the volume when its image was last sent to the worker session
    stamp: tuple = ()

    @property
    def axis(self) -> int:
        return self.grid.slice_orientation(self.plane).slice_axis

    @property
    def n_slices(self) -> int:
        return self.grid.shape[self.axis]

    @property
    def range(self) -> tuple[int, int]:
        return self.slice_range if self.slice_range is not None else (0, self.n_slices - 1)

    @property
    def has_result(self) -> bool:
        node = self.segmentation_node
        return bool(self.segment_id) and node is not None and node.GetScene() is not None and \
            node.GetSegmentation().GetSegment(self.segment_id) is not None

    @property
    def pending(self) -> int:
        """Prompts added since the last finished run."""
        return max(0, len(self.prompts) - self.sent)

    @property
    def name(self) -> str:
        if self.has_result:
            return self.segmentation_node.GetSegmentation().GetSegment(self.segment_id).GetName()
        return self.target

    def slice_of(self, ras) -> int:
        """The slice (array index along the plane's axis) an RAS point lies on; may be outside the image."""
        return int(np.floor(float(ras_to_index(self.grid, np.asarray(ras, float))[self.axis]) + 0.5))

    def conditioning(self) -> list[int]:
        """Slices that hold a box or a click (where the model is told what the object is)."""
        out = set()
        for p in self.prompts:
            if isinstance(p, BoxPrompt) and p.plane is not None:
                out.add(self.slice_of((np.asarray(p.ras_min) + np.asarray(p.ras_max)) / 2))
            elif isinstance(p, PointPrompt) and p.plane is not None:
                out.add(self.slice_of(p.ras))
        return sorted(out)

    def reach(self, s: int) -> tuple[int, int]:
        """The slices a click on slice ``s`` makes the model recompute: up to its neighbouring boxes and
        clicks, within the range (how MedSAM2 and the toy correct; the run's report says what it did)."""
        first, last = self.range
        below = [c for c in self.conditioning() if first <= c < s]
        above = [c for c in self.conditioning() if s < c <= last]
        return (below[-1] + 1 if below else first), (above[0] - 1 if above else last)


@dataclass
class CorrectionOutcome(RunOutcome):
    action: str = ""
    plane: str = "axial"
    slices: tuple[int, int] | None = None
    recomputed: int | None = None
    outside: int = 0
    erased: dict = field(default_factory=dict)  # segment name -> voxels the overwrite mode took
    ml_before: float = 0.0
    image_sent: bool = False

    @property
    def summary(self) -> str:
        if self.state != "done" or not self.names:
            return self.message.text if self.message else super().summary
        name = self.names[0]
        ml = self.volumes_ml.get(name, 0.0)
        where = f" over {self.plane} slices {self.slices[0]}-{self.slices[1]}" if self.slices else ""
        n = self.slices[1] - self.slices[0] + 1 if self.slices else None
        if self.action == "corrected":
            done = f"Corrected '{name}'"
            if self.recomputed is not None:
                done += f": {self.recomputed} of {n} slices recomputed" if n else f": {self.recomputed} slices recomputed"
            text = f"{done}, {ml:,.1f} mL ({ml - self.ml_before:+,.1f} mL)"
        elif self.action == "refined":
            text = f"Refined '{name}'{where}: {ml:,.1f} mL (was {self.ml_before:,.1f} mL)"
        else:
            text = f"Propagated '{name}'{where}: {ml:,.1f} mL"
        text += f" in {format_seconds(self.seconds)} on {device_label(self.device)}"
        text += "." if self.image_sent else "; the image stayed in the worker."
        if self.outside:
            text += f" {self.outside:,} voxels outside the Segment Editor's editable area were left as they were."
        if self.erased:
            text += " Erased from " + ", ".join(f"'{k}' ({v:,} voxels)" for k, v in self.erased.items()) + \
                    " (the editor's overwrite mode)."
        return text


class CorrectionController:
    """The correction workflow on a ``PanelController`` (its worker, its one run, its poll and cancel).

    ``rules``: the editable area and overwrite rules to write with; None reads the Segment Editor's own
    settings from the scene at each write (``slicer_bridge.editor_rules``).
    """

    def __init__(self, panel: PanelController, rules=None):
        self.panel = panel
        self.rules = rules
        self.sessions: dict[tuple, CorrectionSession] = {}
        self.current: CorrectionSession | None = None
        self.tool: str | None = None
        self._ids = itertools.count(1)

    # ---- sessions ----
    @staticmethod
    def key(volume_node, model: str, segmentation_node=None, segment_id: str | None = None) -> tuple:
        return (volume_node.GetID(), model, segmentation_node.GetID() if segmentation_node is not None else "",
                segment_id or "")

    def begin(self, state: PanelState, volume_node, segmentation_node=None, segment_id: str | None = None,
              name: str | None = None, slice_range: tuple[int, int] | None = None) -> CorrectionSession:
        """The session for (volume, model, segmentation, segment) -- made, not yet sent, when new -- as the current one.
        Without ``segment_id`` the first result becomes a new segment ``name``."""
        if volume_node is None:
            raise InputError("No input volume is selected.", hint="Choose a volume under Inputs.")
        entry = get_model(state.model)
        if not entry.interactive:
            raise InputError(f"Model '{state.model}' does not correct interactively.",
                             hint="Choose an interactive model (such as MedSAM2) to use the Correct tools.")
        if segment_id and (segmentation_node is None or segmentation_node.GetSegmentation().GetSegment(segment_id) is None):
            raise InputError(f"Segment '{segment_id}' is not in the chosen segmentation.", hint="Choose another one.")
        key = self.key(volume_node, state.model, segmentation_node if segment_id else None, segment_id)
        found = self.sessions.get(key)
        if found is None:
            target = name or DEFAULT_NAME
            if segment_id:
                target = segmentation_node.GetSegmentation().GetSegment(segment_id).GetName()
            found = CorrectionSession(f"correct-{next(self._ids)}", state.model, volume_node,
                                      slicer_bridge.grid_of(volume_node), state.slice_axis, target,
                                      segmentation_node if segment_id else None, segment_id or "")
            self.sessions[key] = found
        if segmentation_node is not None and not found.segment_id:
            found.segmentation_node = segmentation_node  # where the new segment goes
        if slice_range is not None:
            self.set_range(slice_range, found)
        self.current = found
        return found

    def set_range(self, slice_range: tuple[int, int] | None, session: CorrectionSession | None = None) -> None:
        s = session or self._need()
        if slice_range is not None:
            first, last = sorted(int(v) for v in slice_range)
            if not 0 <= first <= last < s.n_slices:
                raise InputError(f"Slices {first}-{last} are outside 0-{s.n_slices - 1} of the {s.plane} axis.",
                                 hint="Set the range within the volume.")
            slice_range = (first, last)
        s.slice_range = slice_range

    def _need(self) -> CorrectionSession:
        if self.current is None:
            raise InputError("Choose an input volume and an interactive model first.")
        return self.current

    def _rekey(self, s: CorrectionSession) -> None:
        for key in [k for k, v in self.sessions.items() if v is s]:
            del self.sessions[key]
        self.sessions[self.key(s.volume_node, s.model, s.segmentation_node if s.segment_id else None,
                               s.segment_id)] = s

    # ---- prompts ----
    def add_box(self, roi_node) -> bool:
        """A box drawn on a slice (a markups ROI); True when a result exists, so the view runs ``update`` now."""
        s = self._need()
        (box,) = slicer_bridge.prompts_from_markups(roi_node, target=s.target, plane=s.plane)
        return self._add(box, roi_node, None)

    def add_point(self, node, index: int, include: bool) -> bool:
        """Control point ``index`` of a point list, as an include or exclude click; True: run ``update`` now."""
        s = self._need()
        prompt = slicer_bridge.control_point_prompt(node, index, include, s.plane, s.target)
        return self._add(prompt, node, slicer_bridge.control_point_id(node, index))

    def add_prompt(self, prompt, node=None, point_id: str | None = None) -> bool:
        """A box or click in RAS (scripts and tests); its target becomes the session's."""
        s = self._need()
        if not isinstance(prompt, (BoxPrompt, PointPrompt)):
            raise InputError("Only boxes and clicks are added this way; Refine takes a segment.")
        return self._add(replace(prompt, target=s.target, plane=prompt.plane and s.plane), node, point_id)

    def _add(self, prompt, node, point_id) -> bool:
        s = self._need()
        ras = prompt.ras if isinstance(prompt, PointPrompt) else (np.asarray(prompt.ras_min) + prompt.ras_max) / 2
        index = ras_to_index(s.grid, np.asarray(ras, float))
        if np.any(index < -0.5) or np.any(index > np.asarray(s.grid.shape) - 0.5):
            raise InputError("That point lies outside the image.", hint="Click on the image.")
        s.prompts.append(prompt)
        s.markups.append((len(s.prompts) - 1, node, point_id))
        return s.has_result and not self.panel.running

    @property
    def needs_update(self) -> bool:
        """Prompts are waiting and a result exists to correct (the view runs ``update`` after a run ends)."""
        s = self.current
        return s is not None and s.pending > 0 and s.has_result and not self.panel.running

    # ---- runs ----
    def propagate(self, state: PanelState, slice_range: tuple[int, int] | None = None):
        """Segment the object the prompts point at over the slice range (all slices when None); returns the Job."""
        s = self._need()
        if slice_range is not None:
            self.set_range(slice_range)
        if not s.prompts:
            raise InputError("There is nothing to propagate yet.",
                             hint=f"Draw a box ({key_of('box')}) or click on the object ({key_of('include')}) first.")
        return self._submit(state, s, "propagated")

    def update(self, state: PanelState):
        """Run the new prompts as corrections, in the same session and range."""
        s = self._need()
        if not s.pending:
            raise InputError("There is no new click to apply.")
        return self._submit(state, s, "corrected" if s.has_result else "propagated")

    def refine(self, state: PanelState, volume_node, segmentation_node, segment_id: str,
               slice_range: tuple[int, int] | None = None):
        """An existing segment as the prompt (its mask as a MaskPrompt); the result replaces it (one undo step)."""
        if segmentation_node is None or not segment_id:
            raise InputError("Choose the segment to refine first.", hint="Pick it under Correct, Segment.")
        s = self.begin(state, volume_node, segmentation_node, segment_id, slice_range=slice_range)
        if slicer_bridge.is_segment_locked(segmentation_node, segment_id):
            raise InputError(f"Segment '{s.name}' is locked, so it cannot be refined.", hint="Unlock it first.")
        mask = slicer_bridge.segment_mask(segmentation_node, segment_id, s.grid)
        if not mask.any():
            raise InputError(f"Segment '{s.name}' is empty, so there is nothing to refine.",
                             hint="Draw a box or click on the object instead.")
        before = list(s.prompts)
        s.prompts = [MaskPrompt(mask, s.target)]
        s.sent = 0
        return self._submit(state, s, "refined", before)

    def _submit(self, state: PanelState, s: CorrectionSession, action: str, before: list | None = None):
        if self.panel.running:
            raise InputError("A segmentation is already running.",
                             hint="Wait for it or press Cancel; your clicks are kept and sent next.")
        if s.volume_node.GetScene() is None:
            raise InputError("The input volume of this correction was removed from the scene.")
        if s.segment_id and s.has_result and slicer_bridge.is_segment_locked(s.segmentation_node, s.segment_id):
            raise InputError(f"Segment '{s.name}' is locked, so BiomedSeg will not change it.",
                             hint="Unlock it, or start a new segment.")
        client = self.panel.client_for(state.worker_python, state)
        stamp = slicer_bridge.image_stamp(s.volume_node)
        if s.id in client.sessions and stamp != s.stamp:  # the voxels or the geometry changed: never correct
            client.close_session(s.id)                     # on the image the worker kept
            s.grid = slicer_bridge.grid_of(s.volume_node)
        send = s.id not in client.sessions
        if send:
            s.stamp = stamp
        volume = slicer_bridge.volume_from_node(s.volume_node, harden_transform=True) if send else s.grid
        run_state = replace(state, prompts=[], slice_axis=s.plane, slice_range=s.slice_range)
        request = build_request(run_state, volume, prompts=list(s.prompts))
        if any(isinstance(p, PointPrompt) and p.include for p in s.prompts) and request.kwargs["keep_largest"] is None:
            request.kwargs["keep_largest"] = False  # an include click on a separate part must not be dropped again
        sent = len(s.prompts)
        before = list(s.prompts[:s.sent]) if before is None else before
        apply = lambda result: self._apply(s, action, request, run_state, sent, before, send, result)  # noqa: E731

        def retry(error):  # the worker lost the session (restarted, or more sessions were opened): send the image
            if "is not open" not in getattr(error, "message", "") or request.volume is not s.grid:
                return None
            request.volume = slicer_bridge.volume_from_node(s.volume_node, harden_transform=True)
            self.panel.run.apply = lambda result: self._apply(s, action, request, run_state, sent, before, True, result)
            return client.submit(request.volume, request.model, request.prompts, session=s.id, **request.kwargs)

        return self.panel.submit(request, s.volume_node, s.segmentation_node, run_state, apply=apply, retry=retry,
                                 session=s.id, send_volume=send)

    def _apply(self, s: CorrectionSession, action: str, request, state: PanelState, sent: int, before: list,
               image_sent: bool, result) -> CorrectionOutcome:
        outcome = CorrectionOutcome("done", seconds=result.seconds, device=result.device, report=dict(result.report),
                                    action=action, plane=s.plane, slices=s.range, image_sent=image_sent,
                                    recomputed=_recomputed(result.report, s.target))
        found = next((seg for seg in result.segments if seg.name == s.target), None)
        if found is None and not s.has_result:
            s.sent = sent
            outcome.absent = [s.target]
            outcome.message = PanelMessage(f"The model found nothing for '{s.target}' on slices {s.range[0]}-"
                                           f"{s.range[1]}; nothing was written.",
                                           "absent")
            return outcome
        mask = found.mask if found is not None else np.zeros(s.grid.shape, bool)  # a correction may empty it
        node, created = s.segmentation_node, s.segmentation_node is None or s.segmentation_node.GetScene() is None
        if created:
            node = slicer_bridge.new_segmentation_node(self.panel.scene, f"{s.volume_node.GetName()} {s.model}",
                                                       s.volume_node)
        color, terminology = (0.9, 0.7, 0.2), None
        if not s.has_result and self.panel.terminology_lookup is not None:
            try:
                found_term = self.panel.terminology_lookup(s.target)
            except Exception:  # Slicer's lookup is a convenience, never a reason to lose a result
                found_term = None
            if found_term:
                terminology, color = found_term
        rules = self.rules if self.rules is not None else slicer_bridge.editor_rules(self.panel.scene)
        ml = float(abs(np.linalg.det(s.grid.ijk_to_ras[:3, :3]))) / 1000.0
        try:
            record = slicer_bridge.write_in_editable_area(
                node, s.volume_node, mask, segment_id=s.segment_id if s.has_result else None, name=s.target,
                color=color, terminology=terminology, region=request.region, rules=rules)
        except BaseException:
            if created:
                self.panel.scene.RemoveNode(node)
            raise
        s.segmentation_node, s.segment_id = node, record["segment_ids"][0]
        self._rekey(s)
        done = [m for m in s.markups if m[0] < sent]
        s.markups = [m for m in s.markups if m[0] >= sent]
        s.steps.append(Step(action, before, record, [(n, pid) for _, n, pid in done]))
        s.sent = sent
        slicer_bridge.show_segmentation(node, state.show_3d)
        outcome.segmentation_node, outcome.segment_ids, outcome.names = node, [s.segment_id], [s.name]
        outcome.voxels = {s.name: record["voxels"]}
        outcome.volumes_ml = {s.name: record["voxels"] * ml}
        outcome.ml_before = record["voxels_before"] * ml
        outcome.outside = record["outside"]
        outcome.erased = {node.GetSegmentation().GetSegment(k).GetName(): v for k, v in record["erased"].items()}
        return outcome

    # ---- undo ----
    @property
    def can_undo(self) -> bool:
        s = self.current
        return s is not None and (s.pending > 0 or bool(s.steps))

    def undo(self) -> str:
        """Undo the last correction: a click not sent yet, else the last run (voxels exact, its prompts and
        markups taken back). Returns what was undone, for the status line."""
        s = self.current
        if s is None or not self.can_undo:
            raise InputError("There is no correction to undo.")
        if self.panel.running:
            raise InputError("A correction is running.", hint="Wait for it or press Cancel first.")
        if s.pending:
            index = len(s.prompts) - 1
            prompt = s.prompts.pop()
            for m in [m for m in s.markups if m[0] == index]:
                slicer_bridge.remove_markup(m[1], m[2])
                s.markups.remove(m)
            return f"Removed the last {_what(prompt)} (it was not sent yet)."
        step = s.steps[-1]
        node = s.segmentation_node
        if node is None or node.GetScene() is None:
            s.steps.clear()
            raise InputError("The segmentation of this correction was deleted, so it cannot be undone.")
        name = s.name
        slicer_bridge.undo_segments(node, step.record)
        s.steps.pop()
        for markup_node, point_id in step.markups:
            slicer_bridge.remove_markup(markup_node, point_id)
        s.prompts, s.sent = list(step.prompts_before), len(step.prompts_before)
        s.markups = [m for m in s.markups if m[0] < len(s.prompts)]
        if step.record["prior"].get(s.segment_id, 0) is None:  # the step made the segment
            s.segment_id = ""
            self._rekey(s)
        noun = {"propagated": "propagation", "refined": "refinement"}.get(step.action, "correction")
        return f"Undone: the last {noun} of '{name}'; its voxels and clicks are as before."

    # ---- what the next click does ----
    def set_tool(self, tool: str | None) -> None:
        if tool is not None and tool not in TOOLS:
            raise InputError(f"Unknown tool '{tool}'; use {', '.join(TOOLS)}.")
        self.tool = tool

    def hint(self, ras=None) -> str:
        """What the next click of the current tool will do -- on the slice under ``ras`` (the mouse) when given."""
        s, tool = self.current, self.tool
        if tool is None:
            if s is None or (not s.prompts and not s.has_result):
                return (f"Choose a tool: Box ({key_of('box')}), Include point ({key_of('include')}) or Exclude point "
                        f"({key_of('exclude')}); then click on a slice.")
            first, last = s.range
            if not s.has_result:
                return f"{len(s.prompts)} prompt(s) for '{s.name}'; Propagate ({key_of('propagate')}) segments " \
                       f"{s.plane} slices {first}-{last}."
            return f"'{s.name}': Include ({key_of('include')}) or Exclude ({key_of('exclude')}) clicks correct it; " \
                   "each recomputes only the slices it reaches."
        label = f"{TOOLS[tool]} ({key_of(tool)})"
        if s is None:
            return f"{label}: choose an input volume and an interactive model first."
        first, last = s.range
        where, sl = f"{label} on any {s.plane} slice", None
        if ras is not None:
            index = ras_to_index(s.grid, np.asarray(ras, float))
            if np.any(index < -0.5) or np.any(index > np.asarray(s.grid.shape) - 0.5):
                return f"{label}: outside the image."
            sl = s.slice_of(ras)
            if not first <= sl <= last:
                return (f"{TOOLS[tool]} on slice {sl} ({s.plane}): outside slices {first}-{last}; widen the range and "
                        f"Propagate ({key_of('propagate')}) to reach it.")
            where = f"{TOOLS[tool]} on slice {sl} ({s.plane})"
        if not s.has_result:
            what = {"box": "outlines", "include": "marks", "exclude": "marks the background of"}[tool]
            new = "the new segment " if not s.segment_id else ""
            return (f"{where}: {what} {new}'{s.name}'; Propagate ({key_of('propagate')}) then segments slices "
                    f"{first}-{last}.")
        if tool == "box":
            return f"{where}: redraws '{s.name}' from its boxes and clicks and recomputes slices {first}-{last}."
        verb = "adds to" if tool == "include" else "removes from"
        if sl is None:
            return f"{where}: {verb} '{s.name}' and recomputes the slices up to its neighbouring boxes and clicks."
        lo, hi = s.reach(sl)
        return f"{where}: {verb} '{s.name}' and recomputes slices {lo}-{hi}."

    # ---- ending ----
    def clear(self) -> None:
        """Start over on the current segment: its prompts and markups go, the worker forgets the session;
        what was written stays (undo it first to take it back)."""
        s = self.current
        if s is None:
            return
        for _, node, point_id in s.markups:
            slicer_bridge.remove_markup(node, point_id)
        for step in s.steps:
            for node, point_id in step.markups:
                slicer_bridge.remove_markup(node, point_id)
        self._close(s)
        for key in [k for k, v in self.sessions.items() if v is s]:
            del self.sessions[key]
        self.current = None

    def _close(self, s: CorrectionSession) -> None:
        client = self.panel._client
        if client is not None and s.id in client.sessions:
            try:
                client.close_session(s.id)
            except Exception:  # a worker that went away has forgotten it already
                pass

    def forget(self) -> None:
        """The scene is closing: every session and undo step goes (their nodes go with the scene)."""
        for s in list(self.sessions.values()):
            self._close(s)
        self.sessions.clear()
        self.current = None


def _recomputed(report: dict, target: str) -> int | None:
    """Slices the model says it recomputed for ``target`` (MedSAM2 and the toy report it per target)."""
    found = (report.get("targets") or {}).get(target) if isinstance(report.get("targets"), dict) else None
    value = found.get("recomputed_frames") if isinstance(found, dict) else None
    if isinstance(value, (list, tuple, set)):
        return len(value)
    return int(value) if isinstance(value, (int, np.integer)) and not isinstance(value, bool) else None


def _what(prompt) -> str:
    if isinstance(prompt, BoxPrompt):
        return "box"
    if isinstance(prompt, PointPrompt):
        return "include point" if prompt.include else "exclude point"
    return "prompt"


__all__ = ["TOOLS", "SHORTCUTS", "CorrectionController", "CorrectionSession", "CorrectionOutcome", "Step", "key_of",
           "is_interactive"]
