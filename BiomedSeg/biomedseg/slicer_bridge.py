"""MRML nodes <-> engine types: the only engine module that touches Slicer's classes.

Volume nodes become ``Volume`` objects (and back) with their exact voxel grid; segments
computed by the engine are written into a ``vtkMRMLSegmentationNode`` with names,
colours and terminology, and every write returns a record that undoes it exactly.

Coordinates: a ``Volume`` is always in world RAS (the scene's patient space). A volume
under a parent transform is refused unless the caller asks to harden it, so a result is
never silently placed where the person does not see the image. Segment labelmaps are
stored in the segmentation node's own frame, as Slicer expects.

Only this module and ``BiomedSeg.py`` import ``slicer``; it runs inside Slicer and in
the tests (``slicer-core``), never in the worker.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from .errors import InputError
from .segments import Segment, prepare_segments
from .volume import Volume

#: Name of Slicer's binary labelmap representation.
BINARY_LABELMAP = "Binary labelmap"
#: Where Slicer keeps the reference grid of a segmentation.
REFERENCE_GEOMETRY = "Reference image geometry"


# ---- small VTK helpers -------------------------------------------------------------------

def _matrix_to_numpy(vtk_matrix) -> np.ndarray:
    """vtkMatrix4x4 -> 4x4 float64 array (row-major, as written on paper)."""
    return np.array([[vtk_matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def _numpy_to_matrix(array: np.ndarray):
    """4x4 array -> new vtkMatrix4x4."""
    import vtk

    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(array[r, c]))
    return m


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


def _node_label(node) -> str:
    return node.GetName() or node.GetID() or node.GetClassName()


# ---- transforms ----------------------------------------------------------------------------

def _to_world_matrix(node, harden_transform: bool, what: str = "volume") -> np.ndarray | None:
    """The node's parent-to-world matrix, or None without a parent transform.

    Refuses transforms it cannot honour: any transform unless ``harden_transform`` (the
    person sees the image moved, the voxels are not), and non-linear ones always.
    """
    parent = node.GetParentTransformNode()
    if parent is None:
        return None
    label, tname = _node_label(node), _node_label(parent)
    if not parent.IsTransformToWorldLinear():
        raise InputError(f"The {what} '{label}' is under the non-linear (warping) transform '{tname}', which no "
                         "voxel-to-patient matrix can describe; harden the transform in the Transforms module "
                         "(this resamples the volume) and try again.")
    if not harden_transform:
        raise InputError(f"The {what} '{label}' is under transform '{tname}', so it is shown somewhere other "
                         "than its voxels say; harden the transform (Transforms module) or pass "
                         "harden_transform=True to use the transformed position.")
    import vtk

    m = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(m)
    return _matrix_to_numpy(m)


def _world_to_node_frame(node, what: str = "segmentation") -> np.ndarray:
    """Matrix from world RAS into a (segmentation) node's own frame; identity without transform."""
    parent = node.GetParentTransformNode()
    if parent is None:
        return np.eye(4)
    if not parent.IsTransformToWorldLinear():
        raise InputError(f"The {what} '{_node_label(node)}' is under the non-linear transform "
                         f"'{_node_label(parent)}'; harden it (Transforms module) before adding segments.")
    import vtk

    m = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(m)
    return np.linalg.inv(_matrix_to_numpy(m))


# ---- volumes -------------------------------------------------------------------------------

def volume_from_node(node, harden_transform: bool = False) -> Volume:
    """A scalar (or RGB vector) volume node as a ``Volume`` in world RAS, voxels copied.

    ``harden_transform=True`` bakes a linear parent transform into the geometry (the node
    itself is not changed); otherwise a transformed volume is refused with a sentence.
    """
    from vtkmodules.util.numpy_support import vtk_to_numpy

    label = _node_label(node)
    image = node.GetImageData() if node is not None else None
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        raise InputError(f"The volume '{label if node is not None else 'None'}' holds no voxels; load an image first.")
    to_world = _to_world_matrix(node, harden_transform)
    nx, ny, nz = image.GetDimensions()
    n_comp = image.GetNumberOfScalarComponents()
    flat = vtk_to_numpy(image.GetPointData().GetScalars())
    shape = (nz, ny, nx, n_comp) if n_comp > 1 else (nz, ny, nx)
    array = np.array(flat.reshape(shape), copy=True)
    ijk_to_ras = _ijk_to_ras_of(node)
    extent = image.GetExtent()
    if extent[0] or extent[2] or extent[4]:
        # The array starts at index (e0, e2, e4), not (0, 0, 0): move the origin there.
        ijk_to_ras[:3, 3] = (ijk_to_ras @ np.array([extent[0], extent[2], extent[4], 1.0]))[:3]
    if to_world is not None:
        ijk_to_ras = to_world @ ijk_to_ras
    meta = {"source": "slicer", "node_id": node.GetID(), "node_name": node.GetName()}
    meta.update(_dicom_meta(node))
    if to_world is not None:
        meta["hardened_transform"] = _node_label(node.GetParentTransformNode())
    return Volume(array, ijk_to_ras, name=node.GetName() or "", meta=meta, channels_last=n_comp > 1)


def _ijk_to_ras_of(node) -> np.ndarray:
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return _matrix_to_numpy(m)


def _dicom_meta(node) -> dict:
    """What Slicer's DICOM import leaves on a node: instance UIDs and any DICOM.* attributes."""
    meta: dict = {}
    uids = node.GetAttribute("DICOM.instanceUIDs")
    if uids:
        meta["dicom_instance_uids"] = uids.split()
    for attr in node.GetAttributeNames() or ():
        if attr.startswith("DICOM.") and attr != "DICOM.instanceUIDs":
            meta.setdefault("slicer_attributes", {})[attr] = node.GetAttribute(attr)
    return meta


def _image_data_from_array(array: np.ndarray, n_comp: int, image=None):
    """(k, j, i[, c]) array -> vtkImageData (or the given subclass instance), voxels copied."""
    import vtk
    from vtkmodules.util.numpy_support import numpy_to_vtk

    if array.dtype == bool:
        array = array.astype(np.uint8)
    image = vtk.vtkImageData() if image is None else image
    k, j, i = array.shape[:3]
    image.SetDimensions(i, j, k)
    flat = np.ascontiguousarray(array).reshape(-1, n_comp) if n_comp > 1 else np.ascontiguousarray(array).ravel()
    scalars = numpy_to_vtk(flat, deep=True)
    scalars.SetName("ImageScalars")
    image.GetPointData().SetScalars(scalars)
    return image


def node_from_volume(scene, volume: Volume, name: str | None = None):
    """Add ``volume`` to ``scene`` as a volume node with exactly its grid; returns the node.

    Colour volumes become vector volume nodes. The voxels are copied, so later changes to
    ``volume.array`` do not reach the scene.
    """
    import slicer

    node = slicer.vtkMRMLVectorVolumeNode() if volume.channels_last else slicer.vtkMRMLScalarVolumeNode()
    wanted = name if name is not None else (volume.name or "Volume")
    node.SetName(scene.GenerateUniqueName(wanted) if scene is not None else wanted)
    node.SetIJKToRASMatrix(_numpy_to_matrix(volume.ijk_to_ras))
    node.SetAndObserveImageData(_image_data_from_array(volume.array, volume.n_channels))
    if scene is not None:
        scene.AddNode(node)
        node.CreateDefaultDisplayNodes()
    return node


# ---- segmentation geometry -----------------------------------------------------------------

def _reference_volume(reference) -> Volume:
    """Node or Volume -> Volume in world RAS (a linear parent transform of a node is applied)."""
    if isinstance(reference, Volume):
        return reference
    return volume_from_node(reference, harden_transform=True)


def _oriented_image(mask: np.ndarray, ijk_to_frame: np.ndarray):
    """Boolean (k, j, i) mask -> vtkOrientedImageData (uint8 0/1) with the given geometry."""
    import slicer

    image = _image_data_from_array(np.asarray(mask, dtype=np.uint8), 1, slicer.vtkOrientedImageData())
    image.SetImageToWorldMatrix(_numpy_to_matrix(ijk_to_frame))
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
    matrix = _matrix_to_numpy(m)
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
        _numpy_to_matrix(ijk_to_frame), [0, i - 1, 0, j - 1, 0, k - 1])


def _set_reference_geometry(segmentation_node, reference, ijk_to_frame: np.ndarray, shape) -> None:
    """Point the segmentation at the image it was computed on (node reference when we have one)."""
    if not isinstance(reference, Volume):
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference)
        return
    segmentation_node.GetSegmentation().SetConversionParameter(
        REFERENCE_GEOMETRY, reference_geometry_parameter(ijk_to_frame, shape))


# ---- writing segments ----------------------------------------------------------------------

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
        raise InputError(f"'{_node_label(segmentation_node)}' has no segment with ID '{segment_id}'.")
    if not segmentation.ContainsRepresentation(BINARY_LABELMAP):
        segmentation_node.CreateBinaryLabelmapRepresentation()
    labelmap = slicer.vtkOrientedImageData()
    if not slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
            segmentation_node, segment_id, labelmap, world):
        raise InputError(f"Segment '{segment.GetName()}' of '{_node_label(segmentation_node)}' has no binary labelmap.")
    array, matrix = _oriented_to_array(labelmap)
    return array == segment.GetLabelValue(), matrix


def _segment_state(segmentation_node, segment_id: str) -> dict:
    """Everything needed to put a segment back: its own voxels and its metadata, as copies."""
    import slicer

    metadata = slicer.vtkSegment()
    metadata.DeepCopyMetadata(segmentation_node.GetSegmentation().GetSegment(segment_id))
    mask, matrix = segment_labelmap(segmentation_node, segment_id, world=False)
    return {"name": metadata.GetName(), "metadata": metadata, "mask": mask, "matrix": matrix}


def _tag(segment, name: str) -> str:
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
                         f"'{_node_label(segmentation_node)}'.")


def _require_labelmap_source(segmentation_node) -> None:
    """Refuse to add voxels to a segmentation whose segments are surfaces (converting would alter them)."""
    segmentation = segmentation_node.GetSegmentation()
    getter = getattr(segmentation, "GetSourceRepresentationName", None) or segmentation.GetMasterRepresentationName
    source = getter()
    if not source or segmentation.GetNumberOfSegments() == 0:
        setter = getattr(segmentation, "SetSourceRepresentationName", None) or segmentation.SetMasterRepresentationName
        setter(BINARY_LABELMAP)
    elif source != BINARY_LABELMAP:
        raise InputError(f"The segments of '{_node_label(segmentation_node)}' are stored as '{source}', not as voxels; "
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
    volume = _reference_volume(reference)
    prepared = prepare_segments(segments, volume.shape, where=f"'{_node_label(segmentation_node)}'")
    ijk_to_frame = _world_to_node_frame(segmentation_node) @ volume.ijk_to_ras
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
        raise InputError(f"Slicer could not add segment '{name}' to '{_node_label(segmentation_node)}'.")
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


# ---- reading segments ----------------------------------------------------------------------

def segment_mask(segmentation_node, segment_id: str, reference_volume) -> np.ndarray:
    """One segment as a boolean (k, j, i) array on ``reference_volume``'s grid (world RAS).

    Same-lattice labelmaps (the usual case) are copied voxel for voxel; others are
    resampled by nearest neighbour, the way Slicer itself exports them.
    """
    import slicer

    volume = _reference_volume(reference_volume)
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


def export_to_labelmap_node(scene, segmentation_node, reference_node, segment_ids: list[str] | None = None):
    """Segments -> new labelmap volume node on ``reference_node``'s grid (labels 1, 2, ... in order)."""
    import slicer
    import vtk

    segmentation = segmentation_node.GetSegmentation()
    ids = list(segment_ids) if segment_ids is not None else list(segmentation.GetSegmentIDs())
    missing = [s for s in ids if segmentation.GetSegment(s) is None]
    if missing:
        raise InputError(f"'{_node_label(segmentation_node)}' has no segments with IDs {missing}.")
    labelmap_node = slicer.vtkMRMLLabelMapVolumeNode()
    labelmap_node.SetName(scene.GenerateUniqueName(f"{_node_label(segmentation_node)}-label"))
    scene.AddNode(labelmap_node)
    id_array = vtk.vtkStringArray()
    for segment_id in ids:
        id_array.InsertNextValue(segment_id)
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    if not logic.ExportSegmentsToLabelmapNode(segmentation_node, id_array, labelmap_node, reference_node,
                                              slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY):
        scene.RemoveNode(labelmap_node)
        raise InputError(f"Slicer could not export '{_node_label(segmentation_node)}' to a labelmap.")
    return labelmap_node


# ---- files ---------------------------------------------------------------------------------

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
                    "color": tuple(segment.GetColor()), "terminology": terminology_from_tag(_tag(segment, tag_name))})
    return out


# ---- panel helpers -------------------------------------------------------------------------

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


def roi_ras_bounds(roi_node) -> tuple[list[float], list[float]]:
    """(min, max) RAS corners of the axis-aligned box around a markups ROI, in world coordinates.

    A rotated ROI gives the box that contains it, so nothing inside the ROI is left out.
    """
    bounds = [0.0] * 6
    roi_node.GetRASBounds(bounds)
    if bounds[1] < bounds[0] or bounds[3] < bounds[2] or bounds[5] < bounds[4]:
        raise InputError(f"The region of interest '{_node_label(roi_node)}' has no size; place it on the image first.")
    return [bounds[0], bounds[2], bounds[4]], [bounds[1], bounds[3], bounds[5]]


def dicom_files_of(node, lookup=None) -> list[str]:
    """The DICOM files a volume node was loaded from ([] when it was not loaded from DICOM).

    ``lookup(instance_uid) -> path`` defaults to Slicer's DICOM database; files that cannot be
    found make the whole answer [] (a partial series cannot be referenced).
    """
    import slicer

    uids = (node.GetAttribute("DICOM.instanceUIDs") or "").split()
    if not uids:
        return []
    if lookup is None:
        database = getattr(slicer, "dicomDatabase", None)
        if database is None:
            return []
        lookup = database.fileForInstance
    files = [lookup(uid) for uid in uids]
    return [str(f) for f in files] if all(files) and all(os.path.isfile(str(f)) for f in files) else []


def segments_from_node(segmentation_node, reference, segment_ids: list[str] | None = None) -> list[Segment]:
    """Segments of a node as engine ``Segment``s on ``reference``'s grid (for the file writers)."""
    volume = _reference_volume(reference)
    infos = segments_of(segmentation_node)
    if segment_ids is not None:
        wanted = set(segment_ids)
        infos = [info for info in infos if info["id"] in wanted]
    if not infos:
        raise InputError(f"'{_node_label(segmentation_node)}' has no segments to export.")
    return [Segment(info["name"], segment_mask(segmentation_node, info["id"], volume), info["color"],
                    info["terminology"]) for info in infos]


__all__ = ["volume_from_node", "node_from_volume", "write_segments", "undo_segments", "segment_mask",
           "segment_labelmap", "export_to_labelmap_node", "save_segmentation", "load_segmentation", "segments_of",
           "ensure_converter_rules", "reference_geometry_parameter", "new_segmentation_node", "show_segmentation",
           "roi_ras_bounds", "dicom_files_of", "segments_from_node"]
