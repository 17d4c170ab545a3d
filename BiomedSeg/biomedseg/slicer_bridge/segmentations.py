"""Writing engine segments into a segmentation node, and undoing it exactly.

Segments get names, colours and terminology; labelmaps are stored in the segmentation node's
own frame, as Slicer expects; every write returns a record that restores what it touched
(added segments removed, overwritten ones restored voxel for voxel), and writes respect
shared labelmap layers.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np

from ..errors import InputError
from ..segments import Segment, prepare_segments
from ..volume import Volume
from .volumes import image_data_from_array, matrix_to_numpy, node_label, numpy_to_matrix, world_to_node_frame, volume_from_node


#: Name of Slicer's binary labelmap representation.
BINARY_LABELMAP = "Binary labelmap"
#: Where Slicer keeps the reference grid of a segmentation.
REFERENCE_GEOMETRY = "Reference image geometry"


def ensure_converter_rules() -> None:
    """Register Slicer's labelmap/surface conversion rules once.

    The Segmentations module does this when Slicer starts; outside the application (tests,
    scripts) segmentations cannot even create an empty labelmap without them.
    """
    import slicer

    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    try:
        present = {rule.GetClassName() for rule in factory.GetConverterRules()}
    except (AttributeError, TypeError):  # pragma: no cover - unwrapped list: the application registered them
        return
    for name in ("vtkBinaryLabelmapToClosedSurfaceConversionRule", "vtkClosedSurfaceToBinaryLabelmapConversionRule",
                 "vtkClosedSurfaceToFractionalLabelmapConversionRule",
                 "vtkFractionalLabelmapToClosedSurfaceConversionRule"):
        if name not in present and hasattr(slicer, name):
            factory.RegisterConverterRule(getattr(slicer, name)())


def as_reference_volume(reference) -> Volume:
    """Node or Volume -> Volume in world RAS (a linear parent transform of a node is applied)."""
    if isinstance(reference, Volume):
        return reference
    return volume_from_node(reference, harden_transform=True)


def _oriented_image(mask: np.ndarray, ijk_to_frame: np.ndarray):
    """Boolean (k, j, i) mask -> vtkOrientedImageData (uint8 0/1) with the given geometry."""
    import slicer

    image = image_data_from_array(np.asarray(mask, dtype=np.uint8), 1, slicer.vtkOrientedImageData())
    image.SetImageToWorldMatrix(numpy_to_matrix(ijk_to_frame))
    return image


def _oriented_to_array(image) -> tuple[np.ndarray, np.ndarray]:
    """vtkOrientedImageData -> ((k, j, i) array copy, 4x4 matrix of its first voxel's index).

    The matrix maps (i, j, k) counted from the start of the image's extent, so the pair is
    self-contained even when Slicer cropped the labelmap to a sub-extent.
    """
    from vtkmodules.util.numpy_support import vtk_to_numpy

    import vtk

    m = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(m)
    matrix = matrix_to_numpy(m)
    e = image.GetExtent()
    nx, ny, nz = e[1] - e[0] + 1, e[3] - e[2] + 1, e[5] - e[4] + 1
    if min(nx, ny, nz) <= 0 or image.GetPointData().GetScalars() is None:
        return np.zeros((0, 0, 0), np.uint8), matrix
    matrix[:3, 3] = (matrix @ np.array([e[0], e[2], e[4], 1.0]))[:3]
    array = np.array(vtk_to_numpy(image.GetPointData().GetScalars()).reshape(nz, ny, nx), copy=True)
    return array, matrix


def reference_geometry_parameter(ijk_to_frame: np.ndarray, shape: tuple[int, int, int]) -> str:
    """Slicer's serialized reference geometry for a grid (as the segmentation stores it)."""
    import slicer

    k, j, i = shape
    return slicer.vtkSegmentationConverter.SerializeImageGeometry(
        numpy_to_matrix(ijk_to_frame), [0, i - 1, 0, j - 1, 0, k - 1])


def _set_reference_geometry(segmentation_node, reference, ijk_to_frame: np.ndarray, shape) -> None:
    """Point the segmentation at the image it was computed on (node reference when we have one)."""
    if not isinstance(reference, Volume):
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference)
        return
    segmentation_node.GetSegmentation().SetConversionParameter(
        REFERENCE_GEOMETRY, reference_geometry_parameter(ijk_to_frame, shape))


def terminology_tag_name() -> str:
    import slicer

    getter = getattr(slicer.vtkSegment, "GetTerminologyEntryTagName", None)
    return getter() if getter else "TerminologyEntry"


def terminology_to_tag(terminology: dict) -> str:
    """slicerio-style terminology dict -> Slicer's TerminologyEntry tag string."""
    from slicerio.segmentation import terminology_entry_to_string

    return terminology_entry_to_string(terminology)


def terminology_from_tag(tag: str) -> dict | None:
    if not tag:
        return None
    from slicerio.segmentation import terminology_entry_from_string

    return terminology_entry_from_string(tag)


def _unique_segment_name(segmentation, name: str) -> str:
    """'liver', then 'liver 2', 'liver 3': Slicer allows duplicates but people cannot tell them apart."""
    taken = {segmentation.GetNthSegment(n).GetName() for n in range(segmentation.GetNumberOfSegments())}
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name} {n}"
    return candidate


def segment_labelmap(segmentation_node, segment_id: str, world: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """One segment's own voxels: (boolean (k, j, i) array, 4x4 matrix of its index (0, 0, 0)).

    Slicer keeps non-overlapping segments in one shared labelmap, each under its own label
    value, and its logic hands out that whole layer; only voxels holding this segment's
    value belong to it. ``world=False`` keeps the segmentation node's own frame.
    """
    import slicer

    segmentation = segmentation_node.GetSegmentation()
    segment = segmentation.GetSegment(segment_id)
    if segment is None:
        raise InputError(f"'{node_label(segmentation_node)}' has no segment with ID '{segment_id}'.")
    if not segmentation.ContainsRepresentation(BINARY_LABELMAP):
        segmentation_node.CreateBinaryLabelmapRepresentation()
    labelmap = slicer.vtkOrientedImageData()
    if not slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
            segmentation_node, segment_id, labelmap, world):
        raise InputError(f"Segment '{segment.GetName()}' of '{node_label(segmentation_node)}' has no binary labelmap.")
    array, matrix = _oriented_to_array(labelmap)
    return array == segment.GetLabelValue(), matrix


def _segment_state(segmentation_node, segment_id: str) -> dict:
    """Everything needed to put a segment back: its own voxels and its metadata, as copies."""
    import slicer

    metadata = slicer.vtkSegment()
    metadata.DeepCopyMetadata(segmentation_node.GetSegmentation().GetSegment(segment_id))
    mask, matrix = segment_labelmap(segmentation_node, segment_id, world=False)
    return {"name": metadata.GetName(), "metadata": metadata, "mask": mask, "matrix": matrix}


def segment_tag(segment, name: str) -> str:
    """A segment tag's value, '' when absent (the wrapped GetTag fills an output argument)."""
    import vtk

    value = vtk.reference("")
    return str(value) if segment.GetTag(name, value) else ""


def _apply_properties(segment, seg: Segment, tag_name: str) -> None:
    segment.SetColor(*seg.color)
    segment.SetColorAutoGenerated(False)
    segment.SetNameAutoGenerated(False)
    if seg.terminology:
        segment.SetTag(tag_name, terminology_to_tag(seg.terminology))


def _replace_labelmap(segmentation_node, segment_id: str, labelmap) -> None:
    """Replace one segment's voxels everywhere, leaving segments that share its layer untouched.

    Slicer's replace mode (no extent given) drops the old voxels even outside the new
    labelmap, and moves the segment to a layer of its own where writing it in place would
    overwrite a neighbour.
    """
    import slicer

    logic = slicer.vtkSlicerSegmentationsModuleLogic
    if not logic.SetBinaryLabelmapToSegment(labelmap, segmentation_node, segment_id, logic.MODE_REPLACE):
        raise InputError(f"Slicer refused the labelmap for segment '{segment_id}' of "
                         f"'{node_label(segmentation_node)}'.")


def _require_labelmap_source(segmentation_node) -> None:
    """Refuse to add voxels to a segmentation whose segments are surfaces (converting would alter them)."""
    segmentation = segmentation_node.GetSegmentation()
    getter = getattr(segmentation, "GetSourceRepresentationName", None) or segmentation.GetMasterRepresentationName
    source = getter()
    if not source or segmentation.GetNumberOfSegments() == 0:
        setter = getattr(segmentation, "SetSourceRepresentationName", None) or segmentation.SetMasterRepresentationName
        setter(BINARY_LABELMAP)
    elif source != BINARY_LABELMAP:
        raise InputError(f"The segments of '{node_label(segmentation_node)}' are stored as '{source}', not as voxels; "
                         "choose another segmentation, or make 'Binary labelmap' the source representation "
                         "(Segmentations module, Representations) first.")


def write_segments(segmentation_node, reference, segments: Mapping[str, np.ndarray] | Iterable[Segment],
                   mode: str = "add") -> dict:
    """Write engine masks into a segmentation node; returns an undo record.

    ``reference`` (volume node or ``Volume``) is the grid the masks were computed on.
    ``mode='add'`` creates new segments ('liver 2' when 'liver' exists); ``'overwrite'``
    replaces the voxels of the segment with the same name in place (same ID; its colour
    and terminology change only when the caller gave them) and adds the ones not found.
    Other segments are never touched. Record: ``{"segment_ids": [...], "prior": {id:
    None | state}}`` -- give it to ``undo_segments``. If Slicer refuses one segment, the
    ones already written are undone before the error is raised.
    """
    if mode not in ("add", "overwrite"):
        raise InputError(f"Unknown write mode '{mode}'; use 'add' or 'overwrite'.")
    ensure_converter_rules()
    given = list(segments.values()) if isinstance(segments, Mapping) else list(segments)
    explicit = {s.name for s in given if isinstance(s, Segment) and (s.color is not None or s.terminology is not None)}
    volume = as_reference_volume(reference)
    prepared = prepare_segments(segments, volume.shape, where=f"'{node_label(segmentation_node)}'")
    ijk_to_frame = world_to_node_frame(segmentation_node) @ volume.ijk_to_ras
    segmentation = segmentation_node.GetSegmentation()
    tag_name = terminology_tag_name()
    record: dict = {"segment_ids": [], "prior": {}}
    if not segmentation.GetConversionParameter(REFERENCE_GEOMETRY) or segmentation.GetNumberOfSegments() == 0:
        _set_reference_geometry(segmentation_node, reference, ijk_to_frame, volume.shape)
    _require_labelmap_source(segmentation_node)
    try:
        for seg in prepared:
            record["segment_ids"].append(_write_one(segmentation_node, seg, ijk_to_frame, mode,
                                                    seg.name in explicit, tag_name, record["prior"]))
    except BaseException:
        undo_segments(segmentation_node, record)
        raise
    segmentation_node.Modified()
    return record


def _write_one(segmentation_node, seg: Segment, ijk_to_frame: np.ndarray, mode: str, explicit: bool,
               tag_name: str, prior: dict) -> str:
    """Write one segment, noting its prior state in ``prior`` before touching it; returns its ID."""
    segmentation = segmentation_node.GetSegmentation()
    labelmap = _oriented_image(seg.mask, ijk_to_frame)
    existing = segmentation.GetSegmentIdBySegmentName(seg.name) if mode == "overwrite" else ""
    if existing:
        prior[existing] = _segment_state(segmentation_node, existing)
        if explicit:
            _apply_properties(segmentation.GetSegment(existing), seg, tag_name)
        _replace_labelmap(segmentation_node, existing, labelmap)
        return existing
    name = _unique_segment_name(segmentation, seg.name)
    segment_id = segmentation.AddEmptySegment("", name, list(seg.color))
    if not segment_id:
        raise InputError(f"Slicer could not add segment '{name}' to '{node_label(segmentation_node)}'.")
    prior[segment_id] = None
    _apply_properties(segmentation.GetSegment(segment_id), seg, tag_name)
    _replace_labelmap(segmentation_node, segment_id, labelmap)
    return segment_id


def undo_segments(segmentation_node, undo_record: dict) -> None:
    """Put back what ``write_segments`` changed: remove added segments, restore overwritten ones.

    Later edits of those same segments are discarded with it; other segments are not touched.
    """
    segmentation = segmentation_node.GetSegmentation()
    for segment_id in reversed(list(undo_record["prior"])):
        state = undo_record["prior"][segment_id]
        if state is None:
            if segmentation.GetSegment(segment_id) is not None:
                segmentation.RemoveSegment(segment_id)
            continue
        segment = segmentation.GetSegment(segment_id)
        if segment is None:
            raise InputError(f"Cannot undo: segment '{state['name']}' was deleted since it was written.")
        _restore_state(segmentation_node, segment_id, state)
    segmentation_node.Modified()


def _restore_state(segmentation_node, segment_id: str, state: dict) -> None:
    """Metadata first (keeping the layer's label value), then the voxels."""
    import slicer

    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    label_value = segment.GetLabelValue()
    segment.DeepCopyMetadata(state["metadata"])
    segment.SetLabelValue(label_value)
    if state["mask"].size == 0:
        slicer.vtkSlicerSegmentationsModuleLogic.ClearSegment(segmentation_node, segment_id)
    else:
        _replace_labelmap(segmentation_node, segment_id, _oriented_image(state["mask"], state["matrix"]))


def segment_mask(segmentation_node, segment_id: str, reference_volume) -> np.ndarray:
    """One segment as a boolean (k, j, i) array on ``reference_volume``'s grid (world RAS).

    Same-lattice labelmaps (the usual case) are copied voxel for voxel; others are
    resampled by nearest neighbour, the way Slicer itself exports them.
    """
    import slicer

    volume = as_reference_volume(reference_volume)
    array, matrix = segment_labelmap(segmentation_node, segment_id, world=True)
    placed = _copy_on_same_lattice(array, matrix, volume)
    if placed is not None:
        return placed
    reference = _oriented_image(np.zeros(volume.shape, np.uint8), volume.ijk_to_ras)
    resampled = slicer.vtkOrientedImageData()
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        _oriented_image(array, matrix), reference, resampled)
    out, _ = _oriented_to_array(resampled)
    return out.reshape(volume.shape) > 0


def _copy_on_same_lattice(array: np.ndarray, matrix: np.ndarray, volume: Volume, tol: float = 1e-4):
    """Place a labelmap on the reference grid by index offsets when both share one lattice.

    Returns None when the axes, spacing or sub-voxel origin differ (resampling needed).
    """
    if not np.allclose(matrix[:3, :3], volume.ijk_to_ras[:3, :3], atol=tol * volume.spacing.min()):
        return None
    offset = np.linalg.solve(volume.ijk_to_ras[:3, :3], matrix[:3, 3] - volume.ijk_to_ras[:3, 3])
    shift = np.round(offset)
    if not np.allclose(offset, shift, atol=tol):
        return None
    out = np.zeros(volume.shape, dtype=bool)
    if array.size == 0:
        return out
    di, dj, dk = (int(s) for s in shift)
    src, dst = [], []
    for start, n_src, n_dst in ((dk, array.shape[0], volume.shape[0]), (dj, array.shape[1], volume.shape[1]),
                                (di, array.shape[2], volume.shape[2])):
        lo, hi = max(start, 0), min(start + n_src, n_dst)
        if lo >= hi:
            return out
        dst.append(slice(lo, hi))
        src.append(slice(lo - start, hi - start))
    out[tuple(dst)] = array[tuple(src)] > 0
    return out
