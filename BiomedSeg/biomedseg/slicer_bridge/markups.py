"""Markups -> the engine's terms: an ROI's RAS box, and boxes and points as typed prompts.

Everything is read in world RAS (parent transforms applied), the space the engine's prompts
live in; the engine maps them onto each model's voxel grid.
"""
from __future__ import annotations

from ..errors import InputError
from ..prompts import BoxPrompt, PointPrompt
from .volumes import node_label


def roi_ras_bounds(roi_node) -> tuple[list[float], list[float]]:
    """(min, max) RAS corners of the axis-aligned box around a markups ROI, in world coordinates.

    A rotated ROI gives the box that contains it, so nothing inside the ROI is left out.
    """
    bounds = [0.0] * 6
    roi_node.GetRASBounds(bounds)
    if bounds[1] < bounds[0] or bounds[3] < bounds[2] or bounds[5] < bounds[4]:
        raise InputError(f"The region of interest '{node_label(roi_node)}' has no size; place it on the image first.")
    return [bounds[0], bounds[2], bounds[4]], [bounds[1], bounds[3], bounds[5]]


def prompts_from_markups(node, target: str = "object", plane: str | None = "axial", include: bool = True) -> list:
    """Typed prompts from a markups node: an ROI is a box (drawn on ``plane``, or 3D when ``plane`` is
    None); every control point of a point list is a click, on the object (``include``) or not."""
    if node.IsA("vtkMRMLMarkupsROINode"):
        lo, hi = roi_ras_bounds(node)
        return [BoxPrompt(tuple(lo), tuple(hi), plane, target)]
    if node.IsA("vtkMRMLMarkupsFiducialNode"):
        points = []
        for n in range(node.GetNumberOfControlPoints()):
            position = [0.0, 0.0, 0.0]
            node.GetNthControlPointPositionWorld(n, position)
            points.append(PointPrompt(tuple(position), include, plane, target))
        if not points:
            raise InputError(f"The point list '{node_label(node)}' has no points; click on the image first.")
        return points
    raise InputError(f"'{node_label(node)}' is a {node.GetClassName()}; use an ROI (a box) or a point list as a prompt.")


def control_point_prompt(node, index: int, include: bool = True, plane: str | None = "axial",
                         target: str = "object") -> PointPrompt:
    """One control point of a point list as a click (world RAS), e.g. the one a person just placed."""
    if not 0 <= index < node.GetNumberOfControlPoints():
        raise InputError(f"The point list '{node_label(node)}' has no point {index + 1}.")
    position = [0.0, 0.0, 0.0]
    node.GetNthControlPointPositionWorld(index, position)
    return PointPrompt(tuple(position), include, plane, target)


def control_point_id(node, index: int) -> str:
    return node.GetNthControlPointID(index) or ""


def remove_markup(node, point_id: str | None = None) -> None:
    """Take back a placed prompt: the control point with ``point_id``, or (None) the whole node (a box)."""
    if node is None:
        return
    if point_id is None:
        if node.GetScene() is not None:
            node.GetScene().RemoveNode(node)
        return
    index = node.GetNthControlPointIndexByID(point_id)
    if index >= 0:
        node.RemoveNthControlPoint(index)
