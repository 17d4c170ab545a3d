"""slicer_bridge against Slicer's real MRML classes (slicer-core): no mocks.

Covers the promises the Slicer panel relies on: volume nodes become Volumes on exactly
their grid, transformed volumes are refused or hardened correctly, writing segments
never disturbs other segments (shared labelmap layers included), undo restores exactly,
and names/colours/terminology survive Slicer's own storage node.
"""
from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")
slicerio = pytest.importorskip("slicerio")

from biomedseg import slicer_bridge as sb  # noqa: E402
from biomedseg.slicer_bridge import segmentations as sbs  # noqa: E402
from biomedseg.errors import InputError  # noqa: E402
from biomedseg.segments import Segment  # noqa: E402
from biomedseg.volume import LPS_TO_RAS, Volume  # noqa: E402
from conftest import mrml_scene  # noqa: E402
from geometry_cases import affine, rotation  # noqa: E402

SHAPE = (7, 9, 11)  # (k, j, i)


ORIENTATIONS = {
    "RAS": affine(np.eye(3), (0.8, 1.2, 2.5), (-40.3, 12.7, 3.1)),
    "LPS (DICOM axial)": affine(np.diag([-1, -1, 1]), (0.7, 0.7, 3.0), (101.2, 150.9, -220.4)),
    "permuted, flipped (sagittal)": affine([[0, 0, -1], [1, 0, 0], [0, -1, 0]], (1.1, 0.9, 4.0), (5.5, -7.25, 33.0)),
    "oblique": affine(rotation((1, 2, 3), 27.0), (0.6, 1.3, 2.2), (-17.123, 44.456, -9.789)),
}


@pytest.fixture
def scene():
    """A scene with Slicer's default colour tables, as in the application."""
    with mrml_scene() as scene:
        yield scene


@pytest.fixture
def reference():
    rng = np.random.default_rng(7)
    array = rng.integers(-1000, 2000, SHAPE).astype(np.int16)
    return Volume(array, ORIENTATIONS["oblique"], name="CT chest")


def new_segmentation(scene, name="Segmentation"):
    node = slicer.vtkMRMLSegmentationNode()
    node.SetName(name)
    scene.AddNode(node)
    node.CreateDefaultDisplayNodes()
    return node


def blob_masks(shape, n, seed=0, overlap=False):
    """n random boxes; disjoint unless ``overlap`` (so Slicer can share one layer)."""
    rng = np.random.default_rng(seed)
    owner = rng.integers(0, n + 1, shape)
    masks = [owner == (t + 1) for t in range(n)]
    if overlap:
        masks = [m | (rng.random(shape) > 0.7) for m in masks]
    return masks


def snapshot(seg_node, volume):
    """Every segment's voxels on the reference grid plus its metadata, keyed by ID."""
    segmentation = seg_node.GetSegmentation()
    out = {}
    for info in sb.segments_of(seg_node):
        segment = segmentation.GetSegment(info["id"])
        out[info["id"]] = dict(info, mask=sb.segment_mask(seg_node, info["id"], volume),
                               terminology_tag=segment.GetTerminology())
    return out


def assert_same_segments(before, after, ids):
    for sid in ids:
        b, a = before[sid], after[sid]
        assert np.array_equal(b["mask"], a["mask"]), f"segment {b['name']} voxels changed"
        assert (b["name"], b["color"], b["terminology_tag"]) == (a["name"], a["color"], a["terminology_tag"])


def populated(scene, reference, shared=True, overlap=False):
    """A segmentation holding three segments the person made; collapsed into shared layers."""
    ref_node = sb.node_from_volume(scene, reference)
    seg_node = new_segmentation(scene)
    masks = blob_masks(reference.shape, 3, seed=3, overlap=overlap)
    named = [Segment("spleen", masks[0]), Segment("aorta", masks[1]), Segment("my lesion", masks[2],
                                                                              color=(0.1, 0.2, 0.3))]
    sb.write_segments(seg_node, ref_node, named)
    segmentation = seg_node.GetSegmentation()
    if shared:
        segmentation.CollapseBinaryLabelmaps(False)
        expected_layers = 1 if not overlap else segmentation.GetNumberOfLayers()
        assert segmentation.GetNumberOfLayers() == expected_layers
    else:
        for segment_id in list(segmentation.GetSegmentIDs())[1:]:
            segmentation.SeparateSegmentLabelmap(segment_id)
        assert segmentation.GetNumberOfLayers() == 3
    by_name = dict(zip(("spleen", "aorta", "my lesion"), masks))
    for sid in segmentation.GetSegmentIDs():  # each segment reads back as exactly its own voxels
        assert np.array_equal(sb.segment_mask(seg_node, sid, reference), by_name[segmentation.GetSegment(sid).GetName()])
    return ref_node, seg_node, by_name


# ---- volumes -----------------------------------------------------------------------------

@pytest.mark.parametrize("orientation", list(ORIENTATIONS))
@pytest.mark.parametrize("dtype", [np.int16, np.float32, np.uint8])
def test_volume_node_round_trip_is_exact(scene, orientation, dtype):
    m = ORIENTATIONS[orientation]
    array = (np.arange(np.prod(SHAPE)).reshape(SHAPE) % 251 - (0 if dtype == np.uint8 else 100)).astype(dtype)
    volume = Volume(array, m, name="scan")
    node = sb.node_from_volume(scene, volume)
    assert node.GetScene() is scene and node.GetName() == "scan"
    assert node.GetImageData().GetDimensions() == SHAPE[::-1]
    assert np.allclose(node.GetSpacing(), volume.spacing, rtol=0, atol=1e-12)
    back = sb.volume_from_node(node)
    assert back.array.dtype == dtype and np.array_equal(back.array, array)
    assert np.allclose(back.ijk_to_ras, m, rtol=0, atol=1e-12)
    if orientation != "oblique":
        assert np.array_equal(back.ijk_to_ras, m)
    assert back.meta["node_id"] == node.GetID() and back.name == "scan"
    # Slicer's own view of where a voxel is agrees with ours.
    ijk_to_ras = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(ijk_to_ras)
    assert np.allclose(ijk_to_ras.MultiplyPoint((3, 5, 2, 1))[:3], (m @ [3, 5, 2, 1])[:3], atol=1e-12)


def test_volume_copy_is_independent_of_the_node(scene, reference):
    node = sb.node_from_volume(scene, reference)
    volume = sb.volume_from_node(node)
    volume.array[0, 0, 0] = 12345
    assert sb.volume_from_node(node).array[0, 0, 0] == reference.array[0, 0, 0]


def test_rgb_volume_round_trip(scene):
    rgb = np.random.default_rng(1).integers(0, 256, SHAPE + (3,)).astype(np.uint8)
    volume = Volume(rgb, ORIENTATIONS["RAS"], name="photo", channels_last=True)
    node = sb.node_from_volume(scene, volume)
    assert node.IsA("vtkMRMLVectorVolumeNode")
    back = sb.volume_from_node(node)
    assert back.channels_last and np.array_equal(back.array, rgb) and np.array_equal(back.ijk_to_ras, volume.ijk_to_ras)


def test_image_extent_not_starting_at_zero(scene, reference):
    """Slicer's IJK indices count from the image extent; the Volume's array starts at its first voxel."""
    node = sb.node_from_volume(scene, reference)
    image = node.GetImageData()
    image.SetExtent(2, 2 + SHAPE[2] - 1, 3, 3 + SHAPE[1] - 1, 1, 1 + SHAPE[0] - 1)
    volume = sb.volume_from_node(node)
    assert np.array_equal(volume.array, reference.array)
    assert np.allclose(volume.ijk_to_ras @ [0, 0, 0, 1], reference.ijk_to_ras @ [2, 3, 1, 1], atol=1e-12)
    assert np.allclose(volume.ijk_to_ras[:3, :3], reference.ijk_to_ras[:3, :3], atol=1e-12)


def test_node_names_are_made_unique(scene, reference):
    first = sb.node_from_volume(scene, reference)
    second = sb.node_from_volume(scene, reference)
    assert first.GetName() == "CT chest" and second.GetName() != first.GetName()


def test_dicom_attributes_become_meta(scene, reference):
    node = sb.node_from_volume(scene, reference)
    node.SetAttribute("DICOM.instanceUIDs", "1.2.3.1 1.2.3.2")
    node.SetAttribute("DICOM.Modality", "CT")
    meta = sb.volume_from_node(node).meta
    assert meta["dicom_instance_uids"] == ["1.2.3.1", "1.2.3.2"]
    assert meta["slicer_attributes"]["DICOM.Modality"] == "CT"


def test_empty_node_is_refused(scene):
    node = slicer.vtkMRMLScalarVolumeNode()
    node.SetName("nothing")
    scene.AddNode(node)
    with pytest.raises(InputError, match="'nothing' holds no voxels"):
        sb.volume_from_node(node)


# ---- transforms --------------------------------------------------------------------------

def linear_transform_node(scene, name="Registration"):
    matrix = np.eye(4)
    matrix[:3, :3] = rotation((0, 1, 1), 20.0)
    matrix[:3, 3] = (12.5, -3.25, 40.0)
    node = slicer.vtkMRMLLinearTransformNode()
    node.SetName(name)
    scene.AddNode(node)
    node.SetMatrixTransformToParent(sb.numpy_to_matrix(matrix))
    return node, matrix


def test_transformed_volume_is_refused_by_default(scene, reference):
    node = sb.node_from_volume(scene, reference)
    transform, _ = linear_transform_node(scene)
    node.SetAndObserveTransformNodeID(transform.GetID())
    with pytest.raises(InputError, match="under transform 'Registration'.*harden"):
        sb.volume_from_node(node)


def test_transformed_volume_hardened_on_request(scene, reference):
    node = sb.node_from_volume(scene, reference)
    outer, outer_m = linear_transform_node(scene, "Outer")
    inner, inner_m = linear_transform_node(scene, "Inner")
    inner.SetAndObserveTransformNodeID(outer.GetID())
    node.SetAndObserveTransformNodeID(inner.GetID())
    volume = sb.volume_from_node(node, harden_transform=True)
    assert np.array_equal(volume.array, reference.array)
    assert volume.meta["hardened_transform"] == "Inner"
    # A voxel's world position as Slicer's transform pipeline computes it.
    ijk = np.array([4.0, 2.0, 5.0, 1.0])
    local = reference.ijk_to_ras @ ijk
    to_world = vtk.vtkGeneralTransform()
    inner.GetTransformToWorld(to_world)
    expected = np.array(to_world.TransformPoint(local[:3]))
    assert np.allclose((volume.ijk_to_ras @ ijk)[:3], expected, atol=1e-9)
    assert np.allclose(expected, (outer_m @ inner_m @ local)[:3], atol=1e-9)
    # ... and as Slicer's own Harden Transform leaves the node.
    assert node.HardenTransform()
    assert np.allclose(sb.volume_from_node(node).ijk_to_ras, volume.ijk_to_ras, atol=1e-9)


def test_nonlinear_transform_is_refused_even_when_hardening(scene, reference):
    node = sb.node_from_volume(scene, reference)
    warp = slicer.vtkMRMLTransformNode()
    warp.SetName("Warp")
    scene.AddNode(warp)
    tps = vtk.vtkThinPlateSplineTransform()
    source, target = vtk.vtkPoints(), vtk.vtkPoints()
    for p in [(0, 0, 0), (30, 0, 0), (0, 30, 0), (0, 0, 30), (20, 20, 20)]:
        source.InsertNextPoint(p)
        target.InsertNextPoint(p[0] + 2.0 * (p[1] > 0), p[1], p[2])
    tps.SetSourceLandmarks(source)
    tps.SetTargetLandmarks(target)
    tps.SetBasisToR()
    warp.SetAndObserveTransformToParent(tps)
    node.SetAndObserveTransformNodeID(warp.GetID())
    with pytest.raises(InputError, match="non-linear .*'Warp'"):
        sb.volume_from_node(node, harden_transform=True)


# ---- markups as prompts ------------------------------------------------------------------

def test_markups_become_typed_prompts_in_world_ras(scene):
    """An ROI is a box (2D on a plane, or 3D), point lists are clicks; positions are world RAS, so a
    parent transform is applied, as the slice views show them."""
    from biomedseg.prompts import BoxPrompt, PointPrompt

    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    roi.SetCenter(10.0, -5.0, 3.0)
    roi.SetSize(4.0, 6.0, 8.0)
    (box,) = sb.prompts_from_markups(roi, target="lesion", plane=None)
    assert box == BoxPrompt((8.0, -8.0, -1.0), (12.0, -2.0, 7.0), None, "lesion")
    assert sb.prompts_from_markups(roi, target="lesion")[0].plane == "axial"
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "clicks")
    points.AddControlPoint(1.0, 2.0, 3.0)
    points.AddControlPoint(-4.0, 5.0, 6.0)
    transform, matrix = linear_transform_node(scene)
    points.SetAndObserveTransformNodeID(transform.GetID())
    found = sb.prompts_from_markups(points, target="lesion", plane="coronal", include=False)
    expected = [(matrix @ np.array([*p, 1.0]))[:3] for p in ((1.0, 2.0, 3.0), (-4.0, 5.0, 6.0))]
    assert [type(p) for p in found] == [PointPrompt, PointPrompt]
    assert all(not p.include and p.plane == "coronal" and p.target == "lesion" for p in found)
    for prompt, position in zip(found, expected):
        assert np.allclose(prompt.ras, position, atol=1e-9)
    empty = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "none")
    with pytest.raises(InputError, match="'none' has no points"):
        sb.prompts_from_markups(empty)
    line = scene.AddNewNodeByClass("vtkMRMLMarkupsLineNode", "ruler")
    with pytest.raises(InputError, match="use an ROI \\(a box\\) or a point list"):
        sb.prompts_from_markups(line)


# ---- writing segments --------------------------------------------------------------------

def test_add_writes_names_colours_terminology_and_exact_voxels(scene, reference):
    ref_node = sb.node_from_volume(scene, reference)
    seg_node = new_segmentation(scene)
    masks = blob_masks(reference.shape, 2, seed=1, overlap=True)
    record = sb.write_segments(seg_node, ref_node, {"liver": masks[0], "left kidney": masks[1]})
    assert list(record["prior"].values()) == [None, None] and len(record["segment_ids"]) == 2
    info = sb.segments_of(seg_node)
    assert [s["name"] for s in info] == ["liver", "left kidney"]
    assert info[0]["terminology"]["type"][2] == "Liver"
    assert info[1]["terminology"]["typeModifier"][2] == "Left"
    assert all(c > 0 for c in info[0]["color"])
    segmentation = seg_node.GetSegmentation()
    tag = vtk.reference("")
    assert segmentation.GetSegment(record["segment_ids"][0]).GetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), tag)
    assert "^10200004^Liver" in str(tag)
    for sid, mask in zip(record["segment_ids"], masks):
        assert np.array_equal(sb.segment_mask(seg_node, sid, ref_node), mask)
    expected_geometry = sb.reference_geometry_parameter(reference.ijk_to_ras, reference.shape)
    stored = segmentation.GetConversionParameter(sb.REFERENCE_GEOMETRY)
    assert np.allclose([float(v) for v in stored.split(";")[:-1]],
                       [float(v) for v in expected_geometry.split(";")[:-1]], atol=1e-9)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("overlap", [False, True])
def test_add_leaves_other_segments_bit_identical(scene, reference, shared, overlap):
    ref_node, seg_node, _ = populated(scene, reference, shared=shared, overlap=overlap)
    before = snapshot(seg_node, reference)
    everything = np.ones(reference.shape, bool)  # overlaps every other segment
    record = sb.write_segments(seg_node, ref_node, {"spleen": everything, "tumour": everything[::-1].copy()})
    after = snapshot(seg_node, reference)
    assert_same_segments(before, after, before)
    new_names = [after[sid]["name"] for sid in record["segment_ids"]]
    assert new_names == ["spleen 2", "tumour"]
    for sid in record["segment_ids"]:
        assert after[sid]["mask"].all()


@pytest.mark.parametrize("shared", [True, False])
def test_overwrite_replaces_in_place_and_leaves_others_alone(scene, reference, shared):
    ref_node, seg_node, masks = populated(scene, reference, shared=shared)
    before = snapshot(seg_node, reference)
    ids = list(seg_node.GetSegmentation().GetSegmentIDs())
    new_mask = np.zeros(reference.shape, bool)
    new_mask[1:5, 2:8, 3:9] = True  # overlaps the aorta and the lesion
    record = sb.write_segments(seg_node, ref_node, {"spleen": new_mask}, mode="overwrite")
    spleen_id = ids[0]
    assert record["segment_ids"] == [spleen_id]
    assert list(seg_node.GetSegmentation().GetSegmentIDs()) == ids  # same IDs, same order
    after = snapshot(seg_node, reference)
    assert np.array_equal(after[spleen_id]["mask"], new_mask)
    assert after[spleen_id]["color"] == before[spleen_id]["color"]
    assert_same_segments(before, after, ids[1:])


@pytest.mark.parametrize("shared", [True, False])
def test_overwrite_removes_voxels_outside_the_new_grid(scene, reference, shared):
    """A segment drawn on a larger image loses its old voxels everywhere, not just inside the new grid."""
    big_m = reference.ijk_to_ras @ np.array([[1, 0, 0, -3], [0, 1, 0, -2], [0, 0, 1, -4], [0, 0, 0, 1.0]])
    big = Volume(np.zeros((15, 13, 17), np.int16), big_m)
    seg_node = new_segmentation(scene)
    sb.write_segments(seg_node, big, {"liver": np.ones(big.shape, bool), "other": np.zeros(big.shape, bool)})
    if shared:
        seg_node.GetSegmentation().CollapseBinaryLabelmaps(False)
    new_mask = blob_masks(reference.shape, 1, seed=4)[0]
    sid = sb.write_segments(seg_node, reference, {"liver": new_mask}, mode="overwrite")["segment_ids"][0]
    expected = np.zeros(big.shape, bool)
    expected[4:4 + reference.shape[0], 2:2 + reference.shape[1], 3:3 + reference.shape[2]] = new_mask
    assert np.array_equal(sb.segment_mask(seg_node, sid, big), expected)
    # An empty segment overwritten and undone is empty again.
    other_id = seg_node.GetSegmentation().GetSegmentIdBySegmentName("other")
    record = sb.write_segments(seg_node, reference, {"other": new_mask}, mode="overwrite")
    assert record["segment_ids"] == [other_id] and sb.segment_mask(seg_node, other_id, reference).any()
    sb.undo_segments(seg_node, record)
    assert not sb.segment_mask(seg_node, other_id, big).any()
    assert np.array_equal(sb.segment_mask(seg_node, sid, big), expected)


def test_overwrite_applies_colour_given_explicitly_and_adds_missing(scene, reference):
    ref_node, seg_node, masks = populated(scene, reference)
    record = sb.write_segments(seg_node, reference, [Segment("aorta", masks["aorta"], color=(1.0, 0.0, 0.5)),
                                                     Segment("liver", masks["spleen"])], mode="overwrite")
    info = {s["id"]: s for s in sb.segments_of(seg_node)}
    aorta_id, liver_id = record["segment_ids"]
    assert info[aorta_id]["color"] == (1.0, 0.0, 0.5)
    assert record["prior"][liver_id] is None and info[liver_id]["name"] == "liver"
    assert len(info) == 4


@pytest.mark.parametrize("mode", ["add", "overwrite"])
@pytest.mark.parametrize("shared", [True, False])
def test_undo_restores_exactly(scene, reference, mode, shared):
    ref_node, seg_node, masks = populated(scene, reference, shared=shared, overlap=True)
    before = snapshot(seg_node, reference)
    ids_before = list(seg_node.GetSegmentation().GetSegmentIDs())
    rng = np.random.default_rng(5)
    record = sb.write_segments(seg_node, ref_node, [
        Segment("my lesion", rng.random(reference.shape) > 0.5, color=(0.9, 0.9, 0.1),
                terminology={"category": ["SCT", "49755003", "Morphologically Altered Structure"],
                             "type": ["SCT", "4147007", "Mass"]}),
        Segment("spleen", rng.random(reference.shape) > 0.3),
        Segment("brand new", rng.random(reference.shape) > 0.9)], mode=mode)
    assert len(record["segment_ids"]) == 3
    if mode == "overwrite":  # the write really changed the person's segments
        assert record["segment_ids"][:2] == [ids_before[2], ids_before[0]]
        changed = snapshot(seg_node, reference)
        assert changed[ids_before[2]]["color"] == (0.9, 0.9, 0.1)
        assert not np.array_equal(changed[ids_before[0]]["mask"], before[ids_before[0]]["mask"])
    else:
        assert seg_node.GetSegmentation().GetNumberOfSegments() == 6
    sb.undo_segments(seg_node, record)
    assert list(seg_node.GetSegmentation().GetSegmentIDs()) == ids_before
    after = snapshot(seg_node, reference)
    assert_same_segments(before, after, ids_before)


def test_write_refuses_surface_segmentations(scene, reference):
    seg_node = new_segmentation(scene)
    sphere = vtk.vtkSphereSource()
    sphere.SetCenter(*reference.origin)
    sphere.SetRadius(3)
    sphere.Update()
    seg_node.AddSegmentFromClosedSurfaceRepresentation(sphere.GetOutput(), "model")
    seg_node.SetSourceRepresentationToClosedSurface()
    with pytest.raises(InputError, match="stored as 'Closed surface'"):
        sb.write_segments(seg_node, reference, {"liver": np.ones(reference.shape, bool)})
    assert seg_node.GetSegmentation().GetNumberOfSegments() == 1


@pytest.mark.parametrize("mode", ["add", "overwrite"])
def test_failed_write_leaves_the_segmentation_as_it_was(scene, reference, monkeypatch, mode):
    ref_node, seg_node, masks = populated(scene, reference)
    before = snapshot(seg_node, reference)
    real, calls = sbs._replace_labelmap, []

    def refuse_second(node, segment_id, labelmap):
        calls.append(segment_id)
        if len(calls) == 2:
            raise InputError("Slicer refused the labelmap")
        real(node, segment_id, labelmap)

    monkeypatch.setattr(sbs, "_replace_labelmap", refuse_second)
    with pytest.raises(InputError, match="refused"):
        sb.write_segments(seg_node, ref_node, {"spleen": ~masks["spleen"], "aorta": ~masks["aorta"]}, mode=mode)
    monkeypatch.setattr(sbs, "_replace_labelmap", real)
    after = snapshot(seg_node, reference)
    assert list(after) == list(before)
    assert_same_segments(before, after, before)


def test_write_refuses_bad_input(scene, reference):
    seg_node = new_segmentation(scene)
    with pytest.raises(InputError, match="Unknown write mode"):
        sb.write_segments(seg_node, reference, {"liver": np.zeros(reference.shape, bool)}, mode="merge")
    with pytest.raises(InputError, match="shape"):
        sb.write_segments(seg_node, reference, {"liver": np.zeros((2, 2, 2), bool)})
    assert seg_node.GetSegmentation().GetNumberOfSegments() == 0


def test_segmentation_under_transform_keeps_world_positions(scene, reference):
    ref_node = sb.node_from_volume(scene, reference)
    seg_node = new_segmentation(scene)
    transform, matrix = linear_transform_node(scene)
    seg_node.SetAndObserveTransformNodeID(transform.GetID())
    mask = blob_masks(reference.shape, 1, seed=9)[0]
    record = sb.write_segments(seg_node, ref_node, {"liver": mask})
    sid = record["segment_ids"][0]
    assert np.array_equal(sb.segment_mask(seg_node, sid, reference), mask)
    # Stored in the segmentation's own frame: transform-to-world undoes the placement.
    local = slicer.vtkOrientedImageData()
    slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(seg_node, sid, local, False)
    _, local_matrix = sbs._oriented_to_array(local)
    assert np.allclose(matrix @ local_matrix, reference.ijk_to_ras @ _shift(local, local_matrix), atol=1e-9)


def _shift(image, matrix):
    """Index offset of a (possibly cropped) labelmap inside the reference grid."""
    e = image.GetExtent()
    m = np.eye(4)
    m[:3, 3] = (e[0], e[2], e[4])
    return m


# ---- reading segments --------------------------------------------------------------------

def test_segment_mask_on_a_cropped_grid_and_a_finer_grid(scene, reference):
    ref_node = sb.node_from_volume(scene, reference)
    seg_node = new_segmentation(scene)
    mask = blob_masks(reference.shape, 1, seed=2)[0]
    sid = sb.write_segments(seg_node, ref_node, {"liver": mask})["segment_ids"][0]
    # Same lattice, smaller box: copied by index offsets.
    crop = np.eye(4)
    crop[:3, 3] = (2, 3, 1)  # i, j, k offset
    cropped = Volume(reference.array[1:5, 3:8, 2:9], reference.ijk_to_ras @ crop)
    assert np.array_equal(sb.segment_mask(seg_node, sid, cropped), mask[1:5, 3:8, 2:9])
    # Twice as fine, offset by a quarter voxel so every centre falls strictly inside one coarse voxel.
    fine_m = reference.ijk_to_ras.copy()
    fine_m[:3, :3] /= 2
    fine_m[:3, 3] = (reference.ijk_to_ras @ [-0.25, -0.25, -0.25, 1])[:3]
    fine_shape = tuple(2 * s for s in reference.shape)
    fine = Volume(np.zeros(fine_shape, np.uint8), fine_m)
    k, j, i = np.indices(fine_shape)
    expected = mask[k // 2, j // 2, i // 2]
    assert np.array_equal(sb.segment_mask(seg_node, sid, fine), expected)


def test_segment_mask_unknown_id(scene, reference):
    seg_node = new_segmentation(scene)
    with pytest.raises(InputError, match="no segment with ID 'nope'"):
        sb.segment_mask(seg_node, "nope", reference)


def test_export_to_labelmap_node_is_exact(scene, reference):
    ref_node, seg_node, masks = populated(scene, reference)
    ids = list(seg_node.GetSegmentation().GetSegmentIDs())
    labelmap_node = sb.export_to_labelmap_node(scene, seg_node, ref_node)
    assert labelmap_node.IsA("vtkMRMLLabelMapVolumeNode") and labelmap_node.GetScene() is scene
    labels = sb.volume_from_node(labelmap_node)
    assert labels.shape == reference.shape
    assert np.allclose(labels.ijk_to_ras, reference.ijk_to_ras, atol=1e-9)
    expected = np.zeros(reference.shape, int)
    for value, name in enumerate(("spleen", "aorta", "my lesion"), start=1):
        expected[masks[name]] = value
    assert np.array_equal(labels.array, expected)
    # A subset, in the order asked for.
    subset = sb.volume_from_node(sb.export_to_labelmap_node(scene, seg_node, ref_node, [ids[2], ids[0]]))
    assert np.array_equal(subset.array, np.where(masks["my lesion"], 1, np.where(masks["spleen"], 2, 0)))
    with pytest.raises(InputError, match="no segments with IDs"):
        sb.export_to_labelmap_node(scene, seg_node, ref_node, ["missing"])


# ---- files -------------------------------------------------------------------------------

def test_save_and_read_back_with_slicerio_and_storage_node(scene, reference, tmp_path):
    ref_node, seg_node, masks = populated(scene, reference, overlap=True)
    written = sb.segments_of(seg_node)
    path = sb.save_segmentation(seg_node, tmp_path / "out" / "result.seg.nrrd")
    assert path.is_file() and sorted(p.name for p in path.parent.iterdir()) == ["result.seg.nrrd"]

    # slicerio: names, colours, terminology, and voxels evaluated in patient space.
    data = slicerio.read_segmentation(str(path))
    assert [s["name"] for s in data["segments"]] == ["spleen", "aorta", "my lesion"]
    for seg_info, mine in zip(data["segments"], written):
        assert np.allclose(seg_info["color"], mine["color"], atol=1e-6)
        assert seg_info["terminology"] == mine["terminology"]
        read_mask = _slicerio_mask(data, seg_info)
        on_grid = _place_on_reference(read_mask, LPS_TO_RAS @ np.asarray(data["ijkToLPS"]), reference)
        assert np.array_equal(on_grid, masks[seg_info["name"]])
    assert data["segments"][2]["terminology"] == written[2]["terminology"]

    # Slicer's own storage node, into a fresh scene.
    other = slicer.vtkMRMLScene()
    loaded = sb.load_segmentation(other, path)
    assert loaded.GetScene() is other
    read_back = sb.segments_of(loaded)
    assert [s["name"] for s in read_back] == ["spleen", "aorta", "my lesion"]
    assert [s["id"] for s in read_back] == [s["id"] for s in written]
    for mine, theirs in zip(written, read_back):
        assert np.allclose(mine["color"], theirs["color"], atol=1e-6)
        assert mine["terminology"] == theirs["terminology"]
        assert np.array_equal(sb.segment_mask(loaded, theirs["id"], reference), masks[mine["name"]])


def _slicerio_mask(data, seg_info):
    voxels = data["voxels"]  # (i, j, k) or, with several layers, (layer, i, j, k)
    if voxels.ndim == 4:
        voxels = voxels[seg_info.get("layer", 0)]
    return np.transpose(voxels == seg_info["labelValue"], (2, 1, 0))  # (i, j, k) -> (k, j, i)


def _place_on_reference(mask, ijk_to_ras, reference):
    """Put a (k, j, i) mask read from a file (maybe cropped) onto the reference grid by position."""
    placed = sbs._copy_on_same_lattice(mask, ijk_to_ras, reference)
    assert placed is not None, "file grid is not on the reference lattice"
    assert placed.sum() == mask.sum(), "file holds voxels outside the reference grid"
    return placed


def test_save_refuses_other_suffixes(scene, tmp_path):
    seg_node = new_segmentation(scene)
    with pytest.raises(InputError, match=r"\.seg\.nrrd"):
        sb.save_segmentation(seg_node, tmp_path / "x.nii.gz")
    with pytest.raises(InputError, match="does not exist"):
        sb.load_segmentation(scene, tmp_path / "missing.seg.nrrd")
