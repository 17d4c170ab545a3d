"""A target's probability map as a scalar volume node over its image, the uncertain band highlighted.

The node lies on the image's voxel grid in world RAS (a parent transform hardened into it, as the run
read the image) and is named "<target> probability". Its colour table shows voxels far below the
threshold as transparent, the band of ``BAND`` around the threshold bright (yellow at the threshold,
fading to red), and confident voxels above it as a faint dark red; window/level is fixed at 0..1.
A later run for the same target replaces the voxels of the node (and the entries of the colour
table) this module made before, so maps do not pile up; a person's own node of that name is never
touched.
"""
from __future__ import annotations

import numpy as np

from ..errors import InputError
from .volumes import grid_of, image_data_from_array, numpy_to_matrix

#: Attribute that marks the nodes made here (its value: the target name).
PROBABILITY_ATTRIBUTE = "BiomedSeg.probability"
#: Half-width of the highlighted band around the threshold.
BAND = 0.25
N_COLORS = 256


def band_colors(threshold: float, band: float = BAND, n: int = N_COLORS) -> np.ndarray:
    """(n, 4) RGBA for probabilities 0..1 evenly: transparent far below ``threshold``, bright within ``band``."""
    v = np.linspace(0.0, 1.0, n)
    near = np.clip(1.0 - np.abs(v - threshold) / band, 0.0, 1.0)  # 1 at the threshold, 0 beyond the band
    rgb = np.stack([0.6 + 0.4 * near, near, np.zeros(n)], axis=1)  # dark red -> yellow
    alpha = 0.85 * np.where(v >= threshold, np.maximum(near, 0.3), near)
    return np.column_stack([rgb, alpha])


def _own_node(scene, class_name: str, name: str):
    nodes = scene.GetNodesByClassByName(class_name, name)
    for index in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(index)
        if node.GetClassName() == class_name and node.GetAttribute(PROBABILITY_ATTRIBUTE) is not None:
            return node
    return None


def _own_or_new(scene, cls, title: str, name: str):
    """Our node called ``title`` (marked with ``PROBABILITY_ATTRIBUTE``), or a new one added to the scene."""
    node = _own_node(scene, cls.__name__, title)
    if node is None:
        node = cls()
        node.SetName(title)
        node.SetAttribute(PROBABILITY_ATTRIBUTE, name)
        scene.AddNode(node)
    return node


def probability_colors(scene, name: str, threshold: float):
    """The colour table node "<name> probability colours" for ``threshold`` (made once, refilled after)."""
    import slicer

    table = _own_or_new(scene, slicer.vtkMRMLColorTableNode, f"{name} probability colours", name)
    if not table.GetNumberOfColors():
        table.SetTypeToUser()
    colours = band_colors(threshold)
    table.SetNumberOfColors(len(colours))
    for index, (r, g, b, a) in enumerate(colours):
        table.SetColor(index, f"{index / (len(colours) - 1):.3f}", r, g, b, a)
    table.SetAttribute("BiomedSeg.threshold", repr(float(threshold)))
    return table


def show_probability_map(scene, reference_volume_node, name: str, probability: np.ndarray, threshold: float,
                         show: bool = True):
    """The scalar volume node "<name> probability" holding ``probability`` (k, j, i on the reference node's grid).

    ``show`` also puts it in every slice view's foreground (over the image). Returns the node.
    """
    import slicer

    grid = grid_of(reference_volume_node, harden_transform=True)
    probability = np.asarray(probability)
    if tuple(probability.shape) != tuple(grid.shape):
        raise InputError(f"The probability map of '{name}' has shape {probability.shape}, not the grid "
                         f"{tuple(grid.shape)} of '{reference_volume_node.GetName()}'.")
    node = _own_or_new(scene, slicer.vtkMRMLScalarVolumeNode, f"{name} probability", name)
    node.SetAndObserveTransformNodeID(None)  # the grid is in world RAS already
    node.SetIJKToRASMatrix(numpy_to_matrix(grid.ijk_to_ras))
    node.SetAndObserveImageData(image_data_from_array(probability.astype(np.float32, copy=False), 1))
    node.SetAttribute("BiomedSeg.threshold", repr(float(threshold)))
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.SetAutoWindowLevel(False)
    display.SetWindowLevelMinMax(0.0, 1.0)
    display.SetAndObserveColorNodeID(probability_colors(scene, name, threshold).GetID())
    if show:
        composites = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
        for index in range(composites.GetNumberOfItems()):
            composite = composites.GetItemAsObject(index)
            composite.SetForegroundVolumeID(node.GetID())
            composite.SetForegroundOpacity(1.0)  # the colour table's alpha lets the image through
    return node


def hide_probability_maps(scene) -> int:
    """Take every probability map out of the slice views' foreground (the person unticked *Show probability
    map*: an old run's map must not sit over the new result). Returns how many views changed."""
    changed = 0
    composites = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    for index in range(composites.GetNumberOfItems()):
        composite = composites.GetItemAsObject(index)
        node = scene.GetNodeByID(composite.GetForegroundVolumeID() or "")
        if node is not None and node.GetAttribute(PROBABILITY_ATTRIBUTE):
            composite.SetForegroundVolumeID(None)
            changed += 1
    return changed


__all__ = ["BAND", "PROBABILITY_ATTRIBUTE", "band_colors", "probability_colors", "show_probability_map",
           "hide_probability_maps"]
