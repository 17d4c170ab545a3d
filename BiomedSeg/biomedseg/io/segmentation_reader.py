"""Reading segments back onto an image's grid (for refining them, or keeping them beside a result).

A ``.seg.nrrd`` (slicerio) usually covers only the segments' extent, on the image's grid or
on another one. A segmentation whose grid is the image's, shifted by whole voxels, is pasted
exactly; any other grid is resampled with nearest neighbour (SimpleITK), which is said in the
returned notes. Labelmaps (NIfTI, NRRD, MHA) are read the same way, with names and colours
from the ``.labels.json`` table we write next to them, else ``label N``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..segments import Segment
from ..volume import Volume
from .readers import read_volume, suffix_of

#: Largest deviation (in voxels) for two grids to count as the same up to a whole-voxel shift.
GRID_TOLERANCE = 1e-3


def _on_grid(mask_kji: np.ndarray, mask_ijk_to_ras: np.ndarray, reference: Volume) -> tuple[np.ndarray, str | None]:
    """``mask_kji`` (k, j, i on its own grid) on ``reference``'s grid, and a note if it was resampled."""
    t = np.linalg.inv(reference.ijk_to_ras) @ mask_ijk_to_ras  # mask ijk -> reference ijk
    offset = t[:3, 3]
    if np.allclose(t[:3, :3], np.eye(3), atol=GRID_TOLERANCE) and np.allclose(offset, np.round(offset),
                                                                                 atol=GRID_TOLERANCE):
        out = np.zeros(reference.shape, bool)
        shift = np.round(offset).astype(int)[::-1]  # (k, j, i)
        src, dst = [], []
        for axis in range(3):
            lo = max(0, shift[axis])
            hi = min(reference.shape[axis], shift[axis] + mask_kji.shape[axis])
            if hi <= lo:
                return out, None
            dst.append(slice(lo, hi))
            src.append(slice(lo - shift[axis], hi - shift[axis]))
        out[tuple(dst)] = mask_kji[tuple(src)]
        return out, None
    from ..volume import from_sitk, to_sitk
    import SimpleITK as sitk

    moving = to_sitk(Volume(mask_kji.astype(np.uint8), mask_ijk_to_ras))
    fixed = to_sitk(reference.with_array(np.zeros(reference.shape, np.uint8)))
    resampled = sitk.Resample(moving, fixed, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return from_sitk(resampled).array.astype(bool), "resampled with nearest neighbour onto the image grid"


def read_segments(path: str | Path, reference: Volume) -> tuple[list[Segment], list[str]]:
    """Every segment of a segmentation file, on ``reference``'s grid, and notes on how it was read."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"Segmentation '{path}' does not exist.")
    if path.name.lower().endswith(".seg.nrrd"):
        return _read_seg_nrrd(path, reference)
    return _read_labelmap(path, reference)


def _read_seg_nrrd(path: Path, reference: Volume) -> tuple[list[Segment], list[str]]:
    import slicerio

    try:
        segmentation = slicerio.read_segmentation(str(path))
    except Exception as exc:  # noqa: BLE001 -- slicerio/pynrrd raise many kinds for a bad file
        raise InputError(f"Segmentation '{path}' cannot be read ({exc}).") from None
    lps_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
    ijk_to_ras = lps_to_ras @ np.asarray(segmentation["ijkToLPS"], float)
    notes, out = [], []
    for info in segmentation["segments"]:
        mask_ijk = slicerio.segment_mask(segmentation, info)
        mask, note = _on_grid(np.transpose(mask_ijk, (2, 1, 0)), ijk_to_ras, reference)
        if note and note not in notes:
            notes.append(note)
        out.append(Segment(info.get("name") or info.get("id"), mask, tuple(info.get("color") or ()) or None,
                           info.get("terminology")))
    return out, notes


def _read_labelmap(path: Path, reference: Volume) -> tuple[list[Segment], list[str]]:
    labels = read_volume(path)
    if labels.channels_last or not np.issubdtype(labels.array.dtype, np.integer):
        raise InputError(f"'{path}' is not a labelmap (whole-number labels, one channel).",
                         hint="Give a .seg.nrrd or a labelmap written by BiomedSeg or Slicer.")
    table = path.with_name(path.name[: -len(suffix_of(path))] + ".labels.json")
    rows = {}
    if table.is_file():
        try:
            rows = {int(r["label"]): r for r in json.loads(table.read_text()).get("labels", [])}
        except (ValueError, KeyError, TypeError, AttributeError):
            rows = {}
    notes, out = [], []
    for value in sorted(int(v) for v in np.unique(labels.array) if v != 0):
        mask, note = _on_grid(labels.array == value, labels.ijk_to_ras, reference)
        if note and note not in notes:
            notes.append(note)
        row = rows.get(value, {})
        out.append(Segment(row.get("name") or f"label {value}", mask,
                           tuple(row["color"]) if row.get("color") else None, row.get("terminology"), label=value))
    return out, notes


def find_segment(segments: list[Segment], name: str, path) -> Segment:
    """The segment called ``name`` (case-insensitive), or an InputError listing the names there are."""
    for seg in segments:
        if seg.name == name:
            return seg
    for seg in segments:
        if seg.name.lower() == name.lower():
            return seg
    names = ", ".join(repr(s.name) for s in segments) or "none"
    raise InputError(f"'{path}' has no segment called {name!r}; it has {names}.")
