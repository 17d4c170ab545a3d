"""The Correct section's workflows through the panel logic, a real MRML scene and the real worker,
with the interactive toy model (Testing/toy_models/click_session), as MedSAM2 will run them:

1. a box on one slice, then Propagate over a slice range: one segment;
2. Refine an existing segment (its mask as the prompt): the segment is refined, the others keep
   every voxel (except what Slicer's overwrite mode erases; never a locked one);
3. corrections after propagation in the same worker session: no image sent, no new embedding, only
   the slices between the click's neighbouring prompts recomputed (as the hint said beforehand),
   and the result equals a fresh run with all the prompts;
4. progress and Cancel during a propagation (nothing written, the clicks kept);
plus undo (exact previous voxels, clicks and markups taken back) and each editable-area mode.
"""
from __future__ import annotations

import shutil
import time

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")

from biomedseg import slicer_bridge as sb  # noqa: E402
from biomedseg.errors import InputError  # noqa: E402
from biomedseg.panel import SHORTCUTS, CorrectionController, PanelController, PanelState  # noqa: E402
from biomedseg.prompts import BoxPrompt, PointPrompt  # noqa: E402
from conftest import mrml_scene, registered_models  # noqa: E402

from correction_cases import MODEL, RANGE, SHAPE, TOY, click, disc, phantom, ras, rect, roi  # noqa: E402


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """One worker for the module with the toy registered as a site model ($BIOMEDSEG_EXTRA_MODELS)."""
    from biomedseg.worker.client import WorkerClient

    root = tmp_path_factory.mktemp("site_models")
    shutil.copytree(TOY, root / TOY.name, ignore=shutil.ignore_patterns("__pycache__"))
    with registered_models(root):
        worker = WorkerClient()
        yield worker
        worker.close()


@pytest.fixture
def setup(client):
    with mrml_scene() as scene:
        volume = phantom()
        node = sb.node_from_volume(scene, volume, volume.name)
        panel = PanelController(scene, client=client)
        yield scene, volume, node, panel, CorrectionController(panel)


def state(**options) -> PanelState:
    return PanelState(model=MODEL, prompts=[], show_3d=False, options=options)


def run(panel, timeout=60):
    outcome = panel.wait(timeout=timeout)
    assert outcome.state == "done", outcome.summary
    return outcome


def mask_of(corr, node):
    s = corr.current
    return sb.segment_mask(s.segmentation_node, s.segment_id, node)


def test_box_then_propagate_gives_one_segment_then_clicks_recompute_only_what_they_reach(setup, client):
    scene, volume, node, panel, corr = setup
    assert volume.slice_orientation("axial").slice_axis == 0
    corr.begin(state(), node, slice_range=RANGE)
    corr.set_tool("box")
    assert corr.hint() == ("Box (D) on any axial slice: outlines the new segment 'object'; Propagate (P) then "
                           "segments slices 5-24.")
    assert corr.add_box(roi(scene, volume)) is False  # no result yet: Propagate runs it
    job = corr.propagate(state())
    assert job.volume is not None  # the first run sends the image and opens the session
    first = run(panel)
    assert first.action == "propagated" and first.names == ["object"] and first.image_sent
    seg = first.segmentation_node
    assert seg.GetSegmentation().GetNumberOfSegments() == 1
    bright = volume.array > 0
    propagated = bright & rect()  # organ + leak on slices 5-24, not the missed part
    assert np.array_equal(mask_of(corr, node), propagated)
    assert first.summary.startswith("Propagated 'object' over axial slices 5-24: ")
    embeddings = first.report["embeddings"]

    # (3) an exclude click on the leak (slice 20): the hint says what it will recompute, and it does
    exclude = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "exclude")
    corr.set_tool("exclude")
    assert corr.hint(ras(volume, 20, 27, 17)) == ("Exclude point on slice 20 (axial): removes from 'object' and "
                                                  "recomputes slices 16-24.")
    assert corr.add_point(exclude, click(exclude, volume, 20, 27, 17), include=False) is True
    job = corr.update(state())
    assert job.volume is None  # same worker session: no voxels sent
    second = run(panel)
    assert second.report["embeddings"] == embeddings and second.report["session_runs"] == 2
    assert second.recomputed == 9 and not second.image_sent
    assert second.summary.startswith("Corrected 'object': 9 of 20 slices recomputed, ")
    corrected = propagated & ~disc(volume, range(16, 25), 27, 17)
    assert np.array_equal(mask_of(corr, node), corrected)
    after_exclude = mask_of(corr, node)

    # an include click on the missed part (slice 8), outside the box: slices 5-14 recomputed
    include = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "include")
    corr.set_tool("include")
    assert corr.hint(ras(volume, 8, 12, 32)).endswith("adds to 'object' and recomputes slices 5-14.")
    assert corr.add_point(include, click(include, volume, 8, 12, 32), include=True)
    corr.update(state())
    third = run(panel)
    assert third.recomputed == 10 and third.report["embeddings"] == embeddings
    added = disc(volume, range(5, 15), 12, 32)
    assert np.array_equal(mask_of(corr, node), corrected | added)
    # partial recomputation gives what a fresh session computes from all the prompts
    fresh = client.run(volume, "toy-click-session", corr.current.prompts, region=_region(), session="fresh",
                       timeout=60)
    assert np.array_equal(fresh.segments[0].mask, mask_of(corr, node))
    assert fresh.report["targets"]["object"]["how"] == "propagated"
    client.close_session("fresh")

    # undo: exact previous voxels each step, and the click and its markup taken back
    assert corr.undo().startswith("Undone: the last correction of 'object'")
    assert np.array_equal(mask_of(corr, node), after_exclude) and include.GetNumberOfControlPoints() == 0
    assert len(corr.current.prompts) == 2
    corr.undo()
    assert np.array_equal(mask_of(corr, node), propagated) and exclude.GetNumberOfControlPoints() == 0
    corr.undo()  # the propagation: the segment it made goes, and its box
    assert seg.GetSegmentation().GetNumberOfSegments() == 0 and not corr.can_undo
    assert corr.current.prompts == [] and scene.GetNodesByClass("vtkMRMLMarkupsROINode").GetNumberOfItems() == 0
    with pytest.raises(InputError, match="no correction to undo"):
        corr.undo()


def _region():
    from biomedseg.geometry import make_region

    return make_region("axial", RANGE)


def test_refine_an_existing_segment_keeps_the_others_and_corrects_in_the_same_session(setup):
    scene, volume, node, panel, corr = setup
    seg = sb.new_segmentation_node(scene, "BiomedParse result", node)
    rough = np.zeros(SHAPE, bool)
    rough[3:27, 8:27, 8:27] = True  # a predicted liver that spills into the background
    kidney = np.zeros(SHAPE, bool)
    kidney[2:9, 30:38, 2:8] = True
    portal = np.zeros(SHAPE, bool)
    portal[12:16, 5:12, 15:20] = True  # overlaps the liver (its own layer)
    tumour = np.zeros(SHAPE, bool)
    tumour[14:18, 12:16, 12:16] = True  # inside the liver, locked
    ids = {name: sb.write_segments(seg, node, {name: m})["segment_ids"][0]
           for name, m in (("liver", rough), ("kidney", kidney), ("portal", portal), ("tumour", tumour))}
    sb.set_segment_locked(seg, ids["tumour"])
    before = {n: sb.segment_mask(seg, i, node) for n, i in ids.items()}

    corr.refine(state(), node, seg, ids["liver"])
    assert type(corr.current.prompts[0]).__name__ == "MaskPrompt" and corr.current.segment_id == ids["liver"]
    outcome = run(panel)
    refined = rough & (volume.array > 0)
    assert outcome.action == "refined" and outcome.names == ["liver"] and outcome.segment_ids == [ids["liver"]]
    assert np.array_equal(sb.segment_mask(seg, ids["liver"], node), refined)
    assert outcome.summary.startswith("Refined 'liver' over axial slices 0-29: ")
    assert np.array_equal(sb.segment_mask(seg, ids["kidney"], node), kidney)  # bit-identical
    assert np.array_equal(sb.segment_mask(seg, ids["tumour"], node), tumour)  # locked: never erased
    # the default overwrite mode (Slicer's: all segments) takes the refined voxels from the portal vein
    assert np.array_equal(sb.segment_mask(seg, ids["portal"], node), portal & ~refined)
    assert outcome.erased == {"portal": int((portal & refined).sum())} and "Erased from 'portal'" in outcome.summary
    assert seg.GetSegmentation().GetNumberOfSegments() == 4
    embeddings = outcome.report["embeddings"]

    # a click in the same session: no image, no new embedding
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "exclude")
    assert corr.add_point(points, click(points, volume, 20, 27, 17), include=False)
    job = corr.update(state())
    assert job.volume is None
    second = run(panel)
    assert second.report["embeddings"] == embeddings and second.recomputed == 30  # no other click: every slice
    assert np.array_equal(sb.segment_mask(seg, ids["liver"], node),
                          refined & ~disc(volume, range(0, 30), 27, 17))
    corr.undo()
    corr.undo()
    for name, sid in ids.items():  # two undos: exactly the scene before the refinement
        assert np.array_equal(sb.segment_mask(seg, sid, node), before[name]), name
    # a locked segment cannot be the one refined
    with pytest.raises(InputError, match="locked"):
        corr.refine(state(), node, seg, ids["tumour"])


MODES = [(m, "OverwriteAllSegments") for m in sb.editable.MASK_MODES] + \
        [("EditAllowedEverywhere", "OverwriteVisibleSegments"), ("EditAllowedEverywhere", "OverwriteNone")]


@pytest.mark.parametrize("mode,overwrite", MODES, ids=[f"{m[11:]}-{o[9:]}" for m, o in MODES])
def test_the_segment_editor_masking_is_respected_by_every_propagation(setup, mode, overwrite):
    scene, volume, node, panel, corr = setup
    seg = sb.new_segmentation_node(scene, "seg", node)
    parts = {"A": (slice(8, 17), slice(5, 20), slice(5, 20)), "B": (slice(12, 22), slice(15, 35), slice(12, 30)),
             "H": (slice(0, 30), slice(26, 40), slice(0, 40)), "L": (slice(14, 20), slice(14, 20), slice(14, 20))}
    masks = {}
    for name, where in parts.items():
        masks[name] = np.zeros(SHAPE, bool)
        masks[name][where] = True
    ids = {n: sb.write_segments(seg, node, {n: m})["segment_ids"][0] for n, m in masks.items()}
    seg.GetDisplayNode().SetSegmentVisibility(ids["H"], False)
    sb.set_segment_locked(seg, ids["L"])
    editor = slicer.vtkMRMLSegmentEditorNode()
    editor.SetSingletonTag("SegmentEditor")
    scene.AddNode(editor)
    intensity = (850.0, 2000.0) if mode == "EditAllowedEverywhere" and overwrite == "OverwriteAllSegments" else None
    sb.apply_rules(editor, sb.EditRules(mode, ids["B"] if mode.endswith("SingleSegment") else "", intensity, node,
                                        overwrite))

    corr.begin(state(), node, seg, slice_range=RANGE)
    corr.add_box(roi(scene, volume))
    corr.propagate(state())
    outcome = run(panel)
    visible = [n for n in masks if n != "H"]
    area = {"EditAllowedEverywhere": np.ones(SHAPE, bool),
            "EditAllowedInsideAllSegments": np.any([masks[n] for n in masks], axis=0),
            "EditAllowedInsideVisibleSegments": np.any([masks[n] for n in visible], axis=0),
            "EditAllowedOutsideAllSegments": ~np.any([masks[n] for n in masks], axis=0),
            "EditAllowedOutsideVisibleSegments": ~np.any([masks[n] for n in visible], axis=0),
            "EditAllowedInsideSingleSegment": masks["B"]}[mode]
    if intensity is not None:
        area = area & (volume.array >= 850)
    written = (volume.array > 0) & rect() & area
    assert np.array_equal(mask_of(corr, node), written)
    erasable = {"OverwriteAllSegments": {"A", "B", "H"}, "OverwriteVisibleSegments": {"A", "B"},
                "OverwriteNone": set()}[overwrite]
    for name, m in masks.items():
        want = m & ~written if name in erasable else m
        assert np.array_equal(sb.segment_mask(seg, ids[name], node), want), name
    assert outcome.outside == int(((volume.array > 0) & rect() & ~area).sum())
    corr.undo()
    for name, m in masks.items():
        assert np.array_equal(sb.segment_mask(seg, ids[name], node), m), name


def test_progress_and_cancel_during_propagation_write_nothing_and_keep_the_clicks(setup):
    scene, volume, node, panel, corr = setup
    slow = state(delay=0.05)
    corr.begin(slow, node, slice_range=(0, 29))
    corr.add_box(roi(scene, volume))
    corr.propagate(slow)
    seen = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        result = panel.poll()
        assert not result.finished, result.outcome and result.outcome.summary
        if result.progress.percent and result.progress.text.startswith("Frames ("):
            seen.append(result.progress)
            if len(seen) >= 2:
                break
        time.sleep(0.01)
    assert seen and 0 < seen[-1].percent < 100
    panel.cancel()
    outcome = panel.wait(timeout=30)
    assert outcome.state == "cancelled" and outcome.summary == "Cancelled; nothing was changed."
    assert scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems() == 0
    assert len(corr.current.prompts) == 1 and corr.current.pending == 1  # the box is kept for the next run
    corr.propagate(slow)
    first = run(panel)
    assert first.names == ["object"]
    # a correction cancelled half-way leaves the segment as it was; the next update applies the click
    before = mask_of(corr, node)
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "include")
    corr.add_point(points, click(points, volume, 8, 12, 32), include=True)
    corr.update(slow)
    while not panel.poll().progress.percent:
        time.sleep(0.01)
    panel.cancel()
    assert panel.wait(timeout=30).state == "cancelled"
    assert np.array_equal(mask_of(corr, node), before) and corr.needs_update
    corr.update(slow)
    again = run(panel)
    assert again.report["embeddings"] == first.report["embeddings"]  # the session outlived the cancel
    assert np.array_equal(mask_of(corr, node), before | disc(volume, range(0, 15), 12, 32))


def test_hints_shortcuts_and_refusals(setup):
    scene, volume, node, panel, corr = setup
    assert corr.hint().startswith("Choose a tool: Box (D), Include point (I) or Exclude point (E)")
    with pytest.raises(InputError, match="does not correct interactively"):
        corr.begin(PanelState(model="deepbet"), node)
    corr.begin(state(), node, slice_range=RANGE)
    with pytest.raises(InputError, match="nothing to propagate"):
        corr.propagate(state())
    corr.set_tool("include")
    assert corr.hint(ras(volume, 27, 20, 20)) == ("Include point on slice 27 (axial): outside slices 5-24; widen "
                                                  "the range and Propagate (P) to reach it.")
    assert corr.hint((1e4, 0.0, 0.0)) == "Include point (I): outside the image."
    with pytest.raises(InputError, match="outside the image"):
        corr.add_prompt(PointPrompt((1e4, 0.0, 0.0), True, "axial"))
    with pytest.raises(InputError, match="outside 0-29"):
        corr.set_range((3, 30))
    corr.add_prompt(BoxPrompt(ras(volume, 15, 8, 8), ras(volume, 15, 30, 27), "axial"))
    assert corr.current.prompts[0].target == "object"
    assert corr.undo() == "Removed the last box (it was not sent yet)."
    # the keys: none of Slicer's slice-view keys (b, f, r, v, g, t) and undo as in the Segment Editor
    keys = {k for ks in SHORTCUTS.values() for k in ks}
    assert keys == {"D", "I", "E", "P", "M", "Z", "Ctrl+Z"} and not keys & {"B", "F", "R", "V", "G", "T"}


def test_a_session_the_worker_lost_is_reopened_with_the_image_and_start_over_forgets_it(setup, client):
    scene, volume, node, panel, corr = setup
    corr.begin(state(), node, slice_range=RANGE)
    corr.add_box(roi(scene, volume))
    corr.propagate(state())
    first = run(panel)
    sid = corr.current.id
    assert client.request("close_session", session=sid)["found"]  # evicted behind the panel's back
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "exclude")
    corr.add_point(points, click(points, volume, 20, 27, 17), include=False)
    assert corr.update(state()).volume is None  # the panel still thinks the worker has the image
    again = run(panel)  # the worker says it has not: the panel sends the image and runs the same prompts
    assert again.image_sent and again.report["embeddings"] == first.report["embeddings"] + 1
    assert np.array_equal(mask_of(corr, node), (volume.array > 0) & rect() & ~disc(volume, range(16, 25), 27, 17))
    assert sid in client.sessions
    corr.clear()  # start over: prompts, markups and the worker's session go; the segment stays
    assert corr.current is None and sid not in client.sessions and points.GetNumberOfControlPoints() == 0
    assert scene.GetNodesByClass("vtkMRMLMarkupsROINode").GetNumberOfItems() == 0
    assert first.segmentation_node.GetSegmentation().GetNumberOfSegments() == 1
    corr.begin(state(), node)
    corr.forget()
    assert corr.sessions == {} and corr.current is None


def test_a_click_after_the_image_changed_sends_the_new_image_instead_of_correcting_the_old_one(setup, client):
    from vtk.util.numpy_support import vtk_to_numpy

    scene, volume, node, panel, corr = setup
    corr.begin(state(), node, slice_range=RANGE)
    corr.add_box(roi(scene, volume))
    corr.propagate(state())
    first = run(panel)
    assert first.image_sent
    voxels = vtk_to_numpy(node.GetImageData().GetPointData().GetScalars())  # a view of the node's voxels
    voxels[:] = 0  # the image is edited (or reloaded) behind the session's back
    node.GetImageData().Modified()
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "exclude")
    corr.add_point(points, click(points, volume, 20, 27, 17), include=False)
    job = corr.update(state())
    assert job.volume is not None  # the new image goes, the worker's stale one is dropped
    outcome = panel.wait(timeout=60)
    assert outcome.image_sent
    # the toy segments bright voxels: on the all-dark new image nothing is left of the old result
    assert outcome.state == "done" and outcome.recomputed == 20 and not mask_of(corr, node).any()
