"""A model's mask written into one segment the way the Segment Editor writes an effect's result.

Slicer's rules, read from the Segment Editor's own settings (its ``vtkMRMLSegmentEditorNode``):

- the *editable area* (mask mode): everywhere, inside all / visible segments, outside all /
  visible segments, or inside one segment (``MaskSegmentID``); plus the source volume's
  *editable intensity range* when it is switched on. The area comes from Slicer's own
  ``vtkMRMLSegmentationNode.GenerateEditMask``, as the editor computes it;
- the result replaces the segment's voxels inside that area and leaves them alone outside it
  (the editor's "set" modification, ``vtkSlicerSegmentEditorLogic.ModifySegmentByLabelmap``);
- the *overwrite mode*: the voxels written are erased from all other segments, from the visible
  ones, or from none (``vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment`` with the
  segments to overwrite; segments on the written segment's layer that must not be overwritten
  make Slicer move it to a layer of its own, so they keep their voxels).

Two rules are BiomedSeg's own, stricter than the editor's:

- nothing outside the editable area changes in any segment (Slicer erases the whole modifier,
  including the written segment's voxels kept outside the area, from segments on other layers);
- *locked* segments are never changed: Slicer (5.x, checked against the installed classes) has
  no per-segment lock (``vtkSegment`` has tags, ``vtkMRMLSegmentationNode`` no locked state), so a
  segment is locked by the tag ``BiomedSeg.Locked`` = ``"1"`` (``set_segment_locked``): it is
  never erased by the overwrite mode and cannot be the segment written.

Every write returns the same undo record as ``segmentations.write_segments``: give it to
``undo_segments`` to put back every segment it touched, voxel for voxel.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..geometry import Crop, Region, region_box
from .segmentations import (_copy_on_same_lattice, _oriented_image, _oriented_to_array, _replace_labelmap,
                            _require_labelmap_source, _segment_state, _set_reference_geometry, _unique_segment_name,
                            REFERENCE_GEOMETRY, ensure_converter_rules, segment_labelmap,
                            segment_mask, segment_tag, terminology_tag_name, terminology_to_tag, undo_segments)
from .volumes import grid_of, image_data_from_array, node_label, world_to_node_frame

#: Segment tag that locks a segment against every BiomedSeg write.
LOCKED_TAG = "BiomedSeg.Locked"
#: Singleton tag of the Segment Editor module's settings node.
SEGMENT_EDITOR_TAG = "SegmentEditor"

#: Slicer's mask modes (vtkMRMLSegmentationNode.EditAllowed*) and overwrite modes (vtkMRMLSegmentEditorNode.Overwrite*).
MASK_MODES = ("EditAllowedEverywhere", "EditAllowedInsideAllSegments", "EditAllowedInsideVisibleSegments",
              "EditAllowedOutsideAllSegments", "EditAllowedOutsideVisibleSegments", "EditAllowedInsideSingleSegment")
OVERWRITE_MODES = ("OverwriteAllSegments", "OverwriteVisibleSegments", "OverwriteNone")


@dataclass(frozen=True)
class EditRules:
    """The Segment Editor's settings that decide where a result may go (names as Slicer spells them)."""

    mask_mode: str = "EditAllowedEverywhere"
    mask_segment_id: str = ""
    #: (low, high) inclusive, when the editor's "editable intensity range" is on; None when off.
    intensity_range: tuple[float, float] | None = None
    #: the editor's source volume node (the intensities the range applies to); None: the written grid's volume.
    source_volume: object = None
    overwrite: str = "OverwriteAllSegments"

    def __post_init__(self):
        if self.mask_mode not in MASK_MODES:
            raise InputError(f"Unknown editable area '{self.mask_mode}'; Slicer's are {', '.join(MASK_MODES)}.")
        if self.overwrite not in OVERWRITE_MODES:
            raise InputError(f"Unknown overwrite mode '{self.overwrite}'; use {', '.join(OVERWRITE_MODES)}.")


def editor_rules(scene=None, editor_node=None) -> EditRules:
    """The rules of ``editor_node``, else of the Segment Editor module's node in ``scene``, else the scene's
    default editor node (Slicer's application settings), else Slicer's defaults (everywhere, overwrite all)."""
    import slicer

    node = editor_node
    if node is None and scene is not None:
        node = (scene.GetSingletonNode(SEGMENT_EDITOR_TAG, "vtkMRMLSegmentEditorNode")
                or scene.GetDefaultNodeByClass("vtkMRMLSegmentEditorNode"))
    if node is None:
        return EditRules()
    mask_mode = slicer.vtkMRMLSegmentationNode.ConvertMaskModeToString(node.GetMaskMode())
    overwrite = slicer.vtkMRMLSegmentEditorNode.ConvertOverwriteModeToString(node.GetOverwriteMode())
    intensity = tuple(float(v) for v in node.GetSourceVolumeIntensityMaskRange()) \
        if node.GetSourceVolumeIntensityMask() else None
    return EditRules(mask_mode, node.GetMaskSegmentID() or "", intensity, node.GetSourceVolumeNode(), overwrite)


def apply_rules(editor_node, rules: EditRules) -> None:
    """Set an editor node to ``rules`` (scripts and tests; the person sets them in the Segment Editor)."""
    import slicer

    editor_node.SetMaskMode(getattr(slicer.vtkMRMLSegmentationNode, rules.mask_mode))
    editor_node.SetMaskSegmentID(rules.mask_segment_id or None)
    editor_node.SetOverwriteMode(getattr(slicer.vtkMRMLSegmentEditorNode, rules.overwrite))
    editor_node.SetSourceVolumeIntensityMask(rules.intensity_range is not None)
    if rules.intensity_range is not None:
        editor_node.SetSourceVolumeIntensityMaskRange(*rules.intensity_range)
    if rules.source_volume is not None:
        editor_node.SetAndObserveSourceVolumeNode(rules.source_volume)


def is_segment_locked(segmentation_node, segment_id: str) -> bool:
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    return segment is not None and segment_tag(segment, LOCKED_TAG).strip().lower() in ("1", "true", "yes")


def set_segment_locked(segmentation_node, segment_id: str, locked: bool = True) -> None:
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    if segment is None:
        raise InputError(f"'{node_label(segmentation_node)}' has no segment with ID '{segment_id}'.")
    if locked:
        segment.SetTag(LOCKED_TAG, "1")
    else:
        segment.RemoveTag(LOCKED_TAG)


def _grid(reference):
    """The grid of a volume node (no voxels copied) or of a Volume."""
    return grid_of(reference) if hasattr(reference, "GetImageData") else reference


def _segment_ids(segmentation) -> list[str]:
    return [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())]


def _visible(segmentation_node, segment_id: str) -> bool:
    display = segmentation_node.GetDisplayNode()
    return display is None or bool(display.GetSegmentVisibility(segment_id))


def _name(segmentation_node, segment_id: str) -> str:
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    return segment.GetName() if segment is not None else segment_id


def describe_rules(rules: EditRules, segmentation_node=None) -> str:
    """One line for the panel: 'Writes everywhere; erases what it writes from all other segments (1 locked).'"""
    where = {"EditAllowedEverywhere": "everywhere", "EditAllowedInsideAllSegments": "inside all segments",
             "EditAllowedInsideVisibleSegments": "inside visible segments",
             "EditAllowedOutsideAllSegments": "outside all segments",
             "EditAllowedOutsideVisibleSegments": "outside visible segments",
             "EditAllowedInsideSingleSegment": "inside one segment"}[rules.mask_mode]
    if rules.mask_mode == "EditAllowedInsideSingleSegment" and segmentation_node is not None:
        where = f"inside '{_name(segmentation_node, rules.mask_segment_id)}'"
    if rules.intensity_range is not None:
        where += f", intensities {rules.intensity_range[0]:g} to {rules.intensity_range[1]:g}"
    erase = {"OverwriteAllSegments": "erases what it writes from all other segments",
             "OverwriteVisibleSegments": "erases what it writes from the visible segments",
             "OverwriteNone": "other segments keep their voxels (overlap allowed)"}[rules.overwrite]
    locked = 0
    if segmentation_node is not None:
        locked = sum(is_segment_locked(segmentation_node, s) for s in _segment_ids(segmentation_node.GetSegmentation()))
    return f"Writes {where}; {erase}" + (f" ({locked} locked, never changed)." if locked else ".")


def _exact_on_grid(segmentation_node, segment_id: str, volume) -> np.ndarray:
    """A segment's voxels on the grid, refused unless every voxel lands on it exactly (no resampling)."""
    array, matrix = segment_labelmap(segmentation_node, segment_id, world=True)
    placed = _copy_on_same_lattice(array, matrix, volume)
    if placed is None or int(placed.sum()) != int(array.sum()):
        raise InputError(f"Segment '{_name(segmentation_node, segment_id)}' is stored on another grid than "
                         f"'{volume.name or 'the image'}' or reaches beyond it, so a result on this image "
                         "cannot replace it without changing voxels it does not cover.",
                         hint="Choose the volume the segment was drawn on, or write to a new segment.")
    return placed


def editable_area(segmentation_node, reference, rules: EditRules, segment_id: str = "") -> np.ndarray:
    """Where a write into ``segment_id`` may change voxels, as a boolean (k, j, i) array on ``reference``'s grid:
    Slicer's ``GenerateEditMask`` for the mask mode and the intensity range."""
    import slicer

    volume = _grid(reference)
    segmentation = segmentation_node.GetSegmentation()
    if rules.mask_mode == "EditAllowedInsideSingleSegment" and segmentation.GetSegment(rules.mask_segment_id) is None:
        raise InputError(f"The Segment Editor allows edits only inside segment '{rules.mask_segment_id}', which is "
                         f"not in '{node_label(segmentation_node)}'.",
                         hint="Change 'Editable area' in the Segment Editor's masking options.")
    if not segmentation.ContainsRepresentation("Binary labelmap") and segmentation.GetNumberOfSegments():
        segmentation_node.CreateBinaryLabelmapRepresentation()
    geometry = _oriented_image(np.zeros(volume.shape, np.uint8), world_to_node_frame(segmentation_node) @ volume.ijk_to_ras)
    source, intensity = None, None
    if rules.intensity_range is not None:
        source = _source_image(segmentation_node, rules.source_volume or reference, geometry)
        intensity = [float(rules.intensity_range[0]), float(rules.intensity_range[1])]
    mask = slicer.vtkOrientedImageData()
    mode = getattr(slicer.vtkMRMLSegmentationNode, rules.mask_mode)
    args = [mask, mode, geometry, segment_id or "", rules.mask_segment_id or ""]
    if source is not None:
        args += [source, intensity]
    if not segmentation_node.GenerateEditMask(*args):
        raise InputError(f"Slicer could not compute the editable area of '{node_label(segmentation_node)}'.")
    array, matrix = _oriented_to_array(mask)
    if array.shape != volume.shape:
        raise InputError("Slicer's editable area does not cover the image grid.")  # pragma: no cover
    return array == 0


def _source_image(segmentation_node, source, geometry):
    """The source volume's intensities on ``geometry`` (linear interpolation, as the editor's aligned source volume)."""
    import slicer

    if not hasattr(source, "GetImageData"):  # a Volume: the written grid itself
        if source.meta.get("geometry_only"):
            raise InputError("The editable intensity range needs the source volume's voxels.")  # pragma: no cover
        array = source.array if source.array.ndim == 3 else source.array[..., 0]
        image = image_data_from_array(np.asarray(array, np.float64), 1, slicer.vtkOrientedImageData())
        image.SetImageToWorldMatrix(_geometry_matrix(geometry))
        return image
    image = slicer.vtkSlicerSegmentationsModuleLogic.CreateOrientedImageDataFromVolumeNode(
        source, segmentation_node.GetParentTransformNode())
    if image is None:
        raise InputError(f"The Segment Editor's source volume '{node_label(source)}' has no image data.")
    resample = slicer.vtkOrientedImageDataResample
    if resample.DoGeometriesMatch(image, geometry) and resample.DoExtentsMatch(image, geometry):
        return image
    aligned = slicer.vtkOrientedImageData()
    resample.ResampleOrientedImageToReferenceOrientedImage(image, geometry, aligned, True)
    return aligned


def _geometry_matrix(image):
    import vtk

    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    return matrix


def write_in_editable_area(segmentation_node, reference, mask: np.ndarray, *, segment_id: str | None = None,
                           name: str = "object", color=(0.9, 0.7, 0.2), terminology: dict | None = None,
                           region: Region | Crop | None = None, rules: EditRules | None = None) -> dict:
    """Write a boolean (k, j, i) mask on ``reference``'s grid into one segment, inside the editable area.

    ``segment_id`` names the segment to replace (its voxels outside the area, and outside ``region``,
    stay); without it a new segment ``name`` is added. ``rules`` default to the Segment Editor's own
    (``editor_rules(scene)``). Returns the undo record of ``write_segments`` plus ``written`` (voxels
    of the segment changed), ``voxels`` and ``voxels_before`` (the segment's size), ``outside`` (voxels of ``mask`` the area refused) and ``erased``
    ({segment ID: voxels taken from it by the overwrite mode}). A locked target, a refused area or a
    segment Slicer cannot write changes nothing.
    """
    ensure_converter_rules()
    volume = _grid(reference)
    mask = np.asarray(mask)
    if mask.shape != volume.shape:
        raise InputError(f"The result has shape {mask.shape}, but the image is {volume.shape} (k, j, i).")
    mask = mask.astype(bool)
    segmentation = segmentation_node.GetSegmentation()
    if rules is None:
        rules = editor_rules(segmentation_node.GetScene())
    if segment_id:
        if segmentation.GetSegment(segment_id) is None:
            raise InputError(f"'{node_label(segmentation_node)}' has no segment with ID '{segment_id}'.",
                             hint="It may have been deleted; choose another segment or a new one.")
        if is_segment_locked(segmentation_node, segment_id):
            raise InputError(f"Segment '{_name(segmentation_node, segment_id)}' is locked, so BiomedSeg will not "
                             "change it.", hint="Unlock it, or write the result to a new segment.")
    _require_labelmap_source(segmentation_node)
    ijk_to_frame = world_to_node_frame(segmentation_node) @ volume.ijk_to_ras
    if not segmentation.GetConversionParameter(REFERENCE_GEOMETRY) or segmentation.GetNumberOfSegments() == 0:
        _set_reference_geometry(segmentation_node, reference, ijk_to_frame, volume.shape)
    old = _exact_on_grid(segmentation_node, segment_id, volume) if segment_id else np.zeros(volume.shape, bool)
    area = editable_area(segmentation_node, reference, rules, segment_id or "")
    box = region if isinstance(region, Crop) or region is None else region_box(volume, region)
    if box is not None:
        inside = np.zeros(volume.shape, bool)
        inside[box.slices] = True
        area &= inside
    new = (mask & area) | (old & ~area)
    written = new & area  # voxels the segment holds in the area after the write
    others = [s for s in _segment_ids(segmentation) if s != segment_id]
    if rules.overwrite == "OverwriteNone":
        overwrite = []
    elif rules.overwrite == "OverwriteVisibleSegments":
        overwrite = [s for s in others if _visible(segmentation_node, s)]
    else:
        overwrite = others
    overwrite = [s for s in overwrite if not is_segment_locked(segmentation_node, s)]
    hit = {s: segment_mask(segmentation_node, s, volume) & written for s in overwrite}
    hit = {s: m for s, m in hit.items() if m.any()}

    record: dict = {"segment_ids": [], "prior": {}, "written": int((new != old).sum()), "voxels": int(new.sum()),
                    "voxels_before": int(old.sum()),
                    "outside": int((mask & ~area).sum()), "erased": {s: int(m.sum()) for s, m in hit.items()}}
    try:
        if segment_id:
            record["prior"][segment_id] = _segment_state(segmentation_node, segment_id)
        else:
            segment_id = segmentation.AddEmptySegment("", _unique_segment_name(segmentation, name), list(color))
            if not segment_id:
                raise InputError(f"Slicer could not add segment '{name}' to '{node_label(segmentation_node)}'.")
            record["prior"][segment_id] = None
            segment = segmentation.GetSegment(segment_id)
            segment.SetColorAutoGenerated(False)
            segment.SetNameAutoGenerated(False)
            if terminology:
                segment.SetTag(terminology_tag_name(), terminology_to_tag(terminology))
        record["segment_ids"].append(segment_id)
        for s in hit:
            record["prior"][s] = _segment_state(segmentation_node, s)
        _set_labelmap(segmentation_node, segment_id, _oriented_image(new, ijk_to_frame), list(hit))
        for s, m in hit.items():  # segments on other layers: take the written voxels from them, nothing else
            left = segment_mask(segmentation_node, s, volume) & written
            if left.any():
                _erase(segmentation_node, s, left, ijk_to_frame)
    except BaseException:
        undo_segments(segmentation_node, record)
        raise
    segmentation_node.Modified()
    return record


def _set_labelmap(segmentation_node, segment_id: str, labelmap, overwrite: list[str]) -> None:
    """Replace the segment's voxels; shared-layer segments listed in ``overwrite`` give up the voxels written,
    the others make Slicer move the segment to a layer of its own."""
    import slicer

    logic = slicer.vtkSlicerSegmentationsModuleLogic
    if not overwrite:
        return _replace_labelmap(segmentation_node, segment_id, labelmap)
    if not logic.SetBinaryLabelmapToSegment(labelmap, segmentation_node, segment_id, logic.MODE_REPLACE, None, False,
                                            tuple(overwrite)):
        raise InputError(f"Slicer refused the labelmap for segment '{_name(segmentation_node, segment_id)}'.")


def _erase(segmentation_node, segment_id: str, erase: np.ndarray, ijk_to_frame: np.ndarray) -> None:
    """Take ``erase``'s voxels from one segment (Slicer's minimum merge, as the editor erases other layers)."""
    import slicer

    logic = slicer.vtkSlicerSegmentationsModuleLogic
    keep = _oriented_image(~erase, ijk_to_frame)
    if not logic.SetBinaryLabelmapToSegment(keep, segmentation_node, segment_id, logic.MODE_MERGE_MIN, None, False, ()):
        raise InputError(f"Slicer could not erase the new voxels from segment '{_name(segmentation_node, segment_id)}'.")


__all__ = ["LOCKED_TAG", "MASK_MODES", "OVERWRITE_MODES", "EditRules", "editor_rules", "apply_rules",
           "is_segment_locked", "set_segment_locked", "describe_rules", "editable_area", "write_in_editable_area"]
