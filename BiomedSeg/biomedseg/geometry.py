"""Regions of a volume: a slice range along a patient plane, an RAS box, and the crop they make.

One crop path for every model and every caller (CLI, panel, worker): the request names the
region in patient terms (``Region``), ``region_box`` turns it into a box of array indices,
``crop_volume`` cuts that box out as a Volume at its true position, and ``uncrop`` puts a
result back on the full grid. Nothing here imports torch.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InputError
from .volume import SLICE_PLANES, Volume


@dataclass(frozen=True)
class Crop:
    """A box of the volume in array indices (k, j, i), half-open."""

    start: tuple[int, int, int]
    stop: tuple[int, int, int]

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(b - a for a, b in zip(self.start, self.stop))

    def to_list(self) -> list[list[int]]:
        return [[a, b] for a, b in zip(self.start, self.stop)]


@dataclass(frozen=True)
class Region:
    """Where to segment, in the terms a person uses.

    ``plane`` names the patient plane whose slices ``slice_range`` counts (inclusive array
    indices along the axis closest to that plane's normal; slice-wise models also cut along
    it). ``roi`` is an axis-aligned RAS box ``((x0, y0, z0), (x1, y1, z1))`` such as a markups
    ROI. Both may be given; the region is then their intersection.
    """

    plane: str = "axial"
    slice_range: tuple[int, int] | None = None
    roi: tuple[tuple[float, float, float], tuple[float, float, float]] | None = None

    @property
    def whole(self) -> bool:
        return self.slice_range is None and self.roi is None

    def to_dict(self) -> dict:
        return {"plane": self.plane, "slice_range": list(self.slice_range) if self.slice_range else None,
                "roi": [list(self.roi[0]), list(self.roi[1])] if self.roi else None}

    @classmethod
    def from_dict(cls, data: dict | None) -> "Region":
        """A region from JSON-like data, with an InputError for anything malformed."""
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise InputError(f"The region must be an object with plane, slice_range and roi, got {data!r}.")
        return make_region(data.get("plane") or "axial", data.get("slice_range"), data.get("roi"))


def make_region(plane: str = "axial", slice_range=None, roi=None) -> Region:
    """Check and normalise the parts of a region (clear errors for what a person typed)."""
    if not isinstance(plane, str) or plane.lower() not in SLICE_PLANES:
        raise InputError(f"Unknown slice plane {plane!r}; use axial, coronal or sagittal.")
    if slice_range is not None:
        if (not isinstance(slice_range, (list, tuple)) or len(slice_range) != 2
                or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in slice_range)):
            raise InputError(f"The slice range must be two whole numbers (first, last), got {slice_range!r}.")
        first, last = (int(v) for v in slice_range)
        _refuse_reversed(first, last)
        slice_range = (first, last)
    if roi is not None:
        try:
            if isinstance(roi, dict):
                lo, hi = roi.get("min", roi.get("ras_min")), roi.get("max", roi.get("ras_max"))
            else:
                lo, hi = roi
            lo, hi = np.asarray(lo, float).reshape(3), np.asarray(hi, float).reshape(3)
        except (TypeError, ValueError):
            raise InputError(f"The region of interest must be an RAS box [[x0, y0, z0], [x1, y1, z1]], "
                             f"got {roi!r}.") from None
        if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
            raise InputError("The region of interest has non-finite corners.")
        roi = (tuple(float(v) for v in np.minimum(lo, hi)), tuple(float(v) for v in np.maximum(lo, hi)))
    return Region(plane.lower(), slice_range, roi)


def _refuse_reversed(first: int, last: int) -> None:
    if first > last:  # a typo, most likely: refused rather than guessed
        raise InputError(f"Slice range {first}..{last} is reversed: the first slice must not be greater than the last.",
                         hint=f"Give the lower slice first (e.g. {last} {first}).")


def crop_for_roi(volume: Volume, ras_min, ras_max) -> Crop:
    """Smallest box of voxels whose centres cover an axis-aligned RAS box (e.g. a markups ROI)."""
    lo, hi = np.asarray(ras_min, float), np.asarray(ras_max, float)
    corners = np.array([[x, y, z, 1.0] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    ijk = (np.linalg.inv(volume.ijk_to_ras) @ corners.T).T[:, :3]
    start_ijk = np.clip(np.floor(ijk.min(axis=0) + 0.5), 0, None).astype(int)
    stop_ijk = np.ceil(ijk.max(axis=0) - 0.5).astype(int) + 1
    shape_ijk = np.array(volume.shape[::-1])
    stop_ijk = np.minimum(stop_ijk, shape_ijk)
    if np.any(stop_ijk <= start_ijk):
        raise InputError("The region of interest does not overlap the volume.",
                         hint="Move the ROI onto the image, or clear it.")
    return Crop(tuple(int(v) for v in start_ijk[::-1]), tuple(int(v) for v in stop_ijk[::-1]))


def region_box(volume: Volume, region: Region | None) -> Crop | None:
    """The array box (k, j, i) of ``region`` on ``volume``; None when it is the whole volume."""
    if region is None or region.whole:
        return None
    start, stop = [0, 0, 0], list(volume.shape)
    if region.roi is not None:
        box = crop_for_roi(volume, *region.roi)
        start, stop = list(box.start), list(box.stop)
    if region.slice_range is not None:
        axis = volume.slice_orientation(region.plane).slice_axis
        first, last = region.slice_range
        _refuse_reversed(first, last)
        n = volume.shape[axis]
        if not 0 <= first <= last < n:
            raise InputError(f"Slice range {first}..{last} is outside 0..{n - 1} for the {region.plane} axis.",
                             hint="Set the first and last slice within the volume, or drop the slice range.")
        lo, hi = max(first, start[axis]), min(last + 1, stop[axis])
        if hi <= lo:
            raise InputError("The slice range and the region of interest do not overlap.",
                             hint="Move the ROI or change the slice range.")
        start[axis], stop[axis] = lo, hi
    box = Crop(tuple(start), tuple(stop))
    return None if box.start == (0, 0, 0) and box.stop == volume.shape else box


def crop_volume(volume: Volume, box: Crop) -> Volume:
    """The voxels inside ``box`` as a Volume at their true position (origin moved, axes kept)."""
    k, j, i = box.start
    m = volume.ijk_to_ras.copy()
    m[:3, 3] = (volume.ijk_to_ras @ np.array([i, j, k, 1.0]))[:3]
    meta = {key: value for key, value in volume.meta.items() if key != "dicom_files"}
    meta["cropped_from"] = box.to_list()
    return Volume(np.ascontiguousarray(volume.array[box.slices]), m, name=volume.name, meta=meta,
                  channels_last=volume.channels_last)


def uncrop(array: np.ndarray, box: Crop | None, shape: tuple[int, int, int], fill=0) -> np.ndarray:
    """``array`` (the crop's grid) placed on the full grid of ``shape``; ``fill`` elsewhere."""
    if box is None:
        return array
    full = np.full(tuple(shape) + array.shape[3:], fill, dtype=array.dtype)
    full[box.slices] = array
    return full
