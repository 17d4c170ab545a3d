"""Writing a model's result inside the Segment Editor's editable area, against Slicer's real MRML classes.

For every mask mode x overwrite mode (and the intensity range) the expected segments are worked
out independently in numpy from what Slicer documents, and compared voxel for voxel: the written
segment changes only inside the area (and the run's region), other segments keep every voxel
except those the overwrite mode erases, locked segments never change, and undo puts back the exact
previous state of every segment (IDs, order, voxels, names, colours, tags). The editable area
itself is Slicer's ``GenerateEditMask``; it is checked against the documented rules too.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")

from biomedseg import slicer_bridge as sb  # noqa: E402
from biomedseg.errors import InputError  # noqa: E402
from biomedseg.geometry import make_region, region_box  # noqa: E402
from biomedseg.slicer_bridge import editable as ed  # noqa: E402
from biomedseg.volume import Volume  # noqa: E402
from conftest import mrml_scene  # noqa: E402
from geometry_cases import affine  # noqa: E402

SHAPE = (12, 14, 16)  # (k, j, i)


def box(shape, lo, hi):
    m = np.zeros(shape, bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return m


def image() -> Volume:
    """A volume whose intensity rises along i (so an intensity range is a slab), LPS-stored like DICOM."""
    array = np.broadcast_to(np.arange(SHAPE[2], dtype=np.int16) * 100, SHAPE).copy()
    return Volume(array, affine(np.diag([-1.0, -1.0, 1.0]), (0.9, 1.1, 2.0), (30.0, -12.0, 5.0)), name="ct")


#: The scene's segments: A and C share a layer (disjoint), B overlaps A (its own layer), H is hidden,
#: L is locked; T is the segment the model corrects. The result R crosses all of them.
SEGMENTS = {
    "T": box(SHAPE, (2, 2, 2), (7, 8, 8)),
    "A": box(SHAPE, (4, 4, 6), (9, 10, 12)),
    "B": box(SHAPE, (3, 6, 3), (8, 12, 9)),
    "C": box(SHAPE, (9, 1, 1), (12, 5, 15)),
    "H": box(SHAPE, (5, 0, 10), (10, 6, 16)),
    "L": box(SHAPE, (6, 7, 7), (11, 13, 13)),
}
RESULT = box(SHAPE, (3, 3, 4), (11, 11, 14))


def build(scene, volume):
    node = sb.node_from_volume(scene, volume, volume.name)
    seg = sb.new_segmentation_node(scene, "seg", node)
    ids = {}
    for name, mask in SEGMENTS.items():  # one at a time, so Slicer puts disjoint ones on one layer
        ids[name] = sb.write_segments(seg, node, {name: mask})["segment_ids"][0]
    seg.GetDisplayNode().SetSegmentVisibility(ids["H"], False)
    ed.set_segment_locked(seg, ids["L"])
    return node, seg, ids


def snapshot(seg, volume) -> dict:
    """Everything a person could see of each segment: order, name, colour, tags, voxels (on the grid and in total)."""
    segmentation = seg.GetSegmentation()
    out = {}
    for n in range(segmentation.GetNumberOfSegments()):
        sid = segmentation.GetNthSegmentID(n)
        segment = segmentation.GetSegment(sid)
        own, _ = sb.segment_labelmap(seg, sid)
        tags = {t: sb.segment_tag(segment, t) for t in (ed.LOCKED_TAG, sb.terminology_tag_name())}
        out[sid] = (n, segment.GetName(), tuple(segment.GetColor()), tags,
                    sb.segment_mask(seg, sid, volume).copy(), int(own.sum()))
    return out


def assert_same(before: dict, after: dict, only=None):
    ids = only if only is not None else before
    for sid in ids:
        b, a = before[sid], after[sid]
        assert b[:4] == a[:4], sid
        assert np.array_equal(b[4], a[4]) and b[5] == a[5], f"segment {sid} changed"


def expected_area(mode: str, volume, ids, seg, target="T", mask_id=None, intensity=None):
    """The editable area from Slicer's documented rules, in numpy (independent of GenerateEditMask)."""
    visible = {n for n in SEGMENTS if n != "H"}
    if mode == "EditAllowedEverywhere":
        area = np.ones(SHAPE, bool)
    elif mode == "EditAllowedInsideAllSegments":
        area = np.any([SEGMENTS[n] for n in SEGMENTS], axis=0)
    elif mode == "EditAllowedInsideVisibleSegments":
        area = np.any([SEGMENTS[n] for n in visible], axis=0)
    elif mode == "EditAllowedOutsideAllSegments":  # the written segment itself stays editable
        area = ~np.any([SEGMENTS[n] for n in SEGMENTS if n != target], axis=0)
    elif mode == "EditAllowedOutsideVisibleSegments":
        area = ~np.any([SEGMENTS[n] for n in visible if n != target], axis=0)
    else:
        area = SEGMENTS[mask_id].copy()
    if intensity is not None:
        area &= (volume.array >= intensity[0]) & (volume.array <= intensity[1])
    return area


CASES = list(itertools.product(ed.MASK_MODES, ed.OVERWRITE_MODES))


@pytest.mark.parametrize("mode,overwrite", CASES, ids=[f"{m[11:]}-{o[9:]}" for m, o in CASES])
def test_each_mask_and_overwrite_mode_writes_only_what_slicer_allows_and_undo_is_exact(mode, overwrite):
    volume = image()
    with mrml_scene() as scene:
        node, seg, ids = build(scene, volume)
        mask_name = "A" if mode == "EditAllowedInsideSingleSegment" else None
        rules = ed.EditRules(mode, ids[mask_name] if mask_name else "", overwrite=overwrite)
        area = expected_area(mode, volume, ids, seg, mask_id=mask_name)
        # Slicer's own editable area is the documented one
        assert np.array_equal(ed.editable_area(seg, node, rules, ids["T"]), area)
        before = snapshot(seg, volume)
        record = ed.write_in_editable_area(seg, node, RESULT, segment_id=ids["T"], rules=rules)
        after = snapshot(seg, volume)

        new_t = (RESULT & area) | (SEGMENTS["T"] & ~area)
        assert np.array_equal(after[ids["T"]][4], new_t)
        written = new_t & area
        erasable = {"OverwriteAllSegments": set(SEGMENTS) - {"T", "L"},
                    "OverwriteVisibleSegments": set(SEGMENTS) - {"T", "L", "H"},
                    "OverwriteNone": set()}[overwrite]
        for name, mask in SEGMENTS.items():
            if name == "T":
                continue
            sid = ids[name]
            want = mask & ~written if name in erasable else mask
            assert np.array_equal(after[sid][4], want), (name, int(after[sid][4].sum()), int(want.sum()))
            assert after[sid][:4] == before[sid][:4]
            if not (mask & written).any() or name not in erasable:
                assert_same(before, after, [sid])  # bit-identical: not one voxel, name, colour or tag differs
        assert record["erased"] == {ids[n]: int((SEGMENTS[n] & written).sum()) for n in erasable
                                    if (SEGMENTS[n] & written).any()}
        assert record["outside"] == int((RESULT & ~area).sum())
        assert record["written"] == int((new_t != SEGMENTS["T"]).sum())

        sb.undo_segments(seg, record)
        restored = snapshot(seg, volume)
        assert list(restored) == list(before)
        assert_same(before, restored)


@pytest.mark.parametrize("overwrite", ed.OVERWRITE_MODES)
def test_intensity_range_limits_the_area_and_a_new_segment_is_one_undo_step(overwrite):
    volume = image()
    with mrml_scene() as scene:
        node, seg, ids = build(scene, volume)
        editor = slicer.vtkMRMLSegmentEditorNode()  # as the Segment Editor module makes it
        editor.SetSingletonTag(ed.SEGMENT_EDITOR_TAG)
        scene.AddNode(editor)
        rules = ed.EditRules("EditAllowedOutsideVisibleSegments", intensity_range=(500.0, 1100.0),
                             source_volume=node, overwrite=overwrite)
        ed.apply_rules(editor, rules)
        assert ed.editor_rules(scene) == rules  # the panel reads the Segment Editor's own settings
        before = snapshot(seg, volume)
        record = ed.write_in_editable_area(seg, node, RESULT, name="T")  # rules from the scene's editor node
        (new_id,) = record["segment_ids"]
        assert seg.GetSegmentation().GetSegment(new_id).GetName() == "T 2"  # 'T' is taken
        area = expected_area("EditAllowedOutsideVisibleSegments", volume, ids, seg, target=None,
                             intensity=(500, 1100))
        assert np.array_equal(sb.segment_mask(seg, new_id, node), RESULT & area)
        assert 0 < int((RESULT & area).sum()) < int(RESULT.sum())
        erasable = {"OverwriteAllSegments": {"H"}, "OverwriteVisibleSegments": set(), "OverwriteNone": set()}[overwrite]
        after = snapshot(seg, volume)
        for name, mask in SEGMENTS.items():  # outside visible segments: only the hidden one can lose voxels
            want = mask & ~(RESULT & area) if name in erasable else mask
            assert np.array_equal(after[ids[name]][4], want), name
        assert_same(before, after, [ids[n] for n in SEGMENTS if n not in erasable])
        sb.undo_segments(seg, record)
        assert_same(before, snapshot(seg, volume))
        assert seg.GetSegmentation().GetSegment(new_id) is None and len(snapshot(seg, volume)) == len(before)


def test_region_keeps_the_segment_outside_the_propagated_slices():
    volume = image()
    with mrml_scene() as scene:
        node, seg, ids = build(scene, volume)
        region = make_region("axial", (3, 5))
        crop = region_box(volume, region)
        rules = ed.EditRules(overwrite="OverwriteNone")
        ed.write_in_editable_area(seg, node, np.zeros(SHAPE, bool), segment_id=ids["T"], region=region, rules=rules)
        inside = np.zeros(SHAPE, bool)
        inside[crop.slices] = True
        assert np.array_equal(sb.segment_mask(seg, ids["T"], node), SEGMENTS["T"] & ~inside)
        assert SEGMENTS["T"][~inside].any() and SEGMENTS["T"][inside].any()


def test_locked_and_unreadable_targets_are_refused_and_change_nothing():
    volume = image()
    with mrml_scene() as scene:
        node, seg, ids = build(scene, volume)
        before = snapshot(seg, volume)
        with pytest.raises(InputError, match="'L' is locked"):
            ed.write_in_editable_area(seg, node, RESULT, segment_id=ids["L"])
        with pytest.raises(InputError, match="only inside segment 'nope'"):
            ed.write_in_editable_area(seg, node, RESULT, segment_id=ids["T"],
                                      rules=ed.EditRules("EditAllowedInsideSingleSegment", "nope"))
        with pytest.raises(InputError, match="shape"):
            ed.write_in_editable_area(seg, node, RESULT[1:], segment_id=ids["T"])
        assert_same(before, snapshot(seg, volume))
        assert len(snapshot(seg, volume)) == len(before)
        # a segment drawn on a finer grid cannot be replaced by a result on this one without resampling it
        fine = Volume(np.zeros((24, 28, 32), np.int16), volume.ijk_to_ras @ np.diag([0.5, 0.5, 0.5, 1.0]))
        fine_id = sb.write_segments(seg, fine, {"fine": box(fine.shape, (1, 1, 1), (5, 5, 5))})["segment_ids"][0]
        with pytest.raises(InputError, match="another grid"):
            ed.write_in_editable_area(seg, node, RESULT, segment_id=fine_id)
        ed.set_segment_locked(seg, ids["L"], False)
        assert not ed.is_segment_locked(seg, ids["L"])
        assert "locked" not in ed.describe_rules(ed.EditRules(), seg)
        ed.set_segment_locked(seg, ids["L"])
        assert ed.describe_rules(ed.EditRules("EditAllowedInsideSingleSegment", ids["A"], (0.0, 5.0),
                                              overwrite="OverwriteVisibleSegments"), seg) == (
            "Writes inside 'A', intensities 0 to 5; erases what it writes from the visible segments "
            "(1 locked, never changed).")


def test_editor_rules_default_to_slicer_defaults_without_a_segment_editor():
    with mrml_scene() as scene:
        assert ed.editor_rules(scene) == ed.EditRules("EditAllowedEverywhere", "", None, None, "OverwriteAllSegments")
        with pytest.raises(InputError, match="Unknown editable area"):
            ed.EditRules("Anywhere")
