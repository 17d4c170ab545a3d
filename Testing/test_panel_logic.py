"""The panel's logic driven the way BiomedSeg.py drives it, on real MRML classes (slicer-core)
and a real worker process: submit, poll from a "timer", apply, undo, cancel, export.

One deepbet run on the Colin27 T1 MRI (the offline default model, ~5-10 s on 2 CPU cores)
checks the named segment, its terminology, Dice against the BET mask, that polling never
blocks, and that the result is shown in 3D. The controllable test backend
(Testing/worker_models) checks add / overwrite / undo against pre-existing segments
bit for bit, cancel mid-run, absent targets, ROI and slice-range crops, failures, exports
(labelmap node, .seg.nrrd, NIfTI, DICOM SEG), the model list, guesses and the panel's words.
The first-run installs are in Testing/test_panel_install.py.
"""
from __future__ import annotations

import sys
import time

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")

from biomedseg import panel  # noqa: E402
from biomedseg import slicer_bridge as sb  # noqa: E402
from biomedseg.catalog import get_model  # noqa: E402
from biomedseg.errors import InputError  # noqa: E402
from biomedseg.io import read_volume  # noqa: E402
from biomedseg.segments import Segment  # noqa: E402
from biomedseg.volume import Volume  # noqa: E402
from biomedseg.worker.client import WorkerClient  # noqa: E402
from conftest import mrml_scene, worker_test_models  # noqa: E402

POLL_S = 0.1  # the panel's QTimer interval


@pytest.fixture(scope="module", autouse=True)
def test_models():
    with worker_test_models():
        yield


@pytest.fixture(scope="module")
def client():
    c = WorkerClient(cancel_grace=3.0)
    yield c
    c.close()


@pytest.fixture
def scene():
    with mrml_scene() as s:
        yield s


def drive(controller: panel.PanelController, timeout: float = 120.0):
    """What the panel's QTimer does: poll every 100 ms until the run ends; returns (outcome, progresses, poll times)."""
    progresses, poll_times = [], []
    deadline = time.monotonic() + timeout
    while True:
        t0 = time.perf_counter()
        result = controller.poll()
        elapsed = time.perf_counter() - t0
        if result.finished:
            return result.outcome, progresses, poll_times
        poll_times.append(elapsed)
        progresses.append(result.progress)
        assert time.monotonic() < deadline, "run did not finish"
        time.sleep(POLL_S)


# ---- the offline default model on a real MRI ---------------------------------------------------

@pytest.fixture(scope="module")
def deepbet_run(colin_path, colin_bet_path, client):
    """deepbet on Colin27 through the worker, driven like the widget; run once for the module."""
    with mrml_scene() as scene:
        volume = read_volume(colin_path)
        node = sb.node_from_volume(scene, volume, "ch2")
        controller = panel.PanelController(scene, client=client)
        info = controller.describe_volume(node)
        state = panel.state_for_guess("deepbet", ["brain"], info["guess"])
        nodes_before = scene.GetNumberOfNodes()
        t0 = time.monotonic()
        job = controller.start(state, node)
        submit_s = time.monotonic() - t0
        outcome, progresses, poll_times = drive(controller)
        reference = read_volume(colin_bet_path)
        yield dict(scene=scene, node=node, controller=controller, info=info, state=state, job=job, outcome=outcome,
                   progresses=progresses, poll_times=poll_times, submit_s=submit_s, bet=reference.array > 0,
                   nodes_before=nodes_before)


def test_deepbet_guess_matches_the_model(deepbet_run):
    guess = deepbet_run["info"]["guess"]
    assert (guess.modality, guess.site) == ("MRI", "head")
    assert deepbet_run["state"].modality == "MRI-T1" and deepbet_run["state"].site == "head"
    assert panel.suggestions("deepbet", "MRI-T1", "head") == ["brain"]
    assert deepbet_run["info"]["slices"] == {"axial": 181, "coronal": 217, "sagittal": 181}


def test_deepbet_brain_segment_named_with_terminology_and_accurate(deepbet_run):
    outcome = deepbet_run["outcome"]
    assert outcome.state == "done", outcome.summary
    assert outcome.names == ["brain"] and outcome.absent == []
    node = outcome.segmentation_node
    assert node.GetScene() is deepbet_run["scene"] and node.GetName() == "ch2 deepbet"
    (info,) = sb.segments_of(node)
    assert info["name"] == "brain"
    assert info["terminology"]["type"] == ["SCT", "12738006", "Brain"]
    assert info["terminology"]["category"][2] == "Anatomical Structure"
    mask = sb.segment_mask(node, info["id"], deepbet_run["node"])
    bet = deepbet_run["bet"]
    dice = 2 * np.logical_and(mask, bet).sum() / (mask.sum() + bet.sum())
    assert dice >= 0.9, dice
    assert outcome.voxels["brain"] == int(mask.sum())
    assert "Added brain" in outcome.summary and "mL" in outcome.summary


def test_deepbet_progress_and_responsive_polling(deepbet_run):
    progresses, poll_times = deepbet_run["progresses"], deepbet_run["poll_times"]
    assert deepbet_run["submit_s"] < 2.0  # submit copies the volume and returns; the model runs elsewhere
    percents = [p.percent for p in progresses if p.percent is not None]
    assert percents and percents == sorted(percents) and max(percents) <= 100
    assert any("left" in p.text for p in progresses), [p.text for p in progresses]
    assert any(p.percent is None and "worker" in p.text for p in progresses)  # busy while the model loads
    # A QTimer callback must never freeze Slicer: every poll while the model runs returns at once.
    assert max(poll_times) < 0.05, max(poll_times)


def test_deepbet_result_shown_in_views_and_3d(deepbet_run):
    node = deepbet_run["outcome"].segmentation_node
    display = node.GetDisplayNode()
    assert display.GetVisibility() and display.GetVisibility2D() and display.GetVisibility3D()
    assert node.GetSegmentation().ContainsRepresentation("Closed surface")


def test_deepbet_export_labelmap_then_undo(deepbet_run):
    controller, node = deepbet_run["controller"], deepbet_run["node"]
    seg_node = deepbet_run["outcome"].segmentation_node
    labelmap = controller.export_labelmap(seg_node, node)
    from vtkmodules.util.numpy_support import vtk_to_numpy

    array = vtk_to_numpy(labelmap.GetImageData().GetPointData().GetScalars()).reshape(node.GetImageData().GetDimensions()[::-1])
    (info,) = sb.segments_of(seg_node)
    assert np.array_equal(array > 0, sb.segment_mask(seg_node, info["id"], node))
    assert controller.undo_last() == ["brain"]
    assert seg_node.GetSegmentation().GetNumberOfSegments() == 0
    assert not controller.can_undo


# ---- add / overwrite / undo / cancel with the controllable backend ------------------------------

def small_volume(shape=(12, 14, 16), seed=0) -> Volume:
    rng = np.random.default_rng(seed)
    m = np.array([[0, 0, -1.3, 8.1], [1.1, 0, 0, -7.3], [0, -0.9, 0, 5.2], [0, 0, 0, 1]], float)
    return Volume(rng.integers(-1000, 1000, shape, dtype=np.int16), m, name="small")


def expected_sphere(volume, centre, radius):
    ras = volume.ras_of_voxels()
    return (np.linalg.norm(ras - np.asarray(centre), axis=-1) < radius) & (ras[..., 0] > 0)


def snapshot(seg_node, reference) -> dict:
    """Every segment's own voxels on the reference grid and all its metadata (terminology tag too), keyed by ID."""
    segmentation = seg_node.GetSegmentation()
    out = {}
    for info in sb.segments_of(seg_node):
        segment = segmentation.GetSegment(info["id"])
        out[info["id"]] = dict(info, mask=sb.segment_mask(seg_node, info["id"], reference),
                               tag=sb.segment_tag(segment, sb.terminology_tag_name()))
    return out


def assert_same(before: dict, after: dict, ids=None):
    ids = list(before) if ids is None else ids
    for segment_id in ids:
        a, b = before[segment_id], after[segment_id]
        for key in ("name", "color", "terminology", "tag"):
            assert a[key] == b[key], (segment_id, key, a[key], b[key])
        # Voxel for voxel on the reference grid (the stored layer may be shared, so its extent can change).
        assert a["mask"].dtype == b["mask"].dtype and np.array_equal(a["mask"], b["mask"]), segment_id


@pytest.fixture
def populated(scene):
    """A volume and a segmentation that already holds three segments (one named like the prompt)."""
    volume = small_volume()
    node = sb.node_from_volume(scene, volume, "small")
    seg_node = sb.new_segmentation_node(scene, "existing", node)
    rng = np.random.default_rng(3)
    owner = rng.integers(0, 4, volume.shape)
    sb.write_segments(seg_node, node, [Segment("target", owner == 1), Segment("liver", owner == 2),
                                       Segment("drawn by hand", (owner == 3) | (rng.random(volume.shape) > 0.8),
                                               (0.2, 0.4, 0.6))])
    return dict(scene=scene, volume=volume, node=node, seg_node=seg_node, before=snapshot(seg_node, node))


SPHERE = {"centre": [1.0, -0.5, 0.5], "radius": 5.0}


def run_test_model(scene, client, node, seg_node=None, prompts=("target",), roi=None, **state):
    controller = panel.PanelController(scene, client=client)
    options = dict(SPHERE, **state.pop("options", {}))
    controller.start(panel.PanelState(model="test-model", prompts=list(prompts), options=options, show_3d=False,
                                   **state), node, seg_node, roi)
    outcome, progresses, _ = drive(controller)
    return controller, outcome, progresses


def test_add_keeps_other_segments_bit_identical_and_undo_restores_all(populated, client):
    p = populated
    controller, outcome, _ = run_test_model(p["scene"], client, p["node"], p["seg_node"])
    assert outcome.state == "done" and outcome.names == ["target 2"], outcome.summary
    after = snapshot(p["seg_node"], p["node"])
    assert_same(p["before"], after)  # every pre-existing segment untouched
    (new_id,) = outcome.segment_ids
    assert np.array_equal(after[new_id]["mask"], expected_sphere(p["volume"], SPHERE["centre"], SPHERE["radius"]))
    controller.undo_last()
    restored = snapshot(p["seg_node"], p["node"])
    assert set(restored) == set(p["before"])
    assert_same(p["before"], restored)


def test_overwrite_replaces_same_name_only_and_undo_restores_exactly(populated, client):
    p = populated
    controller, outcome, _ = run_test_model(p["scene"], client, p["node"], p["seg_node"],
                                            write_mode="overwrite segments of the same name")
    assert outcome.state == "done" and outcome.names == ["target"], outcome.summary
    target_id = p["seg_node"].GetSegmentation().GetSegmentIdBySegmentName("target")
    assert outcome.segment_ids == [target_id]
    after = snapshot(p["seg_node"], p["node"])
    others = [i for i in p["before"] if i != target_id]
    assert_same(p["before"], after, others)
    assert np.array_equal(after[target_id]["mask"], expected_sphere(p["volume"], SPHERE["centre"], SPHERE["radius"]))
    controller.undo_last()
    assert_same(p["before"], snapshot(p["seg_node"], p["node"]))


def test_cancel_mid_run_changes_nothing(populated, client):
    p = populated
    scene = p["scene"]
    nodes_before = scene.GetNumberOfNodes()
    controller = panel.PanelController(scene, client=client)
    job = controller.start(panel.PanelState(model="test-model", prompts=["target", "liver"],
                                         options=dict(SPHERE, steps=200, step_s=0.05)), p["node"], p["seg_node"])
    while job.done < 3:
        result = controller.poll()
        assert not result.finished
        time.sleep(0.02)
    assert controller.poll().progress.percent is not None
    t0 = time.monotonic()
    controller.cancel()
    assert controller.poll().progress.text == "Cancelling…" or controller.running
    outcome, _, _ = drive(controller, timeout=10)
    assert time.monotonic() - t0 < 2.0
    assert outcome.state == "cancelled" and outcome.segmentation_node is None and outcome.names == []
    assert "nothing was changed" in outcome.summary
    assert scene.GetNumberOfNodes() == nodes_before
    assert_same(p["before"], snapshot(p["seg_node"], p["node"]))
    assert set(snapshot(p["seg_node"], p["node"])) == set(p["before"])
    assert not controller.can_undo
    # the next run works (the worker survived the cancel)
    _, again, _ = run_test_model(scene, client, p["node"], p["seg_node"])
    assert again.state == "done"


def test_run_to_end_keeps_the_caller_responsive_and_cancels_past_the_timeout(scene, client):
    """What the Logic's segment() (scripts, the self-test) does: poll, give Slicer its events, stop at a timeout."""
    node = sb.node_from_volume(scene, small_volume(), "small")
    controller = panel.PanelController(scene, client=client)
    idles = []
    outcome = controller.run_to_end(panel.PanelState(model="test-model", prompts=["target"], options=SPHERE,
                                                     show_3d=False), node, idle=lambda: idles.append(1), interval=0.02)
    assert outcome.state == "done" and outcome.names == ["target"] and idles
    before = scene.GetNumberOfNodes()
    t0 = time.monotonic()
    outcome = controller.run_to_end(panel.PanelState(model="test-model", prompts=["target"],
                                                     options=dict(SPHERE, steps=200, step_s=0.05)), node,
                                    timeout=0.5, interval=0.02)
    assert outcome.state == "cancelled" and time.monotonic() - t0 < 5
    assert scene.GetNumberOfNodes() == before and not controller.running


def test_scene_close_stops_the_run_and_forgets_undo(populated, client):
    p = populated
    controller, outcome, _ = run_test_model(p["scene"], client, p["node"], p["seg_node"])
    assert outcome.state == "done" and controller.can_undo
    job = controller.start(panel.PanelState(model="test-model", prompts=["target"],
                                            options=dict(SPHERE, steps=200, step_s=0.05)), p["node"], p["seg_node"])
    controller.forget_scene()
    assert not controller.can_undo and controller.run.cancel_requested
    outcome, _, _ = drive(controller, timeout=10)
    assert outcome.state == "cancelled" and job.finished


def test_cancel_then_new_output_node_is_not_created(scene, client):
    node = sb.node_from_volume(scene, small_volume(), "small")
    before = scene.GetNumberOfNodes()
    controller = panel.PanelController(scene, client=client)
    job = controller.start(panel.PanelState(model="test-model", prompts=["target"],
                                         options=dict(SPHERE, steps=100, step_s=0.05)), node)
    while job.done < 1:
        assert not controller.poll().finished, controller.last_outcome.summary  # a failed run must not hang here
        time.sleep(0.02)
    controller.cancel()
    outcome, _, _ = drive(controller, timeout=10)
    assert outcome.state == "cancelled"
    assert scene.GetNumberOfNodes() == before
    assert scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems() == 0


def test_absent_targets_listed_not_written(scene, client):
    node = sb.node_from_volume(scene, small_volume(), "small")
    before = scene.GetNumberOfNodes()
    _, outcome, _ = run_test_model(scene, client, node, options={"centre": [500, 500, 500]})
    assert outcome.state == "done" and outcome.absent == ["target"] and outcome.names == []
    assert outcome.segmentation_node is None and scene.GetNumberOfNodes() == before
    assert "did not find target" in outcome.message.text
    # one found, one absent: only the found one becomes a segment
    controller = panel.PanelController(scene, client=client)
    controller.start(panel.PanelState(model="test-model", prompts=["liver", "kidney"], show_3d=False,
                                   options={"centre": [500, 500, 500]}), node)
    outcome, _, _ = drive(controller)
    # the test backend gives the first prompt the (here empty) sphere and the second a threshold mask
    assert outcome.absent == ["liver"] and outcome.names == ["kidney"]
    names = [s["name"] for s in sb.segments_of(outcome.segmentation_node)]
    assert names == ["kidney"]


def test_several_prompts_named_coloured_with_terminology(scene, client):
    node = sb.node_from_volume(scene, small_volume(), "small")
    _, outcome, _ = run_test_model(scene, client, node, prompts=("liver", "blob of interest"))
    infos = {s["name"]: s for s in sb.segments_of(outcome.segmentation_node)}
    assert list(infos) == ["liver", "blob of interest"]
    assert infos["liver"]["terminology"]["type"][2] == "Liver"  # catalogue terminology for a known target
    assert infos["blob of interest"]["terminology"]["type"][2] == "Tissue"  # unknown target: generic
    assert infos["liver"]["color"] != infos["blob of interest"]["color"]


def test_slicer_terminology_lookup_wins_for_known_targets(scene, client):
    node = sb.node_from_volume(scene, small_volume(), "small")
    slicer_entry = {"contextName": "Segmentation category and type - 3D Slicer General Anatomy list",
                    "category": ["SCT", "123037004", "Anatomical Structure"], "type": ["SCT", "10200004", "Liver"],
                    "anatomicContextName": "Anatomic codes - DICOM master list"}
    lookup = {"liver": (slicer_entry, (0.86, 0.51, 0.40))}.get
    controller = panel.PanelController(scene, client=client, terminology_lookup=lambda name: lookup(name))
    controller.start(panel.PanelState(model="test-model", prompts=["liver", "mystery"], options=SPHERE, show_3d=False),
                     node)
    outcome, _, _ = drive(controller)
    infos = {s["name"]: s for s in sb.segments_of(outcome.segmentation_node)}
    assert infos["liver"]["color"] == pytest.approx((0.86, 0.51, 0.40))
    assert infos["liver"]["terminology"]["type"] == ["SCT", "10200004", "Liver"]
    assert infos["mystery"]["terminology"]["type"][2] == "Tissue"


def test_roi_and_slice_range_limit_the_result(scene, client):
    volume = small_volume(shape=(20, 22, 24))
    node = sb.node_from_volume(scene, volume, "small")
    centre, radius = [2.0, -1.0, 0.5], 9.0
    full = expected_sphere(volume, centre, radius)
    roi = slicer.vtkMRMLMarkupsROINode()
    scene.AddNode(roi)
    roi.SetCenter(4.0, -1.0, -2.0)
    roi.SetSize(14.0, 8.0, 14.0)  # 3D models need at least 8 voxels along each axis
    _, outcome, _ = run_test_model(scene, client, node, roi=roi, options={"centre": centre, "radius": radius})
    assert outcome.state == "done", outcome.summary
    mask = sb.segment_mask(outcome.segmentation_node, outcome.segment_ids[0], node)
    from biomedseg.geometry import make_region, region_box

    box = region_box(volume, make_region("axial", None, sb.roi_ras_bounds(roi)))
    inside = np.zeros(volume.shape, bool)
    inside[box.slices] = True
    assert mask.any() and not mask[~inside].any() and full[~inside].any()
    assert np.array_equal(mask[inside], full[inside])  # exactly the full-volume answer inside the box
    # slice range: only slices 5..14 along the axial axis
    axis = volume.slice_orientation("axial").slice_axis
    _, outcome, _ = run_test_model(scene, client, node, slice_range=(5, 14), options={"centre": centre, "radius": radius})
    assert outcome.state == "done", outcome.summary
    mask = sb.segment_mask(outcome.segmentation_node, outcome.segment_ids[0], node)
    index = np.moveaxis(np.indices(volume.shape), 0, -1)[..., axis]
    in_range = (index >= 5) & (index <= 14)
    assert not mask[~in_range].any() and full[~in_range].any() and np.array_equal(mask[in_range], full[in_range])


def test_failure_is_a_sentence_and_writes_nothing(populated, client):
    p = populated
    before = p["scene"].GetNumberOfNodes()
    _, outcome, _ = run_test_model(p["scene"], client, p["node"], p["seg_node"], options={"mode": "error"})
    assert outcome.state == "failed" and outcome.message.text
    assert "Traceback" not in outcome.message.text
    assert p["scene"].GetNumberOfNodes() == before
    assert_same(p["before"], snapshot(p["seg_node"], p["node"]))


def test_bad_requests_are_refused_before_the_worker(scene, client):
    node = sb.node_from_volume(scene, small_volume(), "small")
    controller = panel.PanelController(scene, client=client)
    if not get_model("biomedparse-v1").data.get("backend"):  # catalogued, backend not in this version
        with pytest.raises(InputError, match="not available in this version"):
            controller.start(panel.PanelState(model="biomedparse-v1", prompts=["liver"]), node)
    with pytest.raises(InputError, match="Slice range"):
        controller.start(panel.PanelState(model="test-model", prompts=["x"], slice_range=(3, 99)), node)
    with pytest.raises(InputError, match="No prompt"):
        controller.start(panel.PanelState(model="test-model", prompts=[]), node)
    with pytest.raises(InputError, match="does not run on 'cuda'"):
        controller.start(panel.PanelState(model="test-model", prompts=["x"], device="cuda"), node)
    with pytest.raises(InputError, match="No input volume"):
        controller.start(panel.PanelState(model="test-model", prompts=["x"]), None)
    assert not controller.running


# ---- export ----------------------------------------------------------------------------------

def test_export_files_through_the_engine_writers(populated, tmp_path):
    import nibabel as nib
    import slicerio

    p = populated
    controller = panel.PanelController(p["scene"])
    assert ".dcm" not in controller.export_formats(p["node"])  # not DICOM
    written = controller.export_file(p["seg_node"], p["node"], tmp_path / "out.seg.nrrd")
    seg = slicerio.read_segmentation(str(written[0]))
    assert [s["name"] for s in seg["segments"]] == ["target", "liver", "drawn by hand"]
    written = controller.export_file(p["seg_node"], p["node"], tmp_path / "out.nii.gz")
    assert {w.name for w in written} >= {"out.nii.gz", "out.labels.json", "out.labels.csv"}
    labels = np.asarray(nib.load(str(tmp_path / "out.nii.gz")).dataobj)
    assert labels.shape == p["volume"].shape[::-1]
    with pytest.raises(InputError, match="not loaded from DICOM"):
        controller.export_file(p["seg_node"], p["node"], tmp_path / "out.dcm")


def test_dicom_source_guess_and_dicom_seg_export(scene, tmp_path):
    pydicom = pytest.importorskip("pydicom")
    pytest.importorskip("highdicom")
    from biomedseg.io import read_dicom_series
    from test_dicom_seg import chest_ct, write_ct_series

    hu, ijk_to_lps = chest_ct("axial")
    files = write_ct_series(tmp_path / "ct", hu, ijk_to_lps, reverse_names=True)
    volume = read_dicom_series(tmp_path / "ct")
    node = sb.node_from_volume(scene, Volume(volume.array, volume.ijk_to_ras, name="Chest CT"), "Chest CT")
    uids = {pydicom.dcmread(str(f), stop_before_pixels=True).SOPInstanceUID: str(f) for f in files}
    node.SetAttribute("DICOM.instanceUIDs", " ".join(sorted(uids)))  # Slicer's attribute, any order
    controller = panel.PanelController(scene)
    info = controller.describe_volume(node, dicom_lookup=uids.get)
    assert info["dicom"] and (info["guess"].modality, info["guess"].site) == ("CT", "chest")
    assert "DICOM modality CT" in info["guess"].reason
    assert ".dcm" in controller.export_formats(node, dicom_lookup=uids.get)
    seg_node = sb.new_segmentation_node(scene, "seg", node)
    mask = hu > 0
    sb.write_segments(seg_node, node, [Segment("lung", hu < -500), Segment("tissue", mask)])
    (out,) = controller.export_file(seg_node, node, tmp_path / "seg.dcm", dicom_lookup=uids.get)
    ds = pydicom.dcmread(str(out))
    assert ds.Modality == "SEG"
    assert [s.SegmentLabel for s in ds.SegmentSequence] == ["lung", "tissue"]
    referenced = {r.ReferencedSOPInstanceUID for s in ds.ReferencedSeriesSequence for r in s.ReferencedInstanceSequence}
    assert referenced == set(uids)


# ---- models, guesses and first-run installs ---------------------------------------------------

def test_model_choices_show_state_and_disable_what_cannot_run():
    choices = {c.id: c for c in panel.model_choices("auto")}
    assert choices["deepbet"].ready and choices["deepbet"].enabled and choices["deepbet"].state == "ready"
    assert "MIT" in choices["deepbet"].tooltip and "18 MB" in choices["deepbet"].tooltip
    bp = choices["biomedparse-v1"]
    if not get_model("biomedparse-v1").data.get("backend"):
        assert not bp.enabled and bp.state == "not available in this version"
    assert "gated" in bp.tooltip and "CC-BY-NC-SA" in bp.tooltip
    on_cuda = {c.id: c for c in panel.model_choices("cuda")}
    assert on_cuda["test-model"].state == "not supported on this device" and not on_cuda["test-model"].enabled
    states = {"deepbet": {"ready": False, "state": "dependencies missing", "detail": "install torch, deepbet"},
              "biomedparse-v1": {"ready": False, "state": "weights to download", "detail": "1.8 GB"}}
    forced = {c.id: c for c in panel.model_choices("auto", states)}
    assert forced["deepbet"].action == "install_dependencies"
    assert forced["biomedparse-v1"].action == "download_weights"


def test_model_states_from_another_python(tmp_path):
    states = panel.model_states(sys.executable)
    assert states["deepbet"]["state"] == "ready"
    broken = panel.model_states(str(tmp_path / "no-python"))
    assert broken["deepbet"]["state"] == "dependencies missing" and "cannot be run" in broken["deepbet"]["detail"]


@pytest.mark.parametrize("tags, expected", [
    ({"modality": "MR", "series_description": "T1 MPRAGE sag", "body_part": "HEAD"}, ("MRI-T1", "head")),
    ({"modality": "MR", "series_description": "AX T1 POST GAD", "body_part": "BRAIN"}, ("MRI-T1-Gd", "head")),
    ({"modality": "MR", "series_description": "t2_flair_tra"}, ("MRI-FLAIR", "head")),
    ({"modality": "CT", "body_part": "ABDOMEN"}, ("CT", "abdomen")),
    ({"modality": "DX", "body_part": "CHEST"}, ("X-Ray", "chest")),
])
def test_guess_from_dicom_tags(tags, expected):
    volume = Volume(np.zeros((150, 200, 180), np.int16), np.eye(4))
    guess = panel.guess_modality_site(volume, tags)
    assert (guess.modality, guess.site) == expected


def test_guess_from_intensities():
    ct = Volume(np.full((40, 60, 60), -1000, np.int16), np.diag([6.0, 6.0, 10.0, 1.0]))
    ct.array[10:30, 10:50, 10:50] = 40
    assert panel.guess_modality_site(ct).modality == "CT"
    xray = Volume(np.random.default_rng(0).integers(0, 4000, (1, 300, 300)).astype(np.uint16), np.eye(4))
    assert panel.guess_modality_site(xray).modality == "X-Ray"
    assert panel.match_modality("MRI", ["CT", "MRI-T1", "MRI-T2"]) == "MRI-T1"
    assert panel.match_modality("MRI-T1", ["CT", "MRI"]) == "MRI"
    assert panel.match_site("head", ["abdomen", "brain"]) == "brain"
    assert "liver" in panel.suggestions("biomedparse-v1", "CT", "abdomen")


def test_buttons_while_busy_and_idle():
    busy = panel.button_states(busy=True, can_run=True, can_undo=True, has_result=True)
    assert [n for n, on in busy.items() if on] == ["cancelButton"]  # nothing may touch a running job's output
    idle = panel.button_states(busy=False, can_run=False, can_undo=False, has_result=True)
    assert not idle["segmentButton"] and not idle["cancelButton"] and not idle["undoButton"]
    assert idle["editButton"] and idle["exportFileButton"] and idle["exportLabelmapButton"]
    assert idle["installDependenciesButton"]


def test_time_left_reads_naturally():
    assert [panel.format_seconds(s) for s in (0.2, 3.4, 75, 7300)] == ["under 1 s", "3 s", "1 min 15 s", "2 h 01 min"]
    assert [panel.time_left(s) for s in (0.2, 12.4, 75)] == ["under 1 s left", "about 12 s left",
                                                             "about 1 min 15 s left"]
    # the progress line of a worker job as the panel shows it (once read "about under 1 s left")
    from biomedseg.worker.client import Job

    job = Job(id=1, model="test-model", prompts=["target"], volume=small_volume(), state="running",
              stage="segmenting slices", done=9, total=10, eta=0.2)
    assert panel.describe_progress(job) == panel.Progress(90, "Segmenting slices (9/10) · under 1 s left")
    job.done, job.eta = 3, 12.4
    assert panel.describe_progress(job).text == "Segmenting slices (3/10) · about 12 s left"
    job.cancel_requested_at = time.monotonic()
    assert panel.describe_progress(job).text == "Cancelling…"


def test_prompts_parse_like_the_line_edit():
    assert panel.parse_prompts(" liver,  left kidney; Liver\ntumor ,") == ["liver", "left kidney", "tumor"]
    assert panel.join_prompts(["liver", "tumor"]) == "liver, tumor"


def test_describe_error_gives_a_sentence_and_an_action():
    from biomedseg.errors import DependencyMissingError, OutOfMemoryError, WeightsMissingError, WorkerCrashedError

    m = panel.describe_error(DependencyMissingError("Model 'x' needs torch.", hint="pip install torch"))
    assert m.action == "install_dependencies" and m.text == "Model 'x' needs torch. pip install torch"
    assert panel.describe_error(WeightsMissingError("Not in the hub cache.")).action == "download_weights"
    assert panel.describe_error(WeightsMissingError("Not on this machine.")).action == "choose_weights"
    assert panel.describe_error(WorkerCrashedError("It stopped.")).action == "retry"
    assert "CPU" in panel.describe_error(OutOfMemoryError("CUDA out of memory.")).text
    assert panel.describe_error(RuntimeError("boom")).text.startswith("Unexpected error: boom.")


def test_another_python_runs_without_slicers_python_variables(monkeypatch, scene):
    monkeypatch.setenv("PYTHONHOME", "/slicer/lib/Python")
    monkeypatch.setenv("PYTHONPATH", "/slicer/lib/Python/site-packages")
    env = panel.isolated_environment()
    assert "PYTHONHOME" not in env and "PYTHONPATH" not in env and env["PATH"] == __import__("os").environ["PATH"]
    controller = panel.PanelController(scene, default_python=sys.executable)
    assert controller.client_for("").env is None  # Slicer's own Python: its environment as is
    other = controller.client_for("/opt/envs/worker/bin/python")
    assert other.python == "/opt/envs/worker/bin/python" and "PYTHONHOME" not in other.env
    controller.close()


def test_old_panel_logic_names_are_the_same_objects():
    """Scenes and scripts that did ``from biomedseg import panel_logic`` keep working on the new package."""
    from biomedseg import catalog, panel_logic
    from biomedseg.io import dicom_files
    from biomedseg.panel import controller, guessing, install, messages, models, request, state

    old_all = ["PanelState", "PanelController", "ModelChoice", "Guess", "Progress", "PanelMessage", "RunOutcome",
               "PollResult", "button_states", "state_from_parameters", "state_for_guess", "model_choices",
               "model_states", "guess_modality_site", "suggestions", "modalities_for", "sites_for",
               "match_modality", "match_site", "build_request", "describe_progress", "describe_error",
               "install_plan", "download_plan", "missing_requirements", "isolated_environment",
               "missing_engine_packages", "BackgroundSteps", "constraints_for_installed", "parse_prompts",
               "join_prompts", "read_dicom_tags", "order_dicom_files", "weights_progress", "crop_box",
               "crop_volume", "SLICE_AXES", "DEVICES", "POSTPROCESS", "WRITE_MODES", "EXPORT_FORMATS"]
    assert sorted(panel_logic.__all__) == sorted(old_all)
    for name in panel_logic.COMPATIBLE_NAMES:  # __all__ and what tests, scripts and scenes used besides
        assert hasattr(panel_logic, name), name
        if name in panel.__all__:
            assert getattr(panel_logic, name) is getattr(panel, name), name
    # where each job lives now
    assert panel_logic.PanelController is controller.PanelController
    assert panel_logic.PanelState is state.PanelState and panel_logic.SLICE_AXES is state.SLICE_AXES
    assert panel_logic.ModelChoice is models.ModelChoice and panel_logic.Guess is guessing.Guess
    assert panel_logic.SITE_WORDS is guessing.SITE_WORDS and panel_logic.build_request is request.build_request
    # the old crop helpers keep their old form over the engine's one crop path
    from biomedseg.geometry import crop_volume, make_region, region_box

    vol = small_volume(shape=(10, 12, 14))
    box = panel_logic.crop_box(vol, "axial", (2, 5))
    assert box == region_box(vol, make_region("axial", (2, 5))).slices
    cropped = panel_logic.crop_volume(vol, box)
    assert np.array_equal(cropped.ijk_to_ras, crop_volume(vol, region_box(vol, make_region("axial", (2, 5)))).ijk_to_ras)
    assert np.array_equal(panel_logic.uncrop(np.ones(cropped.shape, bool), box, vol.shape)[box], np.ones(cropped.shape))
    assert panel_logic.describe_progress is messages.describe_progress
    assert panel_logic.install_plan is install.install_plan and panel_logic.BackgroundSteps is install.BackgroundSteps
    assert panel_logic.order_dicom_files is dicom_files.order_dicom_files
    assert panel_logic.read_dicom_tags is dicom_files.read_dicom_tags is guessing.read_dicom_tags
    assert panel_logic.get_model is catalog.get_model and panel_logic.default_model_id is catalog.default_model_id
