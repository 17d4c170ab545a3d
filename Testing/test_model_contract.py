"""The model contract end to end: a model is one folder, and nothing else is edited for it.

* A copy of a bundled model folder under a new id runs through the CLI, the worker and the
  panel logic (real MRML scene) with the bundled model's results.
* A toy box-prompted model that returns labels (Testing/toy_models/box_labels), added the same
  way, gets its box on the right voxels and its labels back through every path.
* A toy interactive model keeps its image embedding in a worker session: a new click sends no
  voxels and computes no embedding.
* Typed prompts: RAS -> voxel grid exactly (any storage order, oblique), 2D boxes know their
  slice, the JSON form round-trips and refuses malformed prompts.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from biomedseg.catalog import MODELS_DIR, load_catalog
from biomedseg.errors import InputError
from biomedseg.prompts import (BoxPrompt, MaskPrompt, PointPrompt, TextPrompt, prompt_from_dict, prompt_to_dict,
                               to_grid)
from biomedseg.volume import Volume
from conftest import mrml_scene
from geometry_cases import DIRECTIONS, affine, reoriented

TOYS = Path(__file__).parent / "toy_models"


@pytest.fixture
def extra_models(tmp_path, monkeypatch):
    """Register model folders copied into a temporary folder, as a site would ($BIOMEDSEG_EXTRA_MODELS,
    inherited by the workers); returns a function that copies one folder in under a new id."""
    root = tmp_path / "site_models"
    root.mkdir()
    monkeypatch.setenv("BIOMEDSEG_EXTRA_MODELS", str(root))

    def add(source: Path, new_id: str | None = None) -> Path:
        target = root / source.name
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        if new_id is not None:
            data = json.loads((target / "model.json").read_text())
            data["id"] = new_id
            (target / "model.json").write_text(json.dumps(data, indent=2))
        load_catalog.cache_clear()
        return target

    yield add
    load_catalog.cache_clear()


def dice(a, b) -> float:
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


# ---- a copied folder is a new model --------------------------------------------------------
@pytest.mark.slow
def test_copied_deepbet_folder_runs_through_cli_worker_and_panel(extra_models, colin_path, colin_bet_path,
                                                                 tmp_path):
    import nibabel as nib
    import slicerio

    from biomedseg.cli import main
    from biomedseg.io import read_volume
    from biomedseg.panel import PanelController, PanelState
    from biomedseg import slicer_bridge as sb
    from biomedseg.worker.client import WorkerClient

    extra_models(MODELS_DIR / "deepbet", "deepbet-copy")
    reference = np.transpose(np.asarray(nib.load(str(colin_bet_path)).dataobj) > 0, (2, 1, 0))  # (k, j, i)
    out = tmp_path / "brain.seg.nrrd"
    assert main(["segment", str(colin_path), "--model", "deepbet-copy", "--prompt", "brain", "-o", str(out),
                 "-q"]) == 0
    seg = slicerio.read_segmentation(str(out))
    cli_mask = np.transpose(slicerio.extract_segments(seg, [("brain", 1)])["voxels"] == 1, (2, 1, 0))
    assert dice(cli_mask, reference) >= 0.9

    volume = read_volume(colin_path)
    client = WorkerClient()
    try:
        worker_mask = client.run(volume, "deepbet-copy", ["brain"], timeout=300).segments[0].mask
        assert np.array_equal(worker_mask, cli_mask)
        assert {"model": "deepbet-copy", "device": "cpu", "weights": None} in client.request("status")["warm"]
    finally:
        client.close()

    with mrml_scene() as scene:
        node = sb.node_from_volume(scene, volume, "colin")
        controller = PanelController(scene)
        try:
            controller.start(PanelState(model="deepbet-copy", prompts=["brain"], show_3d=False), node)
            outcome = controller.wait(timeout=300)
            assert outcome.state == "done" and outcome.names == ["brain"]
            panel_mask = sb.segment_mask(outcome.segmentation_node, outcome.segment_ids[0], node)
            assert np.array_equal(panel_mask, cli_mask)
        finally:
            controller.close()


# ---- a toy model of a new kind: boxes in, labels out -----------------------------------------
def bright_cube_volume() -> Volume:
    """A dark volume with a bright cube, stored LPS and permuted so array order is not RAS order."""
    array = np.zeros((20, 24, 28), np.int16)
    array[6:12, 8:16, 10:20] = 1000
    vol = Volume(array, affine(np.diag([-1.0, -1.0, 1.0]), (1.5, 1.2, 2.0), (10.0, 20.0, -30.0)), name="cube")
    return reoriented(vol, (2, 0, 1), (True, False, True))[0]


def cube_box(volume: Volume, grow: float = 0.0):
    """RAS corners of the bright cube (voxel centres), grown by ``grow`` mm."""
    ras = volume.ras_of_voxels()[volume.array > 500]
    return tuple(ras.min(axis=0) - grow), tuple(ras.max(axis=0) + grow)


def expected_box_voxels(volume: Volume, lo, hi) -> int:
    """Voxels whose centres lie in the RAS box (an independent count, straight from the geometry)."""
    ras = volume.ras_of_voxels()
    inside = np.all((ras >= np.asarray(lo) - 1e-6) & (ras <= np.asarray(hi) + 1e-6), axis=-1)
    return int(inside.sum())


def test_toy_box_labels_model_through_cli_worker_and_panel(extra_models, tmp_path):
    from biomedseg.cli import main
    from biomedseg.io import write_volume
    from biomedseg.panel import PanelController, PanelState
    from biomedseg import slicer_bridge as sb
    from biomedseg.worker.client import WorkerClient

    extra_models(TOYS / "box_labels")
    vol = bright_cube_volume()
    lo, hi = cube_box(vol, grow=0.3)
    box = BoxPrompt(lo, hi, None, "cube")
    background = BoxPrompt(tuple(np.asarray(lo) + np.array([0, 0, 20.0])),
                           tuple(np.asarray(hi) + np.array([0, 0, 20.0])), None, "elsewhere")
    n_cube = expected_box_voxels(vol, lo, hi)
    assert n_cube == 6 * 8 * 10

    # in the worker
    client = WorkerClient()
    try:
        result = client.run(vol, "toy-box-labels", [box, background], timeout=120)
    finally:
        client.close()
    scores = {(lab.target, lab.name): lab.score for lab in result.labels}
    assert scores[("cube", "bright")] == pytest.approx(1.0) and scores[("cube", "dark")] == pytest.approx(0.0)
    assert scores[("elsewhere", "bright")] < 0.05
    assert result.segments == [] and result.absent == []
    assert result.report["plan"] == {} and result.report["batch_size"]["units"] == "boxes"

    # through the CLI, in the worker and in-process: -o NAME.json holds the labels and the voxel count
    src = write_volume(tmp_path / "cube.nii.gz", vol)
    box_args = ["--box", *map(str, lo), *map(str, hi), "--box-3d", "--target", "cube"]
    for extra in ([], ["--in-process"]):
        out = tmp_path / f"labels{len(extra)}.json"
        assert main(["segment", str(src), "--model", "toy-box-labels", *box_args, "-o", str(out), "-q", *extra]) == 0
        data = json.loads(out.read_text())
        assert {(x["target"], x["name"]) for x in data["labels"]} == {("cube", "bright"), ("cube", "dark")}
        assert data["report"]["voxels"] == {"cube": n_cube}
    # a labels-only model cannot write a segmentation file, and says what to do instead
    assert main(["segment", str(src), "--model", "toy-box-labels", *box_args, "-o", str(tmp_path / "x.seg.nrrd")]) == 2
    # a text prompt is not a box
    assert main(["segment", str(src), "--model", "toy-box-labels", "--prompt", "cube", "-o",
                 str(tmp_path / "y.json")]) == 2

    # in the panel: the box comes from a real markups ROI node
    import slicer

    with mrml_scene() as scene:
        node = sb.node_from_volume(scene, vol, "cube")
        roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "cube")
        centre, size = (np.asarray(lo) + hi) / 2, np.asarray(hi) - lo
        roi.SetCenter(*centre)
        roi.SetSize(*size)
        prompts = sb.prompts_from_markups(roi, target="cube", plane=None)
        assert len(prompts) == 1 and np.allclose(prompts[0].ras_min, lo) and np.allclose(prompts[0].ras_max, hi)
        controller = PanelController(scene)
        try:
            controller.start(PanelState(model="toy-box-labels", prompts=[], show_3d=False), node,
                             prompt_nodes=[roi])
            outcome = controller.wait(timeout=120)
        finally:
            controller.close()
        assert outcome.state == "done" and outcome.names == []
        assert {(lab.target, lab.name) for lab in outcome.labels} == {("cube", "bright"), ("cube", "dark")}
        assert "bright" in outcome.summary
        assert scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems() == 0  # nothing written
        del slicer


def test_two_d_box_covers_only_its_slice_and_region_crop_applies(extra_models):
    """A box drawn on an axial slice lands on that one slice; a slice range crops what the model sees."""
    from biomedseg.engine import segment
    from biomedseg.geometry import make_region

    extra_models(TOYS / "box_labels")
    vol = bright_cube_volume()
    lo, hi = cube_box(vol)
    axis = vol.slice_orientation("axial").slice_axis
    assert vol.shape[axis] == 20  # the cube is 6 voxels thick along the axial axis, 8 x 10 in plane
    solid = segment(vol, "toy-box-labels", [BoxPrompt(lo, hi, None, "cube")])
    assert solid.report["voxels"] == {"cube": 6 * 8 * 10} and solid.report["region"] is None
    flat_prompt = BoxPrompt(lo, hi, "axial", "cube")
    flat = segment(vol, "toy-box-labels", [flat_prompt])
    assert flat.report["voxels"] == {"cube": 8 * 10}
    (gbox,) = to_grid([flat_prompt], vol).boxes
    centre = np.linalg.inv(vol.ijk_to_ras) @ np.r_[(np.asarray(lo) + hi) / 2, 1.0]
    assert gbox.plane == "axial" and gbox.slice == int(np.floor(centre[2 - axis] + 0.5))
    # with a slice range the backend is given only those slices (2 of the cube's 6)
    first = int(np.ceil(gbox.start[axis]))
    cropped = segment(vol, "toy-box-labels", [BoxPrompt(lo, hi, None, "cube")],
                      region=make_region("axial", (first, first + 1)))
    assert cropped.report["region"][axis] == [first, first + 2]
    assert cropped.report["voxels"] == {"cube": 2 * 8 * 10} and cropped.labels[0].score == pytest.approx(1.0)
    with pytest.raises(InputError, match="does not overlap the region to segment"):
        segment(vol, "toy-box-labels", [BoxPrompt(lo, hi, None, "cube")], region=make_region("axial", (0, 1)))


# ---- an interactive model keeps its session -----------------------------------------------
def click_setup(extra_models):
    """The interactive toy registered, the cube volume, a box around the cube and the cube's voxels."""
    extra_models(TOYS / "click_session")
    vol = bright_cube_volume()
    lo, hi = cube_box(vol, grow=4.0)
    return vol, BoxPrompt(lo, hi, None, "cube"), vol.array > 500


def test_interactive_session_keeps_the_embedding_and_sends_no_voxels_for_a_click(extra_models):
    from biomedseg.worker.client import WorkerClient

    vol, box, cube = click_setup(extra_models)
    client = WorkerClient()
    try:
        first = client.run(vol, "toy-click-session", [box], session="s1", timeout=120)
        assert np.array_equal(first.segments[0].mask, cube)
        assert first.report["embeddings"] == 1 and first.report["session_runs"] == 1
        # a click outside the cube, in the same session: no volume sent, no new embedding
        ras = vol.ras_of_voxels()
        outside = ras[tuple(np.argwhere(~cube)[0])]
        job = client.submit(None, "toy-click-session", [box, PointPrompt(tuple(outside), True, None, "cube")],
                            session="s1")
        assert job.volume is None
        second = client.wait(job, timeout=120)
        assert second.report["embeddings"] == 1 and second.report["session_runs"] == 2
        added = second.segments[0].mask & ~cube
        assert added.any() and np.array_equal(second.segments[0].mask & cube, cube)
        status = client.request("status")
        assert status["sessions"][0]["session"] == "s1" and status["sessions"][0]["runs"] == 2
        # exclude the click again, still the same embedding
        third = client.run(None, "toy-click-session", [box, PointPrompt(tuple(outside), False, None, "cube")],
                           session="s1", timeout=120)
        assert np.array_equal(third.segments[0].mask, cube) and third.report["embeddings"] == 1
        # a new image under the same id re-opens the session
        fourth = client.run(vol, "toy-click-session", [box], session="s1", timeout=120)
        assert fourth.report["embeddings"] == 2 and fourth.report["session_runs"] == 1
        assert client.close_session("s1") is True
        with pytest.raises(InputError, match="is not open"):
            client.submit(None, "toy-click-session", [box], session="s1")
    finally:
        client.close()


# ---- typed prompts on the grid --------------------------------------------------------------
@pytest.mark.parametrize("name,direction", [DIRECTIONS[0], DIRECTIONS[13], DIRECTIONS[47], DIRECTIONS[48]])
def test_prompts_land_on_the_voxels_they_name_in_any_storage_order(name, direction):
    vol = Volume(np.zeros((9, 11, 13), np.int16), affine(direction, (1.1, 0.9, 2.3), (5.0, -3.0, 7.0)))
    ras = vol.ras_of_voxels()
    k, j, i = 4, 7, 2
    point = PointPrompt(tuple(ras[k, j, i]), False, "axial", "x")
    (gp,) = to_grid([point], vol).points
    assert np.allclose(gp.index, (k, j, i)) and gp.include is False
    assert gp.slice == (k, j, i)[vol.slice_orientation("axial").slice_axis]
    # a 3D box from two voxel centres covers exactly the voxels between them
    a, b = ras[2, 3, 4], ras[6, 8, 10]
    (gb,) = to_grid([BoxPrompt(tuple(np.minimum(a, b)), tuple(np.maximum(a, b)), None, "x")], vol).boxes
    if name != "oblique":  # axis-aligned: the box's corners are those voxels
        assert np.allclose(gb.start, (2, 3, 4)) and np.allclose(gb.stop, (6, 8, 10))
    else:  # oblique: the RAS box's bounding box in index space contains them
        assert np.all(np.asarray(gb.start) <= np.add((2, 3, 4), 1e-9))
        assert np.all(np.asarray(gb.stop) >= np.subtract((6, 8, 10), 1e-9))
    with pytest.raises(InputError, match="outside the image"):
        to_grid([PointPrompt((1e4, 0.0, 0.0), True, "axial", "x")], vol)
    with pytest.raises(InputError, match="does not overlap the region to segment"):
        to_grid([BoxPrompt((1e4, 1e4, 1e4), (2e4, 2e4, 2e4), None, "x")], vol, where="the region to segment")
    with pytest.raises(InputError, match=r"shape \(2, 2, 2\)"):
        to_grid([MaskPrompt(np.ones((2, 2, 2), bool), "x")], vol)


def test_prompt_json_round_trip_and_refusals():
    prompts = [TextPrompt("liver"), BoxPrompt((3.0, 2.0, 1.0), (1.0, 5.0, 6.0), "coronal", "lesion"),
               PointPrompt((1.0, 2.0, 3.0), False, None, "lesion")]
    back = [prompt_from_dict(json.loads(json.dumps(prompt_to_dict(p)))) for p in prompts]
    assert back[0] == prompts[0] and back[2] == prompts[2]
    assert back[1].ras_min == (1.0, 2.0, 1.0) and back[1].ras_max == (3.0, 5.0, 6.0)  # corners ordered
    mask = np.zeros((3, 3, 3), bool)
    mask[1, 1, 1] = True
    assert np.array_equal(prompt_from_dict({"type": "mask", "target": "seg"}, mask).mask, mask)
    for bad, text in (({"type": "box", "ras_min": [0, 0], "ras_max": [1, 1, 1]}, "three RAS coordinates"),
                      ({"type": "point", "ras": [0, 0, float("nan")]}, "non-finite"),
                      ({"type": "point", "ras": [0, 0, 0], "include": "yes"}, "true or false"),
                      ({"type": "box", "ras_min": [0, 0, 0], "ras_max": [1, 1, 1], "plane": "oblique"}, "plane"),
                      ({"type": "text", "text": 5}, "string"), ({"type": "scribble"}, "Unknown prompt type"),
                      ({"type": "mask", "target": "x"}, "needs its voxels"), ([1, 2], "must be an object"),
                      ({"type": "point", "ras": [0, 0, 0], "target": "  "}, "non-empty name")):
        with pytest.raises(InputError, match=text):
            prompt_from_dict(bad)


def test_declared_options_are_checked_and_defaults_filled():
    from biomedseg.catalog import get_model
    from biomedseg.catalog import check_options

    declared = get_model("biomedparse-v1").options
    filled = check_options("biomedparse-v1", declared, {"joint": True, "p_value": 0})
    assert filled["joint"] is True and filled["p_value"] == 0 and filled["image_size"] == 1024
    assert set(filled) == set(declared)
    for options, text in (({"p_value": 1.5}, "at most"), ({"image_size": 32}, "at least 64"),
                          ({"p_value_scope": "slices"}, "one of slice, volume"), ({"batch_size": 2.5}, "whole number"),
                          ({"cache": "no"}, "true or false"), ({"recognise": True}, "has no option 'recognise'")):
        with pytest.raises(InputError, match=text):
            check_options("biomedparse-v1", declared, options)


# ---- sessions and results hold under misuse ---------------------------------------------------
def test_a_failed_reopen_leaves_no_old_image_and_old_data_never_leaks(extra_models):
    """Re-opening a session with a new image closes the old one first: if the new request fails, a
    click finds no session (not the previous image). Probabilities of an earlier job never show up
    for targets that have none (the pooled block is reused)."""
    from biomedseg.worker.client import WorkerClient

    extra_models(TOYS / "click_session")
    extra_models(TOYS / "box_labels")
    vol = bright_cube_volume()
    lo, hi = cube_box(vol, grow=4.0)
    box = BoxPrompt(lo, hi, None, "cube")
    flipped = Volume(vol.array[::-1].copy(), vol.ijk_to_ras, name="other")
    outside = BoxPrompt((1e4, 1e4, 1e4), (2e4, 2e4, 2e4), None, "cube")
    client = WorkerClient()
    try:
        assert client.run(vol, "toy-click-session", [box], session="s", timeout=120).segments
        with pytest.raises(InputError, match="does not overlap"):
            client.run(flipped, "toy-click-session", [outside], session="s", timeout=120)
        assert "s" not in client.sessions and client.request("status")["sessions"] == []
        with pytest.raises(InputError, match="is not open"):
            client.submit(None, "toy-click-session", [box], session="s")
        first = client.run(vol, "toy-click-session", [box], probabilities=True, timeout=120)
        assert first.probabilities["cube"].max() == 1.0
        labels = client.run(vol, "toy-box-labels", [box], probabilities=True, timeout=120)
        assert labels.probabilities == {} and labels.labels  # nothing of the first job's block came back
    finally:
        client.close()


def test_a_session_rerun_takes_a_new_region_or_new_options_afresh(extra_models):
    from biomedseg.engine import segment
    from biomedseg.geometry import make_region

    vol, box, cube = click_setup(extra_models)
    axis = vol.slice_orientation("axial").slice_axis
    first = segment(vol, "toy-click-session", [box], session="r")
    assert np.array_equal(first.segments[0].mask, cube) and first.report["embeddings"] >= 1
    embeddings = first.report["embeddings"]
    rows = np.nonzero(np.any(cube, axis=tuple(a for a in range(3) if a != axis)))[0]
    first_row = int(rows[0]) + 2  # a 3D model needs 8 slices: the cube's upper 4 and 4 more
    region = make_region("axial", (first_row, first_row + 7))
    cropped = segment(None, "toy-click-session", [box], session="r", region=region)
    along = np.moveaxis(cropped.segments[0].mask, axis, 0)
    assert along[first_row:].any() and not along[:first_row].any()  # the request's region, not the old one
    assert cropped.report["region"] is not None
    again = segment(None, "toy-click-session", [box], session="r")  # no region given: the session's (now this one)
    assert again.report["embeddings"] == cropped.report["embeddings"]
    changed = segment(None, "toy-click-session", [box], session="r", region=region, options={"radius": 9.0})
    assert changed.report["embeddings"] == again.report["embeddings"] + 1  # other options: opened afresh
    assert changed.report["session_runs"] == 1 and embeddings >= 1


def test_a_backend_returning_nan_scores_is_an_error_not_a_stuck_panel(extra_models, tmp_path):
    from biomedseg.cli import main
    from biomedseg.errors import BiomedSegError
    from biomedseg.io import write_volume
    from biomedseg.worker.client import WorkerClient

    extra_models(TOYS / "box_labels")
    vol = bright_cube_volume()
    lo, hi = cube_box(vol)
    box = BoxPrompt(lo, hi, None, "cube")
    client = WorkerClient()
    try:
        with pytest.raises(BiomedSegError, match="returned the label 'bright' with score nan"):
            client.run(vol, "toy-box-labels", [box], options={"broken_scores": True}, timeout=60)
        assert client.run(vol, "toy-box-labels", [box], timeout=60).labels  # the worker keeps serving
    finally:
        client.close()
    src = write_volume(tmp_path / "cube.nii.gz", vol)
    out = tmp_path / "x.json"
    assert main(["segment", str(src), "--model", "toy-box-labels", "--box", *map(str, lo), *map(str, hi),
                 "--box-3d", "--option", "broken_scores=true", "-o", str(out), "--in-process", "-q"]) == 1
    assert not out.exists()


def test_jobs_behind_a_cancel_kill_keep_their_sessions(extra_models):
    """A session opened and clicked while another job was running, and that job's cancel needed a kill:
    both go to the fresh worker, and the session stays usable on both sides."""
    from biomedseg.worker.client import WorkerClient

    extra_models(TOYS / "click_session")
    extra_models(Path(__file__).parent / "worker_models" / "test_model")
    vol = bright_cube_volume()
    lo, hi = cube_box(vol, grow=4.0)
    box = BoxPrompt(lo, hi, None, "cube")
    client = WorkerClient(cancel_grace=0.5)
    try:
        stubborn = client.submit(vol, "test-model", ["t"], options={"mode": "ignore_cancel", "steps": 100,
                                                                     "step_s": 0.1})
        opening = client.submit(vol, "toy-click-session", [box], session="s")
        click = client.submit(None, "toy-click-session", [box, PointPrompt(tuple(vol.ras_of_voxels()[0, 0, 0]),
                                                                            True, None, "cube")], session="s")
        while stubborn.done < 1:
            client.poll(timeout=0.05)
        client.cancel(stubborn)
        assert client.wait(opening, timeout=60).segments and client.wait(click, timeout=60).segments
        assert "s" in client.sessions and [s["session"] for s in client.request("status")["sessions"]] == ["s"]
        assert client.run(None, "toy-click-session", [box], session="s", timeout=60).segments
    finally:
        client.close()
