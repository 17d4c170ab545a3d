"""The phantom and the clicks of the correction workflow (Testing/test_correction.py, scripts/render_correct.py):
an 'organ' on axial slices 5-24, a 'leak' beside it inside the drawn box (slices 18-22) and a 'missed part'
outside the box (slices 6-10), all bright on a dark background, stored LPS like DICOM."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from biomedseg.volume import Volume
from geometry_cases import affine

TOY_MODELS = Path(__file__).parent / "toy_models"
TOY = TOY_MODELS / "click_session"
MODEL = "toy-click-session"
SHAPE = (30, 40, 40)  # (k, j, i); k is the axial axis
RANGE = (5, 24)
LEAK = (20, 27, 17)  # (k, j, i) of the exclude click
MISSED = (8, 12, 32)  # (k, j, i) of the include click


def phantom() -> Volume:
    array = np.zeros(SHAPE, np.int16)
    array[5:25, 10:25, 10:25] = 1000  # organ
    array[18:23, 25:30, 10:25] = 900  # leak, touching the organ, inside the box
    array[6:11, 10:15, 30:35] = 800  # missed part, outside the box
    return Volume(array, affine(np.diag([-1.0, -1.0, 1.0]), (1.0, 1.0, 2.0), (20.0, 20.0, -30.0)), name="phantom")


def ras(volume, k, j, i):
    return tuple(float(v) for v in (volume.ijk_to_ras @ np.array([i, j, k, 1.0]))[:3])


def rect() -> np.ndarray:
    """The drawn box's rectangle (j 8-30, i 8-27) on every slice of the range."""
    m = np.zeros(SHAPE, bool)
    m[RANGE[0]:RANGE[1] + 1, 8:31, 8:28] = True
    return m


def disc(volume, k_frames, j, i, radius=3.0) -> np.ndarray:
    """A click's disc on each of ``k_frames`` (in-plane distance from the click), as the toy draws it."""
    points = volume.ras_of_voxels()
    out = np.zeros(SHAPE, bool)
    for k in k_frames:
        out[k] = np.linalg.norm(points[k] - np.asarray(ras(volume, k, j, i)), axis=-1) <= radius
    return out


def roi(scene, volume, k=15):
    """The box a person drags on axial slice ``k`` (a real markups ROI, one slice thick)."""
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    lo, hi = np.array(ras(volume, k, 8, 8)), np.array(ras(volume, k, 30, 27))
    node.SetCenter(*((lo + hi) / 2))
    node.SetSize(*(np.abs(hi - lo) + np.array([0.0, 0.0, 1.0])))
    return node


def click(node, volume, k, j, i) -> int:
    """A control point placed at voxel (k, j, i) of ``volume``; returns its index."""
    return node.AddControlPointWorld(*ras(volume, k, j, i))
