"""Volume nodes <-> ``Volume``: exact voxel grids in world RAS, parent transforms refused or hardened.

A volume under a parent transform is refused unless the caller asks to harden it, so a result
is never silently placed where the person does not see the image.
"""
from __future__ import annotations

import os

import numpy as np

from ..errors import InputError
from ..volume import Volume


def matrix_to_numpy(vtk_matrix) -> np.ndarray:
    """vtkMatrix4x4 -> 4x4 float64 array (row-major, as written on paper)."""
    return np.array([[vtk_matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def numpy_to_matrix(array: np.ndarray):
    """4x4 array -> new vtkMatrix4x4."""
    import vtk

    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(array[r, c]))
    return m


def node_label(node) -> str:
    return node.GetName() or node.GetID() or node.GetClassName()


def _to_world_matrix(node, harden_transform: bool, what: str = "volume") -> np.ndarray | None:
    """The node's parent-to-world matrix, or None without a parent transform.

    Refuses transforms it cannot honour: any transform unless ``harden_transform`` (the
    person sees the image moved, the voxels are not), and non-linear ones always.
    """
    parent = node.GetParentTransformNode()
    if parent is None:
        return None
    label, tname = node_label(node), node_label(parent)
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
    return matrix_to_numpy(m)


def world_to_node_frame(node, what: str = "segmentation") -> np.ndarray:
    """Matrix from world RAS into a (segmentation) node's own frame; identity without transform."""
    parent = node.GetParentTransformNode()
    if parent is None:
        return np.eye(4)
    if not parent.IsTransformToWorldLinear():
        raise InputError(f"The {what} '{node_label(node)}' is under the non-linear transform "
                         f"'{node_label(parent)}'; harden it (Transforms module) before adding segments.")
    import vtk

    m = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(m)
    return np.linalg.inv(matrix_to_numpy(m))


def _array_ijk_to_world(node, image, to_world) -> np.ndarray:
    """IJK-to-world-RAS of the node's voxel array: the array starts at the image extent's first index, not
    (0, 0, 0), so the origin moves there; then the hardened parent transform, if any."""
    ijk_to_ras = _ijk_to_ras_of(node)
    extent = image.GetExtent()
    if extent[0] or extent[2] or extent[4]:
        ijk_to_ras[:3, 3] = (ijk_to_ras @ np.array([extent[0], extent[2], extent[4], 1.0]))[:3]
    return ijk_to_ras if to_world is None else to_world @ ijk_to_ras


def volume_from_node(node, harden_transform: bool = False) -> Volume:
    """A scalar (or RGB vector) volume node as a ``Volume`` in world RAS, voxels copied.

    ``harden_transform=True`` bakes a linear parent transform into the geometry (the node
    itself is not changed); otherwise a transformed volume is refused with a sentence.
    """
    from vtkmodules.util.numpy_support import vtk_to_numpy

    label = node_label(node)
    image = node.GetImageData() if node is not None else None
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        raise InputError(f"The volume '{label if node is not None else 'None'}' holds no voxels; load an image first.")
    to_world = _to_world_matrix(node, harden_transform)
    nx, ny, nz = image.GetDimensions()
    n_comp = image.GetNumberOfScalarComponents()
    flat = vtk_to_numpy(image.GetPointData().GetScalars())
    shape = (nz, ny, nx, n_comp) if n_comp > 1 else (nz, ny, nx)
    array = np.array(flat.reshape(shape), copy=True)
    ijk_to_ras = _array_ijk_to_world(node, image, to_world)
    meta = {"source": "slicer", "node_id": node.GetID(), "node_name": node.GetName()}
    meta.update(_dicom_meta(node))
    if to_world is not None:
        meta["hardened_transform"] = node_label(node.GetParentTransformNode())
    return Volume(array, ijk_to_ras, name=node.GetName() or "", meta=meta, channels_last=n_comp > 1)


def image_stamp(node) -> tuple:
    """What changes when a volume node's voxels or geometry change (its image data's modification time,
    its IJK-to-RAS and its parent transform): to tell whether an image kept in a worker session is stale."""
    image = node.GetImageData() if node is not None else None
    transform = node.GetParentTransformNode() if node is not None else None
    return (image.GetMTime() if image is not None else None, tuple(np.round(_ijk_to_ras_of(node), 9).ravel()),
            (transform.GetID(), transform.GetMTime()) if transform is not None else None)


def grid_of(node, harden_transform: bool = True) -> Volume:
    """A volume node's voxel grid in world RAS as a ``Volume`` whose voxels are a read-only zero view (nothing
    copied): for geometry only (regions, prompts on the grid, writing a mask on it)."""
    label = node_label(node)
    image = node.GetImageData() if node is not None else None
    if image is None:
        raise InputError(f"The volume '{label if node is not None else 'None'}' holds no voxels; load an image first.")
    to_world = _to_world_matrix(node, harden_transform)
    nx, ny, nz = image.GetDimensions()
    ijk_to_ras = _array_ijk_to_world(node, image, to_world)
    return Volume(np.broadcast_to(np.zeros((), np.uint8), (nz, ny, nx)), ijk_to_ras, name=node.GetName() or "",
                  meta={"source": "slicer", "node_id": node.GetID(), "geometry_only": True})


def _ijk_to_ras_of(node) -> np.ndarray:
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return matrix_to_numpy(m)


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


def image_data_from_array(array: np.ndarray, n_comp: int, image=None):
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
    node.SetIJKToRASMatrix(numpy_to_matrix(volume.ijk_to_ras))
    node.SetAndObserveImageData(image_data_from_array(volume.array, volume.n_channels))
    if scene is not None:
        scene.AddNode(node)
        node.CreateDefaultDisplayNodes()
    return node


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
