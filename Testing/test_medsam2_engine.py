"""MedSAM2's engine side, exactly: prompts in patient space land on the right pixels of the right
frames and the masks come back on the input grid, for every storage order and plane, through
the real worker; sessions apply corrections without re-encoding; a segment as the prompt is
refined; cancel stops a propagation. The network is a stand-in whose output is a known
function of the prompts and of the frame it is shown (Testing/toy_models/medsam2_standin),
so every expected voxel is computed here independently, from the geometry alone."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from biomedseg.errors import CancelledError, InputError
from biomedseg.prompts import BoxPrompt, MaskPrompt, PointPrompt, TextPrompt
from biomedseg.volume import Volume
from conftest import registered_models
from geometry_cases import DIRECTIONS, affine

TOYS = Path(__file__).parent / "toy_models"
MODEL = "toy-medsam2-standin"
SHAPE = (8, 9, 11)


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    """The stand-in registered as a site model, in this process and in the workers it starts."""
    root = tmp_path_factory.mktemp("models")
    shutil.copytree(TOYS / "medsam2_standin", root / "medsam2_standin")
    with registered_models(root):
        yield


@pytest.fixture(scope="module")
def client(standin):
    from biomedseg.worker.client import WorkerClient

    c = WorkerClient()
    yield c
    c.close()


def patterned_volume(direction) -> Volume:
    """0/1000 voxels in a pattern with no symmetry, so a flipped or transposed frame shows."""
    k, j, i = np.indices(SHAPE)
    array = np.where((k + 2 * j + 3 * i + (i * j) % 4) % 3 != 0, 1000, 0).astype(np.int16)
    return Volume(array, affine(direction, (1.1, 0.9, 2.3), (5.0, -3.0, 7.0)), name="pattern")


def index_box_of_ras(volume: Volume, lo, hi) -> tuple[np.ndarray, np.ndarray]:
    """Continuous (k, j, i) bounding box of an RAS box's eight corners (numpy only)."""
    corners = np.array([[x, y, z, 1.0] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    ijk = (np.linalg.inv(volume.ijk_to_ras) @ corners.T).T[:, :3][:, ::-1]
    return ijk.min(axis=0), ijk.max(axis=0)


def case(volume: Volume, plane: str):
    """A box on one slice of ``plane`` (corners at voxel centres), an include click just outside it
    and an exclude click inside it, and the voxels the stand-in must return for them."""
    axis = volume.slice_orientation(plane).slice_axis
    in_plane = [a for a in range(3) if a != axis]
    a, b = np.zeros(3, int), np.zeros(3, int)
    a[axis] = b[axis] = 3
    for n, ax in enumerate(in_plane):
        a[ax], b[ax] = 2 + n, volume.shape[ax] - 2
    ras = volume.ras_of_voxels()
    lo, hi = np.minimum(ras[tuple(a)], ras[tuple(b)]), np.maximum(ras[tuple(a)], ras[tuple(b)])
    start, stop = index_box_of_ras(volume, lo, hi)
    idx = np.indices(volume.shape)
    inside = np.ones(volume.shape, bool)
    for ax in in_plane:
        inside &= (idx[ax] >= start[ax] - 1e-6) & (idx[ax] <= stop[ax] + 1e-6)
    expected = inside & (volume.array > 500)
    plus = a.copy()
    plus[in_plane[0]] -= 1  # just outside the box, on the box's slice
    minus = np.argwhere(expected & (idx[axis] == 3))[0]
    expected[tuple(plus)], expected[tuple(minus)] = True, False
    prompts = [BoxPrompt(tuple(lo), tuple(hi), plane, "obj"),
               PointPrompt(tuple(ras[tuple(plus)]), True, plane, "obj"),
               PointPrompt(tuple(ras[tuple(minus)]), False, plane, "obj")]
    return prompts, expected, (a, b, inside)


@pytest.mark.parametrize("name,direction", DIRECTIONS, ids=[n for n, _ in DIRECTIONS])
def test_box_and_points_land_on_the_right_voxels_in_every_storage_order_and_plane(client, name, direction):
    volume = patterned_volume(direction)
    for plane in ("axial", "coronal", "sagittal"):
        prompts, expected, (a, b, inside) = case(volume, plane)
        if name != "oblique":  # an axis-aligned box is exactly the voxels between its corners
            axis = volume.slice_orientation(plane).slice_axis
            lo_i, hi_i = np.minimum(a, b), np.maximum(a, b)
            idx = np.indices(volume.shape)
            direct = np.ones(volume.shape, bool)
            for ax in range(3):
                if ax != axis:
                    direct &= (idx[ax] >= lo_i[ax]) & (idx[ax] <= hi_i[ax])
            assert np.array_equal(inside, direct)
        result = client.run(volume, MODEL, prompts, keep_largest=False, timeout=60)
        (segment,) = result.segments
        wrong = int(np.count_nonzero(segment.mask != expected))
        assert wrong == 0, f"{name} {plane}: {wrong} wrong voxels"
        assert result.report["targets"]["obj"]["plane"] == plane


def in_process(volume, prompts, **kwargs):
    from biomedseg.engine import segment

    return segment(volume, MODEL, prompts, **kwargs)


def test_a_click_in_the_session_is_a_correction_that_recomputes_only_its_frames(standin):
    volume = patterned_volume(DIRECTIONS[5][1])
    prompts, expected, _ = case(volume, "axial")
    box = prompts[0]
    first = in_process(volume, [box], session="m1", keep_largest=False)
    target = first.report["targets"]["obj"]
    assert target["how"] == "propagated" and target["slices_encoded"] == SHAPE[0]
    before = first.segments[0].mask
    # an exclude click on another slice: a correction, no frame encoded again
    axis = volume.slice_orientation("axial").slice_axis
    idx = np.indices(volume.shape)
    far = np.argwhere(before & (idx[axis] == 5))[0]
    click = PointPrompt(tuple(volume.ras_of_voxels()[tuple(far)]), False, "axial", "obj")
    second = in_process(None, [box, click], session="m1", keep_largest=False)
    target = second.report["targets"]["obj"]
    assert target["how"] == "corrected" and target["slices_encoded"] == 0
    after = second.segments[0].mask
    assert not after[tuple(far)] and np.count_nonzero(before != after) == 1
    # the stand-in recomputed from the clicked frame to the end (no conditioning frame beyond it),
    # and back to the box's frame (exclusive)
    from biomedseg.models.medsam2.framing import Framing

    framing = Framing(volume, "axial")
    click_frame = framing.frame_of_slice(int(far[axis]))
    box_frame = framing.frame_of_slice(3)
    video = type_of_standin().videos[-1]
    lo, hi = sorted((box_frame, click_frame))
    expected_call = ("correct", click_frame, box_frame + 1 if click_frame > box_frame else 0,
                     SHAPE[0] - 1 if click_frame > box_frame else box_frame - 1)
    assert video.calls[-1] == expected_call and lo < hi
    # the same prompts again: nothing recomputed; an undone click: the object from its prompts again
    third = in_process(None, [box, click], session="m1", keep_largest=False)
    assert third.report["targets"]["obj"]["how"] == "unchanged"
    fourth = in_process(None, [box], session="m1", keep_largest=False)
    assert fourth.report["targets"]["obj"]["how"] == "propagated"
    assert np.array_equal(fourth.segments[0].mask, before)


def type_of_standin():
    from biomedseg.catalog import get_model, import_model_module

    return import_model_module(get_model(MODEL), "backend").StandInMedSAM2


def test_a_segment_as_the_prompt_is_refined_over_its_extent_only(standin):
    volume = patterned_volume(DIRECTIONS[20][1])
    axis = volume.slice_orientation("axial").slice_axis
    idx = np.indices(volume.shape)
    seg = np.zeros(volume.shape, bool)
    seg[tuple(slice(2, 5) if ax != axis else slice(3, 5) for ax in range(3))] = True
    seg[tuple(slice(3, 4) if ax != axis else slice(4, 5) for ax in range(3))] = True
    result = in_process(volume, [MaskPrompt(seg, "liver")], keep_largest=False, options={"margin": 1})
    # box mode: the bounding box of the largest slice of the segment, on the segment's slices +- 1
    areas = [seg.take(s, axis=axis).sum() for s in range(volume.shape[axis])]
    key = int(np.argmax(areas))
    key_mask = seg.take(key, axis=axis)
    rows = np.nonzero(key_mask)
    in_plane = [a for a in range(3) if a != axis]
    box = np.ones(volume.shape, bool)
    for n, ax in enumerate(in_plane):
        box &= (idx[ax] >= rows[n].min()) & (idx[ax] <= rows[n].max())
    box &= (idx[axis] >= 2) & (idx[axis] <= 5)
    assert np.array_equal(result.segments[0].mask, box & (volume.array > 500))
    # mask mode: the mask itself on the key slice
    masked = in_process(volume, [MaskPrompt(seg, "liver")], keep_largest=False, options={"mask_prompt": "mask"})
    key_slice = [slice(None)] * 3
    key_slice[axis] = key
    assert np.array_equal(masked.segments[0].mask[tuple(key_slice)], key_mask)


def test_cancel_stops_a_propagation_and_the_next_run_starts_clean(client):
    volume = patterned_volume(DIRECTIONS[0][1])
    prompts, expected, _ = case(volume, "axial")
    job = client.submit(volume, MODEL, prompts, session="c1", keep_largest=False, options={"delay": 0.5})
    time.sleep(1.0)
    asked = time.perf_counter()
    client.cancel(job)
    with pytest.raises(CancelledError):
        client.wait(job, timeout=30)
    assert time.perf_counter() - asked < 1.5
    # the cancelled job opened the session, so the image goes again
    again = client.run(volume, MODEL, prompts, session="c1", keep_largest=False, timeout=60)
    assert np.array_equal(again.segments[0].mask, expected)
    assert again.report["targets"]["obj"]["how"] == "propagated"


def test_what_medsam2_refuses_before_any_weights(standin):
    volume = patterned_volume(DIRECTIONS[0][1])
    with pytest.raises(InputError, match="does not take text prompts"):
        in_process(volume, [TextPrompt("liver")])
    prompts, _, _ = case(volume, "axial")
    coronal_box = BoxPrompt(prompts[0].ras_min, prompts[0].ras_max, "coronal", "obj")
    with pytest.raises(InputError, match="more than one plane"):
        in_process(volume, [prompts[0], coronal_box])
    with pytest.raises(InputError, match="is empty"):
        in_process(volume, [MaskPrompt(np.zeros(volume.shape, bool), "x")])
    with pytest.raises(InputError, match="window"):
        in_process(volume, [prompts[0]], options={"window": "3,1"})


def test_the_catalogue_lists_the_released_checkpoints_as_variants():
    from biomedseg.catalog import get_model

    base = get_model("medsam2")
    assert base.weights["repo"] == "wanglab/MedSAM2" and base.weights["files"] == ["MedSAM2_latest.pt"]
    for model_id, file in [("medsam2-2411", "MedSAM2_2411.pt"), ("medsam2-ct-lesion", "MedSAM2_CTLesion.pt"),
                           ("medsam2-mri-liver-lesion", "MedSAM2_MRI_LiverLesion.pt"),
                           ("medsam2-us-heart", "MedSAM2_US_Heart.pt")]:
        variant = get_model(model_id)
        assert variant.weights["files"] == [file] and variant.weights["sha256"] is None
        assert variant.backend == base.backend and variant.options == base.options
        assert variant.data["variant_of"] == "medsam2" and variant.interactive


# ---- the real network through the engine, on a checkpoint this test writes ----------------------
@pytest.fixture(scope="module")
def detweights_checkpoint(tmp_path_factory):
    import torch

    from biomedseg.models.medsam2.network import MedSAM2Net
    from conftest import load_detweights

    net = MedSAM2Net()
    load_detweights().fill_module(net)
    path = tmp_path_factory.mktemp("medsam2") / "MedSAM2_latest.pt"
    torch.save({"model": net.state_dict()}, path)
    return path


def test_the_real_model_loads_the_authors_file_form_and_a_click_reuses_every_embedding(detweights_checkpoint):
    from biomedseg.engine import segment
    from biomedseg.engine.sessions import SESSIONS

    volume = patterned_volume(DIRECTIONS[0][1])  # 8 axial frames: the fewest a 3D model takes
    k = np.indices(volume.shape)[0]
    volume = volume.with_array((volume.array + 10 * k).astype(np.int16))  # no two slices alike (the cache
    prompts, _, _ = case(volume, "axial")                                  # would share repeated ones)
    n_frames = volume.shape[volume.slice_orientation("axial").slice_axis]
    first = segment(volume, "medsam2", [prompts[0]], weights=str(detweights_checkpoint), session="real",
                    keep_largest=False)
    target = first.report["targets"]["obj"]
    assert target["how"] == "propagated" and target["slices_encoded"] == n_frames
    assert first.report["plan"]["memory"] == "bfloat16" and "percentile" in first.report["plan"]["window"]
    assert first.segments and first.segments[0].mask.shape == volume.shape
    cache = first.report["feature_cache"]
    assert cache["slices"] == n_frames and 0 < cache["bytes_per_slice"] <= 5 * 2 ** 20
    second = segment(None, "medsam2", prompts, weights=str(detweights_checkpoint), session="real",
                     keep_largest=False)
    target = second.report["targets"]["obj"]
    assert target["how"] == "corrected" and target["slices_encoded"] == 0
    assert sorted(target["conditioning_frames"]) == target["conditioning_frames"]
    # a new session on the same image (e.g. reopened, or another slice range) reuses the features too
    third = segment(volume, "medsam2", [prompts[0]], weights=str(detweights_checkpoint), session="other",
                    keep_largest=False)
    assert third.report["targets"]["obj"]["slices_encoded"] == 0
    assert np.array_equal(third.segments[0].mask, first.segments[0].mask)
    SESSIONS.close("real"), SESSIONS.close("other")


def test_a_wrong_or_damaged_checkpoint_is_refused_with_what_is_wrong(tmp_path, detweights_checkpoint):
    import torch

    from biomedseg.engine import segment

    volume = patterned_volume(DIRECTIONS[0][1])
    prompts, _, _ = case(volume, "axial")
    state = torch.load(detweights_checkpoint, weights_only=True)["model"]
    state.pop("no_obj_ptr")
    partial = tmp_path / "partial.pt"
    torch.save({"model": state}, partial)
    with pytest.raises(InputError, match="1 missing key.*no_obj_ptr"):
        segment(volume, "medsam2", [prompts[0]], weights=str(partial))
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(detweights_checkpoint.read_bytes()[:5000])
    with pytest.raises(InputError, match="damaged or partial|Could not read"):
        segment(volume, "medsam2", [prompts[0]], weights=str(damaged))


# ---- the command line ---------------------------------------------------------------------------
def test_cli_boxes_and_points_in_every_spelling_and_a_prompts_file_give_the_same_voxels(standin, tmp_path):
    import json

    import slicerio

    from biomedseg.cli import main
    from biomedseg.io import write_volume

    volume = patterned_volume(DIRECTIONS[33][1])
    image = write_volume(tmp_path / "image.nrrd", volume)
    prompts, expected, _ = case(volume, "coronal")
    box, plus, minus = prompts
    corners = ",".join(f"{v:.6f}" for v in box.ras_min + box.ras_max)
    csv = lambda p: ",".join(f"{v:.6f}" for v in p.ras)  # noqa: E731
    spellings = {
        "commas": ["--box", corners, "--point", csv(plus), "--point", csv(minus) + ",exclude"],
        "numbers": ["--box", *corners.split(","), "--point", *csv(plus).split(","),
                    "--exclude-point", *csv(minus).split(",")],
    }
    objects = {"objects": [{"target": "obj", "plane": "coronal", "boxes": [list(box.ras_min + box.ras_max)],
                            "points": [list(plus.ras)], "exclude_points": [list(minus.ras)]}]}
    (tmp_path / "prompts.json").write_text(json.dumps(objects))
    spellings["file"] = ["--prompts", str(tmp_path / "prompts.json")]
    for name, words in spellings.items():
        out = tmp_path / f"{name}.seg.nrrd"
        rc = main(["segment", str(image), "--model", MODEL, *words, "--plane", "coronal", "--target", "obj",
                   "--no-largest", "--in-process", "-q", "-o", str(out)])
        assert rc == 0, name
        seg = slicerio.read_segmentation(str(out))
        mask = np.transpose(slicerio.segment_mask(seg, "obj"), (2, 1, 0))
        from biomedseg.io.segmentation_reader import read_segments

        (read,), _ = read_segments(out, volume)
        assert np.count_nonzero(read.mask != expected) == 0, name
        assert mask.sum() == expected.sum()
    assert main(["segment", str(image), "--model", MODEL, "--box", "1,2,3", "-o", str(tmp_path / "x.seg.nrrd")]) == 2


def test_cli_refine_keeps_the_other_segments_bit_identical(standin, tmp_path, capsys):
    from biomedseg.cli import main
    from biomedseg.io import write_segmentation, write_volume
    from biomedseg.io.segmentation_reader import read_segments
    from biomedseg.segments import Segment

    volume = patterned_volume(DIRECTIONS[0][1])
    image = write_volume(tmp_path / "image.nii.gz", volume)
    liver = np.zeros(volume.shape, bool)
    liver[2:5, 3:6, 4:8] = True
    other = np.zeros(volume.shape, bool)
    other[5:8, 0:3, 0:3] = True
    write_segmentation(tmp_path / "organs.seg.nrrd", volume,
                       [Segment("liver", liver, (0.8, 0.3, 0.2)), Segment("kidney", other, (0.1, 0.5, 0.9))])
    out = tmp_path / "refined.seg.nrrd"
    assert main(["refine", str(image), "--segmentation", str(tmp_path / "organs.seg.nrrd"), "--segment", "Liver",
                 "--model", MODEL, "--no-largest", "--in-process", "-q", "-o", str(out)]) == 0
    segments, notes = read_segments(out, volume)
    by_name = {s.name: s for s in segments}
    assert set(by_name) == {"liver", "kidney"} and notes == []
    assert np.array_equal(by_name["kidney"].mask, other)
    assert np.allclose(by_name["liver"].color, (0.8, 0.3, 0.2))
    assert not np.array_equal(by_name["liver"].mask, liver) and by_name["liver"].mask.any()
    assert main(["refine", str(image), "--segmentation", str(tmp_path / "organs.seg.nrrd"), "--segment", "spleen",
                 "--model", MODEL, "--in-process", "-o", str(tmp_path / "y.seg.nrrd")]) == 2
    assert "has no segment called 'spleen'; it has 'liver', 'kidney'" in capsys.readouterr().err


def test_the_panel_correction_workflow_with_the_real_medsam2(detweights_checkpoint):
    """The Correct section's logic (real MRML scene, real worker) driving MedSAM2 itself: a box propagated
    over slices 5-24 of the phantom, then an exclude click corrected in the same worker session."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import render_correct

    run = render_correct.capture_correction(weights=str(detweights_checkpoint))
    first, second = run["first"], run["second"]
    assert first.action == "propagated" and first.image_sent and first.outside == 0
    # the click's slice lies between the box's slice and the end of the range: MedSAM2 recomputes the
    # slices from the box's (exclusive) to the range's end, as its correction policy says
    assert second.action == "corrected" and not second.image_sent and second.recomputed == 9
    assert second.summary.startswith("Corrected 'organ': 9 of 20 slices recomputed")


def test_a_click_after_a_segment_prompt_or_a_new_box_after_clicks_is_still_a_correction(standin):
    volume = patterned_volume(DIRECTIONS[0][1])
    prompts, _, _ = case(volume, "axial")
    box, plus, minus = prompts
    seg = np.zeros(volume.shape, bool)
    seg[2:5, 2:6, 3:8] = True
    first = in_process(volume, [MaskPrompt(seg, "obj")], session="k1", keep_largest=False)
    assert first.report["targets"]["obj"]["how"] == "propagated"
    click = PointPrompt(plus.ras, False, "axial", "obj")
    second = in_process(None, [MaskPrompt(seg, "obj"), click], session="k1", keep_largest=False)
    assert second.report["targets"]["obj"]["how"] == "corrected"
    third = in_process(None, [MaskPrompt(seg, "obj"), click, box], session="k1", keep_largest=False)
    assert third.report["targets"]["obj"]["how"] == "corrected"
    undone = in_process(None, [MaskPrompt(seg, "obj")], session="k1", keep_largest=False)
    assert undone.report["targets"]["obj"]["how"] == "propagated"


def test_cli_prompt_files_and_box_spellings_that_are_wrong_say_so(standin, tmp_path, capsys):
    import json

    from biomedseg.cli import main
    from biomedseg.io import write_volume

    volume = patterned_volume(DIRECTIONS[0][1])
    image = write_volume(tmp_path / "image.nrrd", volume)
    prompts, _, (_, _, inside) = case(volume, "axial")
    box = prompts[0]
    box_only = inside & (volume.array > 500)  # what the stand-in gives for the box alone
    bad = {"typo": {"objects": [{"target": "x", "box": [1, 2, 3, 4, 5, 6]}]},
           "not a list": {"objects": [{"target": "x", "boxes": 5}]},
           "five numbers": {"objects": [{"target": "x", "boxes": [[1, 2, 3, 4, 5]]}]}}
    messages = {"typo": "unknown field(s) 'box'", "not a list": "'boxes' of 'x'", "five numbers": "six RAS numbers"}
    for name, data in bad.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
        rc = main(["segment", str(image), "--model", MODEL, "--prompts", str(tmp_path / f"{name}.json"),
                   "--in-process", "-o", str(tmp_path / "x.seg.nrrd")])
        assert rc == 2 and messages[name] in capsys.readouterr().err, name
    # two corners as two triples, nested or on the command line with leading minus signs, are one box
    corners = [list(box.ras_min), list(box.ras_max)]
    (tmp_path / "nested.json").write_text(json.dumps({"objects": [{"target": "obj", "boxes": [corners]}]}))
    split = [",".join(f"{v:.6f}" for v in box.ras_min), ",".join(f"{v:.6f}" for v in box.ras_max)]
    for words in (["--prompts", str(tmp_path / "nested.json")], ["--box", *split, "--target", "obj"]):
        out = tmp_path / f"ok{len(words)}.seg.nrrd"
        assert main(["segment", str(image), "--model", MODEL, *words, "--no-largest", "--in-process", "-q",
                     "-o", str(out)]) == 0
        from biomedseg.io.segmentation_reader import read_segments

        (read,), _ = read_segments(out, volume)
        assert np.array_equal(read.mask, box_only), words
