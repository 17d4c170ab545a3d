"""MRML nodes <-> engine types: the only engine package that touches Slicer's classes.

``volumes``: volume nodes become ``Volume`` objects (and back) with their exact voxel grid in
world RAS (the scene's patient space). ``segmentations``: segments computed by the engine are
written into a ``vtkMRMLSegmentationNode`` with names, colours and terminology, and every write
returns a record that undoes it exactly. ``editable``: a model's mask written into one segment
inside the Segment Editor's editable area (mask mode, intensity range, overwrite mode, locked
segments), with the same undo record. ``exports``: labelmap nodes, .seg.nrrd files and
segments back as ``Segment``s. ``probability_maps``: a target's soft map as a volume node over the
image. ``markups``: ROIs and markups as regions and typed prompts.

Only this package and ``BiomedSeg.py`` import ``slicer``; it runs inside Slicer and in the
tests (``slicer-core``), never in the worker.
"""
from .exports import (export_to_labelmap_node, load_segmentation, new_segmentation_node, save_segmentation,
                      segments_from_node, segments_of, show_segmentation)
from .editable import (LOCKED_TAG, EditRules, apply_rules, describe_rules, editable_area, editor_rules,
                       is_segment_locked, set_segment_locked, write_in_editable_area)
from .markups import control_point_id, control_point_prompt, prompts_from_markups, remove_markup, roi_ras_bounds
from .probability_maps import hide_probability_maps, show_probability_map
from .segmentations import (BINARY_LABELMAP, REFERENCE_GEOMETRY, ensure_converter_rules, reference_geometry_parameter,
                            segment_labelmap, segment_mask, segment_tag, terminology_from_tag, terminology_tag_name,
                            terminology_to_tag, undo_segments, write_segments)
from .volumes import dicom_files_of, grid_of, image_stamp, matrix_to_numpy, node_from_volume, numpy_to_matrix, volume_from_node

__all__ = ["BINARY_LABELMAP", "REFERENCE_GEOMETRY", "dicom_files_of", "ensure_converter_rules",
           "export_to_labelmap_node", "load_segmentation", "matrix_to_numpy", "new_segmentation_node",
           "node_from_volume", "numpy_to_matrix", "prompts_from_markups", "reference_geometry_parameter",
           "roi_ras_bounds", "save_segmentation", "segment_labelmap", "segment_mask", "segment_tag",
           "segments_from_node", "segments_of", "show_segmentation", "terminology_from_tag", "terminology_tag_name",
           "terminology_to_tag", "undo_segments", "volume_from_node", "write_segments",
           # editable area, locks and markups of the correction workflow
           "LOCKED_TAG", "EditRules", "apply_rules", "describe_rules", "editable_area", "editor_rules",
           "is_segment_locked", "set_segment_locked", "write_in_editable_area", "control_point_id",
           "control_point_prompt", "remove_markup", "grid_of", "image_stamp",
           # soft maps over the image (the panel's "Show probability map")
           "show_probability_map", "hide_probability_maps"]
