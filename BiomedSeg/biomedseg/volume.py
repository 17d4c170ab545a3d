"""The one geometry type that crosses every boundary of the engine.

A ``Volume`` is a voxel array in (k, j, i) order -- slowest axis first, as SimpleITK,
VTK and Slicer's ``arrayFromVolume`` hand it out -- plus the 4x4 matrix that maps a
voxel index (i, j, k, 1) to patient RAS millimetres. Colour images carry their
channels in a trailing axis: (k, j, i, c). Nothing else in the engine carries spacing,
origin or direction; conversions to LPS happen only at file boundaries.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import InputError

#: RAS <-> LPS flip: the same matrix converts both ways.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

#: Statistics of an image (percentile windows, the share of air) are taken over at most this many voxels,
#: evenly strided through the array: found in milliseconds, with no float copy of the whole image
#: (plan runs on every click of an interactive session).
VOXEL_SAMPLES = 2 ** 21


def strided_sample(values, most: int = VOXEL_SAMPLES) -> np.ndarray:
    """At most about ``most`` values of ``values`` (any shape), evenly strided through it: a flat view."""
    flat = np.asarray(values).reshape(-1)
    return flat[::max(1, flat.size // most)]


#: Patient directions in RAS coordinates, by the letter radiologists use.
PATIENT_DIRECTIONS = {
    "R": (1.0, 0.0, 0.0), "L": (-1.0, 0.0, 0.0),
    "A": (0.0, 1.0, 0.0), "P": (0.0, -1.0, 0.0),
    "S": (0.0, 0.0, 1.0), "I": (0.0, 0.0, -1.0),
}

#: Slice planes by name: (normal direction, display row direction, display column direction).
#: Display conventions are the radiological ones that DICOM scanners and most 2D models
#: use: axial shows anterior at the top and the patient's right on the left; coronal and
#: sagittal show superior at the top, sagittal with anterior on the left.
SLICE_PLANES = {
    "axial": ("S", "P", "L"),
    "coronal": ("A", "I", "L"),
    "sagittal": ("R", "I", "P"),
}


@dataclass
class Volume:
    """Voxels in (k, j, i[, c]) order and the affine from (i, j, k) to RAS millimetres."""

    array: np.ndarray
    ijk_to_ras: np.ndarray
    name: str = ""
    #: Where it came from and what is known about it: source path, DICOM files and tags
    #: (modality, body part, series UID), original coordinate system. Never geometry.
    meta: dict[str, Any] = field(default_factory=dict)
    #: True when the trailing axis holds colour channels (RGB/RGBA).
    channels_last: bool = False

    def __post_init__(self):
        self.ijk_to_ras = np.asarray(self.ijk_to_ras, dtype=np.float64)
        self.array = np.asarray(self.array)
        validate(self)

    # ---- geometry -------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape in (k, j, i) order."""
        return tuple(self.array.shape[:3])

    @property
    def n_channels(self) -> int:
        return self.array.shape[3] if self.channels_last else 1

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size along (i, j, k) in millimetres."""
        return np.linalg.norm(self.ijk_to_ras[:3, :3], axis=0)

    @property
    def origin(self) -> np.ndarray:
        """RAS position of voxel (0, 0, 0)."""
        return self.ijk_to_ras[:3, 3].copy()

    @property
    def direction(self) -> np.ndarray:
        """3x3 matrix whose columns are the unit RAS directions of the i, j, k axes."""
        return self.ijk_to_ras[:3, :3] / self.spacing

    @property
    def ijk_to_lps(self) -> np.ndarray:
        return LPS_TO_RAS @ self.ijk_to_ras

    def ras_of_voxels(self) -> np.ndarray:
        """RAS coordinates of every voxel centre, shaped (k, j, i, 3)."""
        k, j, i = np.meshgrid(*(np.arange(n) for n in self.shape), indexing="ij")
        ijk1 = np.stack([i, j, k, np.ones_like(i)], axis=-1).astype(np.float64)
        return (ijk1 @ self.ijk_to_ras.T)[..., :3]

    def with_array(self, array: np.ndarray, name: str | None = None) -> "Volume":
        """A volume on the same voxel grid holding other data (a mask, probabilities)."""
        array = np.asarray(array)
        if tuple(array.shape[:3]) != self.shape:
            raise InputError(f"Array of shape {array.shape} does not fit the grid {self.shape} of "
                             f"'{self.name or 'the volume'}'.")
        return Volume(array, self.ijk_to_ras.copy(), name=self.name if name is None else name,
                      meta=dict(self.meta), channels_last=array.ndim == 4)

    def same_grid(self, other: "Volume", atol: float = 1e-4) -> bool:
        return self.shape == other.shape and np.allclose(self.ijk_to_ras, other.ijk_to_ras, atol=atol)

    def grayscale(self) -> np.ndarray:
        """Single-channel view: colour images are averaged over RGB (alpha ignored)."""
        if not self.channels_last:
            return self.array
        return self.array[..., :3].astype(np.float32).mean(axis=-1)

    # ---- patient axes and slices ------------------------------------------------------
    def axis_closest_to(self, direction: str) -> int:
        """Array axis (0 = k, 1 = j, 2 = i) whose direction is closest to a patient
        direction ('S' for axial slicing, 'A' for coronal, 'R' for sagittal; any of RLAPSI)."""
        target = np.asarray(PATIENT_DIRECTIONS[direction.upper()])
        ijk_axis = int(np.argmax(np.abs(target @ self.direction)))
        return 2 - ijk_axis

    def slice_orientation(self, plane: str = "axial") -> "SliceOrientation":
        return SliceOrientation.for_plane(self, plane)

    # ---- describing ------------------------------------------------------------------
    def orientation_code(self) -> str:
        """Three letters (RAS style) naming where the i, j, k axes point, e.g. 'LPS'."""
        letters = []
        for col in self.direction.T:
            axis = int(np.argmax(np.abs(col)))
            letters.append("RAS"[axis] if col[axis] > 0 else "LPI"[axis])
        return "".join(letters)

    def __repr__(self) -> str:
        sp = ", ".join(f"{s:.4g}" for s in self.spacing)
        return (f"Volume({self.name!r}, shape(k,j,i)={self.shape}, channels={self.n_channels}, "
                f"dtype={self.array.dtype}, spacing(i,j,k)=({sp}), orientation={self.orientation_code()})")


def validate(volume: Volume, source: str | None = None) -> None:
    """Refuse data the engine cannot place in patient space, naming the problem."""
    where = f"'{source or volume.meta.get('source') or volume.name or 'volume'}'"
    arr, m = volume.array, volume.ijk_to_ras
    if m.shape != (4, 4):
        raise InputError(f"{where}: the voxel-to-patient matrix must be 4x4, got {m.shape}.")
    if not np.all(np.isfinite(m)):
        raise InputError(f"{where}: the geometry (spacing, origin or direction) holds non-finite numbers.")
    if not np.allclose(m[3], [0, 0, 0, 1]):
        raise InputError(f"{where}: the voxel-to-patient matrix is not affine (last row {m[3].tolist()}).")
    if np.iscomplexobj(arr):
        raise InputError(f"{where}: complex-valued voxels are not supported; save magnitude "
                         "(or real/imaginary parts) as a real image first.")
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise InputError(f"{where}: voxel type {arr.dtype} is not numeric.")
    expected_ndim = 4 if volume.channels_last else 3
    if arr.ndim != expected_ndim:
        if arr.ndim == 4 and not volume.channels_last:
            raise InputError(f"{where}: 4D images (shape {arr.shape}) are not supported; "
                             "extract one time point or channel first.")
        raise InputError(f"{where}: expected a {expected_ndim}D voxel array, got shape {arr.shape}.")
    if volume.channels_last and arr.shape[3] not in (1, 2, 3, 4):
        raise InputError(f"{where}: {arr.shape[3]} channels per voxel is not a colour image; "
                         "4D images (time series, multi-component) are not supported.")
    if min(arr.shape[:3]) < 1:
        raise InputError(f"{where}: the image is empty (shape {arr.shape}).")
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    if np.any(spacing <= 0):
        raise InputError(f"{where}: voxel spacing must be positive, got {spacing.tolist()}.")
    if abs(np.linalg.det(m[:3, :3] / spacing)) < 1e-6:
        raise InputError(f"{where}: the direction matrix is not invertible (two image axes are parallel).")
    if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
        n_bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        raise InputError(f"{where}: {n_bad} voxels are NaN or infinite; replace them "
                         "(e.g. with the background value) before segmenting.")


@dataclass(frozen=True)
class SliceOrientation:
    """How to cut a volume into 2D slices of one patient plane shown the way models expect.

    ``to_display`` turns a (k, j, i[, c]) array into (slice, row, column[, c]) with rows
    and columns flipped into the plane's display convention; ``from_display`` is its exact
    inverse, so a stack of 2D results lands back on the input's voxel grid. Only
    transposes and flips are used: no resampling, nothing lost.
    """

    plane: str
    slice_axis: int  # array axis (0=k, 1=j, 2=i) that indexes slices
    row_axis: int
    col_axis: int
    flip_slices: bool  # True when slice index 0 is not at the plane normal's negative end
    flip_rows: bool
    flip_cols: bool

    @classmethod
    def for_plane(cls, volume: Volume, plane: str = "axial") -> "SliceOrientation":
        try:
            normal, row_dir, col_dir = SLICE_PLANES[plane.lower()]
        except KeyError:
            raise InputError(f"Unknown slice plane '{plane}'; use one of {sorted(SLICE_PLANES)}.") from None
        # RAS direction of each array axis (k, j, i).
        axis_dirs = volume.direction.T[::-1]
        slice_axis = volume.axis_closest_to(normal)
        in_plane = [a for a in range(3) if a != slice_axis]
        r, c = np.asarray(PATIENT_DIRECTIONS[row_dir]), np.asarray(PATIENT_DIRECTIONS[col_dir])
        score_keep = abs(axis_dirs[in_plane[0]] @ r) + abs(axis_dirs[in_plane[1]] @ c)
        score_swap = abs(axis_dirs[in_plane[1]] @ r) + abs(axis_dirs[in_plane[0]] @ c)
        row_axis, col_axis = in_plane if score_keep >= score_swap else in_plane[::-1]
        n = np.asarray(PATIENT_DIRECTIONS[normal])
        return cls(plane.lower(), slice_axis, row_axis, col_axis,
                   flip_slices=bool(axis_dirs[slice_axis] @ n < 0),
                   flip_rows=bool(axis_dirs[row_axis] @ r < 0),
                   flip_cols=bool(axis_dirs[col_axis] @ c < 0))

    def to_display(self, array: np.ndarray) -> np.ndarray:
        """(k, j, i, ...) -> (slice, row, col, ...); a view where numpy allows."""
        extra = tuple(range(3, array.ndim))
        out = np.transpose(array, (self.slice_axis, self.row_axis, self.col_axis) + extra)
        flips = [ax for ax, f in ((0, self.flip_slices), (1, self.flip_rows), (2, self.flip_cols)) if f]
        return np.flip(out, axis=flips) if flips else out

    def from_display(self, array: np.ndarray) -> np.ndarray:
        """Exact inverse of ``to_display``: (slice, row, col, ...) -> (k, j, i, ...)."""
        flips = [ax for ax, f in ((0, self.flip_slices), (1, self.flip_rows), (2, self.flip_cols)) if f]
        out = np.flip(array, axis=flips) if flips else array
        order = (self.slice_axis, self.row_axis, self.col_axis)
        inverse = tuple(int(np.argsort(order)[a]) for a in range(3))
        return np.transpose(out, inverse + tuple(range(3, array.ndim)))

    def display_slice_index(self, array_index: int, n_slices: int) -> int:
        """Position in the display stack of array slice ``array_index`` along ``slice_axis``."""
        return n_slices - 1 - array_index if self.flip_slices else array_index


# ---- conversions to and from third-party geometry conventions ---------------------------

def from_sitk(image, name: str = "", meta: dict | None = None) -> Volume:
    """SimpleITK image (LPS) -> Volume (RAS). 2D images become one-slice volumes."""
    import SimpleITK as sitk

    dim = image.GetDimension()
    if dim == 4:
        where = (meta or {}).get("source") or name or "image"
        raise InputError(f"'{where}': 4D images (size {image.GetSize()}) are not supported; "
                         "extract one time point first.")
    n_comp = image.GetNumberOfComponentsPerPixel()
    array = sitk.GetArrayFromImage(image)
    spacing = np.array(image.GetSpacing(), dtype=np.float64)
    origin = np.array(image.GetOrigin(), dtype=np.float64)
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(dim, dim)
    if dim == 2:
        array = array[None]
        spacing = np.append(spacing, 1.0)
        origin = np.append(origin, 0.0)
        d3 = np.eye(3)
        d3[:2, :2] = direction
        direction = d3
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = direction * spacing
    ijk_to_lps[:3, 3] = origin
    return Volume(array, LPS_TO_RAS @ ijk_to_lps, name=name, meta=dict(meta or {}),
                  channels_last=n_comp > 1)


def to_sitk(volume: Volume):
    """Volume -> SimpleITK image in LPS with the same voxels (no copy of geometry lost)."""
    import SimpleITK as sitk

    array = volume.array
    if array.dtype == bool:
        array = array.astype(np.uint8)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=volume.channels_last)
    lps = volume.ijk_to_lps
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    image.SetDirection((lps[:3, :3] / spacing).ravel().tolist())
    return image


def from_nibabel(img, name: str = "", meta: dict | None = None) -> Volume:
    """nibabel image (array in i, j, k order, affine to RAS) -> Volume."""
    shape = img.shape
    where = (meta or {}).get("source") or name or "image"
    if len(shape) > 3 and any(s > 1 for s in shape[3:]):
        raise InputError(f"'{where}': 4D images (shape {shape}) are not supported; "
                         "extract one time point or channel first.")
    data = np.asanyarray(img.dataobj)
    if np.iscomplexobj(data):
        raise InputError(f"'{where}': complex-valued voxels are not supported; save magnitude "
                         "(or real/imaginary parts) as a real image first.")
    if data.dtype.names:  # NIfTI RGB24 / RGBA32 structured types
        data = np.stack([data[n] for n in data.dtype.names], axis=-1)
        channels = True
    else:
        channels = False
    data = data.reshape(shape[:3] + data.shape[len(shape):] if channels else shape[:3])
    array = np.transpose(data, (2, 1, 0, 3) if channels else (2, 1, 0))
    return Volume(np.ascontiguousarray(array), np.asarray(img.affine, dtype=np.float64), name=name,
                  meta=dict(meta or {}), channels_last=channels)


def nifti_xform_codes(volume: Volume) -> tuple[int, int]:
    """(sform_code, qform_code) to write: those of the NIfTI file the volume was read from, which the reader
    keeps in ``meta["nifti_xform_codes"]`` (1 scanner, 2 aligned, 3 Talairach, 4 MNI, 5 template: an MNI
    template's result stays in MNI space); else 1, 1 (scanner). Both transforms are always written (readers
    that prefer the qform must see the same grid), so a code the input left at 0 takes the other's."""
    codes = volume.meta.get("nifti_xform_codes") or {}
    try:
        sform, qform = int(codes["sform"]), int(codes["qform"])
    except (KeyError, TypeError, ValueError):
        return 1, 1
    if not (0 <= sform <= 5 and 0 <= qform <= 5) or (sform == 0 and qform == 0):
        return 1, 1
    return sform or qform, qform or sform


def to_nibabel(volume: Volume):
    """Volume -> nibabel Nifti1Image with sform and qform both set to the RAS affine (codes: ``nifti_xform_codes``)."""
    import nibabel as nib

    if volume.channels_last:
        raise InputError("Colour volumes are written as NRRD or PNG, not NIfTI labelmaps.")
    array = volume.array.astype(np.uint8) if volume.array.dtype == bool else volume.array
    img = nib.Nifti1Image(np.transpose(array, (2, 1, 0)), volume.ijk_to_ras)
    sform_code, qform_code = nifti_xform_codes(volume)
    img.set_qform(volume.ijk_to_ras, code=qform_code)
    img.set_sform(volume.ijk_to_ras, code=sform_code)
    return img


def nrrd_header(volume: Volume, space: str = "left-posterior-superior") -> dict:
    """NRRD header fields (pynrrd style, data in i, j, k order) for a volume's geometry."""
    if space == "left-posterior-superior":
        m = volume.ijk_to_lps
    elif space == "right-anterior-superior":
        m = volume.ijk_to_ras
    else:
        raise InputError(f"NRRD space '{space}' is not supported.")
    header = {"space": space, "space directions": m[:3, :3].T.copy(), "space origin": m[:3, 3].copy()}
    if volume.channels_last:
        header["space directions"] = np.vstack([[np.nan] * 3, m[:3, :3].T])
        header["kinds"] = ["vector", "domain", "domain", "domain"]
    else:
        header["kinds"] = ["domain", "domain", "domain"]
    return header


#: NRRD axis kinds that index samples (time points, frames, layers), never colour channels.
NRRD_NON_CHANNEL_KINDS = {"domain", "space", "time", "list", "point", "scalar"}


def from_nrrd(data: np.ndarray, header: dict, name: str = "", meta: dict | None = None) -> Volume:
    """pynrrd (data in i, j, k order, index_order='F') + header -> Volume."""
    where = (meta or {}).get("source") or name or "image"
    space = str(header.get("space", "left-posterior-superior")).lower()
    aliases = {"lps": "left-posterior-superior", "ras": "right-anterior-superior",
               "left-posterior-superior": "left-posterior-superior",
               "right-anterior-superior": "right-anterior-superior"}
    if space not in aliases:
        raise InputError(f"'{where}': NRRD space '{space}' is not a patient space this engine reads "
                         "(use left-posterior-superior or right-anterior-superior).")
    kinds = list(header.get("kinds", ["domain"] * data.ndim))
    directions = header.get("space directions")
    if directions is None:
        raise InputError(f"'{where}': the NRRD header has no 'space directions', so the image cannot be "
                         "placed in patient space.")
    directions = np.asarray(directions, dtype=np.float64)
    spatial = [a for a in range(data.ndim) if not np.all(np.isnan(directions[a]))]
    other = [a for a in range(data.ndim) if a not in spatial]
    other_kind = str(kinds[other[0]]).lower() if other and other[0] < len(kinds) else "none"
    if other and data.shape[other[0]] > 1 and other_kind == "complex":
        raise InputError(f"'{where}': complex-valued voxels are not supported; save magnitude "
                         "(or real/imaginary parts) as a real image first.")
    # A non-spatial axis of kind domain/space/time/list (frames, layers) makes a 4D image,
    # however few entries it has; only vector/colour kinds (or none given) are channels.
    if (len(spatial) != 3 or len(other) > 1 or (other and data.shape[other[0]] > 4)
            or (other and data.shape[other[0]] > 1 and other_kind in NRRD_NON_CHANNEL_KINDS)):
        raise InputError(f"'{where}': NRRD with axes kinds {kinds} and size {list(data.shape)} is not a 3D "
                         "image; 4D images (time series, multi-component) are not supported.")
    if other and data.shape[other[0]] > 1:
        data = np.moveaxis(data, other[0], -1)
        channels = True
    else:
        data = data.squeeze(axis=tuple(other)) if other else data
        channels = False
    m = np.eye(4)
    m[:3, :3] = directions[spatial].T
    m[:3, 3] = np.asarray(header.get("space origin", np.zeros(3)), dtype=np.float64)
    if aliases[space] == "left-posterior-superior":
        m = LPS_TO_RAS @ m
    array = np.transpose(data, (2, 1, 0, 3) if channels else (2, 1, 0))
    return Volume(np.ascontiguousarray(array), m, name=name, meta=dict(meta or {}), channels_last=channels)
