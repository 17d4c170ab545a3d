"""DICOM files as single files: one header's tags, and a series' files in a volume's slice order.

The panel needs both for volumes Slicer loaded from DICOM (it knows their files, not a folder):
the tags start the modality and site guess, the order lets a DICOM SEG refer to the right
image for each slice. Headers only, read with SimpleITK; no pixel data and no Slicer.
"""
from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..volume import Volume
from .readers import DICOM_TAGS, dicom_geometry_warnings


def read_dicom_tags(path: str) -> dict:
    """Modality, body part and series description of one DICOM file (header only; {} if unreadable)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return {}
    return {name: reader.GetMetaData(key).strip() for key, name in DICOM_TAGS.items() if reader.HasMetaDataKey(key)}


def read_dicom_geometry_warnings(path: str, n_slices: int = 1) -> list[str]:
    """Sentences for the geometry tags one DICOM file lacks (no Pixel Spacing: 1 mm assumed; no
    position or orientation: the origin, axial), as the readers put in ``Volume.meta["warnings"]``."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return []
    return dicom_geometry_warnings(f"'{path}'", reader.HasMetaDataKey, reader, n_slices)


def order_dicom_files(volume: Volume, files: list[str]) -> list[str]:
    """DICOM files in the volume's slice order (file k holds slice k), by their patient position."""
    import SimpleITK as sitk

    to_index = np.linalg.inv(volume.ijk_to_lps)
    by_slice: dict[int, str] = {}
    for name in files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(name))
        reader.ReadImageInformation()
        if not reader.HasMetaDataKey("0020|0032"):
            raise InputError(f"'{name}' has no Image Position (Patient); it cannot be placed in the volume.")
        position = [float(v) for v in reader.GetMetaData("0020|0032").split("\\")]
        k = int(round((to_index @ np.array(position + [1.0]))[2]))
        by_slice[k] = str(name)
    if sorted(by_slice) != list(range(volume.shape[0])):
        raise InputError(f"The {len(files)} DICOM files do not match the {volume.shape[0]} slices of "
                         f"'{volume.name}'; it was changed after loading.", hint="Export as .seg.nrrd instead.")
    return [by_slice[k] for k in range(volume.shape[0])]


__all__ = ["read_dicom_tags", "read_dicom_geometry_warnings", "order_dicom_files"]
