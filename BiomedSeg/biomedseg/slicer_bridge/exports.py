"""Segmentation nodes out and in: labelmap nodes, .seg.nrrd files, and segments back as ``Segment``s."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import InputError
from ..segments import Segment
from .segmentations import (as_reference_volume, ensure_converter_rules, segment_mask, segment_tag, terminology_from_tag,
                            terminology_tag_name)
from .volumes import node_label


def export_to_labelmap_node(scene, segmentation_node, reference_node, segment_ids: list[str] | None = None):
    """Segments -> new labelmap volume node on ``reference_node``'s grid (labels 1, 2, ... in order)."""
    import slicer
    import vtk

    segmentation = segmentation_node.GetSegmentation()
    ids = list(segment_ids) if segment_ids is not None else list(segmentation.GetSegmentIDs())
    missing = [s for s in ids if segmentation.GetSegment(s) is None]
    if missing:
        raise InputError(f"'{node_label(segmentation_node)}' has no segments with IDs {missing}.")
    labelmap_node = slicer.vtkMRMLLabelMapVolumeNode()
    labelmap_node.SetName(scene.GenerateUniqueName(f"{node_label(segmentation_node)}-label"))
    scene.AddNode(labelmap_node)
    id_array = vtk.vtkStringArray()
    for segment_id in ids:
        id_array.InsertNextValue(segment_id)
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    if not logic.ExportSegmentsToLabelmapNode(segmentation_node, id_array, labelmap_node, reference_node,
                                              slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY):
        scene.RemoveNode(labelmap_node)
        raise InputError(f"Slicer could not export '{node_label(segmentation_node)}' to a labelmap.")
    return labelmap_node


def save_segmentation(segmentation_node, path: str | os.PathLike) -> Path:
    """Write a segmentation node as ``.seg.nrrd`` with Slicer's own storage node.

    Written to a hidden sibling first and renamed, so a failure never leaves half a file.
    The node's own storage settings are not changed.
    """
    import slicer

    path = Path(path)
    if not path.name.lower().endswith(".seg.nrrd"):
        raise InputError(f"'{path}': Slicer segmentations are saved as .seg.nrrd.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name[:-len('.seg.nrrd')]}.partial.seg.nrrd")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(tmp))
    try:
        if not storage.WriteData(segmentation_node):
            raise InputError(f"Slicer could not write '{path}'.")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_segmentation(scene, path: str | os.PathLike, name: str | None = None):
    """Read a ``.seg.nrrd`` into a new segmentation node with Slicer's own storage node."""
    import slicer

    ensure_converter_rules()
    path = Path(path)
    if not path.is_file():
        raise InputError(f"'{path}' does not exist.")
    node = slicer.vtkMRMLSegmentationNode()
    node.SetName(scene.GenerateUniqueName(name or path.name.split(".")[0]))
    scene.AddNode(node)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    node.SetAndObserveStorageNodeID(storage.GetID())
    if not storage.ReadData(node):
        scene.RemoveNode(node)
        scene.RemoveNode(storage)
        raise InputError(f"Slicer could not read the segmentation '{path}'.")
    node.CreateDefaultDisplayNodes()
    return node


def segments_of(segmentation_node) -> list[dict]:
    """Name, colour and terminology of each segment, in display order (for panels and tests)."""
    segmentation = segmentation_node.GetSegmentation()
    tag_name = terminology_tag_name()
    out = []
    for n in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(n)
        out.append({"id": segmentation.GetNthSegmentID(n), "name": segment.GetName(),
                    "color": tuple(segment.GetColor()), "terminology": terminology_from_tag(segment_tag(segment, tag_name))})
    return out


def new_segmentation_node(scene, name: str, reference_node=None):
    """A new, empty segmentation node shown in the views, pointing at ``reference_node``'s grid."""
    import slicer

    ensure_converter_rules()
    node = slicer.vtkMRMLSegmentationNode()
    node.SetName(scene.GenerateUniqueName(name))
    scene.AddNode(node)
    node.CreateDefaultDisplayNodes()
    if reference_node is not None:
        node.SetReferenceImageGeometryParameterFromVolumeNode(reference_node)
    return node


def show_segmentation(segmentation_node, show_3d: bool = True) -> None:
    """Show the segments in the slice views, and as surfaces in 3D when ``show_3d``."""
    if segmentation_node.GetDisplayNode() is None:
        segmentation_node.CreateDefaultDisplayNodes()
    display = segmentation_node.GetDisplayNode()
    display.SetVisibility(True)
    display.SetVisibility2D(True)
    display.SetVisibility3D(bool(show_3d))
    if show_3d:
        segmentation_node.CreateClosedSurfaceRepresentation()


def segments_from_node(segmentation_node, reference, segment_ids: list[str] | None = None) -> list[Segment]:
    """Segments of a node as engine ``Segment``s on ``reference``'s grid (for the file writers)."""
    volume = as_reference_volume(reference)
    infos = segments_of(segmentation_node)
    if segment_ids is not None:
        wanted = set(segment_ids)
        infos = [info for info in infos if info["id"] in wanted]
    if not infos:
        raise InputError(f"'{node_label(segmentation_node)}' has no segments to export.")
    return [Segment(info["name"], segment_mask(segmentation_node, info["id"], volume), info["color"],
                    info["terminology"]) for info in infos]
