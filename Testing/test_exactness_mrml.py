"""Exactness through Slicer's own classes, for every axis permutation and flip plus an oblique grid.

A mask is defined in patient space -- voxel centres inside a sphere AND right of the
plane x = 0 -- so any geometry slip (a flipped axis, a transposed array, LPS taken for
RAS, a half-voxel shift) moves voxels across a boundary. It goes volume node -> segment
-> (a) ``.seg.nrrd`` written by vtkMRMLSegmentationStorageNode and read by slicerio,
(b) labelmap node exported by Slicer, written by its volume storage node and read by
SimpleITK. Each time the expected mask is recomputed from the reader's own geometry, and
not a single voxel may differ.
"""
from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
slicerio = pytest.importorskip("slicerio")
sitk = pytest.importorskip("SimpleITK")

from biomedseg import slicer_bridge as sb  # noqa: E402
from biomedseg.volume import LPS_TO_RAS, Volume  # noqa: E402
from conftest import mrml_scene  # noqa: E402
from geometry_cases import DIRECTIONS  # noqa: E402

DIMS_IJK = (14, 17, 19)
SPACING = (0.9, 1.3, 2.1)
CENTRE = np.array([1.37, -12.61, 27.43])  # RAS point the sphere is centred on (x near 0: the plane cuts it)
RADIUS = 6.0
MARGIN = 1e-3  # no voxel centre may lie closer than this (mm) to either boundary


def inside(ras: np.ndarray) -> np.ndarray:
    """The patient-space truth: in the sphere and right of x = 0."""
    return (np.linalg.norm(ras - CENTRE, axis=-1) < RADIUS) & (ras[..., 0] > 0)


def margin(ras: np.ndarray) -> float:
    return float(min(np.abs(np.linalg.norm(ras - CENTRE, axis=-1) - RADIUS).min(), np.abs(ras[..., 0]).min()))


def grid_ras(ijk_to_ras: np.ndarray, dims_ijk) -> np.ndarray:
    """RAS of every voxel centre, shaped (k, j, i, 3), from a reader's own matrix."""
    k, j, i = np.meshgrid(*(np.arange(n) for n in dims_ijk[::-1]), indexing="ij")
    ijk1 = np.stack([i, j, k, np.ones_like(i)], axis=-1).astype(np.float64)
    return (ijk1 @ ijk_to_ras.T)[..., :3]


def make_volume(direction: np.ndarray) -> Volume:
    """Grid centred near CENTRE with a non-round origin, nudged until no centre sits on a boundary."""
    m = np.eye(4)
    m[:3, :3] = direction * SPACING
    centre_index = (np.array(DIMS_IJK) - 1) / 2.0
    for step in range(50):
        m[:3, 3] = CENTRE + np.array([0.237, -0.311, 0.173]) + 0.0137 * step - m[:3, :3] @ centre_index
        ras = grid_ras(m, DIMS_IJK)
        if margin(ras) > MARGIN:
            break
    else:  # pragma: no cover - the nudges above always find a clean origin
        raise AssertionError("no origin keeps voxel centres off the boundaries")
    array = np.arange(np.prod(DIMS_IJK), dtype=np.int16).reshape(DIMS_IJK[::-1]) % 97
    return Volume(array, m, name="grid")


@pytest.fixture(scope="module")
def scene():
    with mrml_scene() as scene:
        yield scene


@pytest.mark.parametrize("name,direction", DIRECTIONS, ids=[n for n, _ in DIRECTIONS])
def test_patient_space_mask_survives_slicer_storage(scene, name, direction, tmp_path):
    volume = make_volume(direction)
    truth = inside(volume.ras_of_voxels())
    assert 50 < truth.sum() < truth.size // 2 and margin(volume.ras_of_voxels()) > MARGIN
    volume_node = sb.node_from_volume(scene, volume)
    seg_node = slicer.vtkMRMLSegmentationNode()
    scene.AddNode(seg_node)
    segment_id = sb.write_segments(seg_node, volume_node, {"cut sphere": truth})["segment_ids"][0]
    assert np.array_equal(sb.segment_mask(seg_node, segment_id, volume_node), truth)

    # (a) .seg.nrrd by Slicer's storage node, read by slicerio, judged in the file's own geometry.
    path = sb.save_segmentation(seg_node, tmp_path / "cut.seg.nrrd")
    data = slicerio.read_segmentation(str(path))
    (info,) = data["segments"]
    assert info["name"] == "cut sphere"
    voxels = data["voxels"] if data["voxels"].ndim == 3 else data["voxels"][info.get("layer", 0)]
    stored = np.transpose(voxels == info["labelValue"], (2, 1, 0))  # (i, j, k) -> (k, j, i)
    file_ras = grid_ras(LPS_TO_RAS @ np.asarray(data["ijkToLPS"], dtype=np.float64), voxels.shape)
    expected = inside(file_ras)
    assert margin(file_ras) > MARGIN / 2
    assert int(np.count_nonzero(stored != expected)) == 0
    assert expected.sum() == truth.sum()  # a cropped file still holds every voxel of the truth

    # (b) labelmap node exported by Slicer, written by its volume storage node, read by SimpleITK.
    labelmap_node = sb.export_to_labelmap_node(scene, seg_node, volume_node)
    nrrd_path = tmp_path / "cut-label.nrrd"
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(nrrd_path))
    assert storage.WriteData(labelmap_node)
    image = sitk.ReadImage(str(nrrd_path))
    labels = sitk.GetArrayFromImage(image)  # (k, j, i)
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    ijk_to_lps[:3, 3] = image.GetOrigin()
    sitk_ras = grid_ras(LPS_TO_RAS @ ijk_to_lps, image.GetSize())
    assert np.allclose(sitk_ras[2, 3, 4], LPS_TO_RAS[:3, :3] @ image.TransformIndexToPhysicalPoint((4, 3, 2)))
    expected = inside(sitk_ras)
    assert margin(sitk_ras) > MARGIN / 2
    assert int(np.count_nonzero((labels == 1) != expected)) == 0
    assert set(np.unique(labels)) == {0, 1} and expected.sum() == truth.sum()

    for node in (labelmap_node, seg_node, volume_node):
        scene.RemoveNode(node)
