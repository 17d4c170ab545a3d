"""The Hermes authors' preprocessing, and the way back to the input's voxel grid.

Their pipeline (``dataset_conversion/*_3d.py`` then ``nii2npy.py``), reproduced with the
same SimpleITK operations so integer stages match exactly:

1. Direction -> identity (``redirect_to_identity``): only when the direction is not
   exactly the identity. A B-spline resample onto an identity-direction grid of the
   same size and spacing, centred on the same point, with the affine ``inv(D)`` about
   that centre. For axis flips this leaves voxel order unchanged (the network sees the
   stored order) and only re-interpolates values (integer types truncate, so about
   half the voxels move by 1).
2. In-plane resampling to 1.5 mm with cubic B-spline, z kept; then z to 1.5 mm with
   nearest neighbour. Sizes are ``round(size * spacing / 1.5)``; origin and direction are
   kept; points outside are 0 in raw units; the pixel type is kept (truncation again).
3. Intensities in float32: CT clipped to [-991, 500]; MR/PET to their own 2nd-98th
   percentiles; then a z-score with the clipped volume's mean and population std.
4. Axes shorter than 128 are zero-padded by ceil((128 - n) / 2) on *both* sides.

``to_input_grid`` undoes all of it for probability maps: it drops the padding and
resamples (trilinear) from the 1.5 mm grid straight onto the original geometry, through
the inverse of the step-1 affine, so each input voxel gets the probability of the
location the network actually saw for it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from biomedseg.errors import InputError
from biomedseg.volume import Volume, to_sitk

TARGET_SPACING = 1.5
CT_CLIP = (-991.0, 500.0)
PERCENTILES = (2.0, 98.0)
MIN_SIZE = 128
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
#: Resampling schemes used by the authors' conversion scripts.
SCHEMES = {
    "two_step": "B-spline in-plane, then nearest neighbour along z (AMOS, BCV, LiTS, KiTS, CHAOS, StructSeg, M&Ms)",
    "bspline": "one cubic B-spline step to 1.5 mm on all axes (brain structures)",
    "inplane": "B-spline in-plane only; z spacing stays native (AutoPET)",
}


@dataclass
class Geometry:
    """Size (x, y, z), spacing, origin and direction of a SimpleITK grid."""

    size: tuple
    spacing: tuple
    origin: tuple
    direction: tuple

    @classmethod
    def of(cls, image) -> "Geometry":
        return cls(tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()),
                   tuple(image.GetDirection()))

    def apply(self, image):
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def reference(self, pixel_id):
        import SimpleITK as sitk

        return self.apply(sitk.Image([int(s) for s in self.size], pixel_id))


@dataclass
class Prepared:
    """The network input and everything needed to map results back."""

    #: float32 (z, y, x), z-scored and padded: what goes into the network.
    array: np.ndarray
    #: Padding added before (and, equally, after) each of z, y, x.
    pad: tuple
    #: Grid of the resampled image (before padding), in the redirected frame.
    grid: Geometry
    #: Grid of the original image (LPS, as SimpleITK sees it).
    source: Geometry
    #: (matrix, centre) of the step-1 affine, or None when no redirection happened.
    redirect: tuple | None
    mean: float
    std: float
    clip: tuple
    #: Intermediate arrays (z, y, x) by stage name, only when asked for.
    stages: dict = field(default_factory=dict)


def redirect_to_identity(image, interpolator=None):
    """Step 1. Returns (image, (matrix, centre) or None)."""
    import SimpleITK as sitk

    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    if np.array_equal(direction, np.eye(3)):
        return image, None
    matrix = np.linalg.inv(direction)  # inv(D) @ I
    size = image.GetSize()
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint([(n - 1) * 0.5 for n in size]))
    half_extent = np.array([0.5 * sp * (n - 1) for sp, n in zip(image.GetSpacing(), size)])
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(matrix.ravel().tolist())
    transform.SetCenter(centre.tolist())
    f = sitk.ResampleImageFilter()
    f.SetSize(size)
    f.SetOutputDirection(IDENTITY)
    f.SetOutputSpacing(image.GetSpacing())
    f.SetOutputOrigin((centre - half_extent).tolist())
    f.SetTransform(transform)
    f.SetInterpolator(sitk.sitkBSpline if interpolator is None else interpolator)
    return f.Execute(image), (matrix, centre)


def resample_to_spacing(image, spacing, interpolator):
    """Steps 2: identity transform onto a grid of ``spacing`` with the same origin and
    direction, ``round(size * old / new)`` voxels, same pixel type, outside = 0."""
    import SimpleITK as sitk

    old_sp, old_size = image.GetSpacing(), image.GetSize()
    size = [max(1, int(round(n * s / t))) for n, s, t in zip(old_size, old_sp, spacing)]
    ref = sitk.Image(size, image.GetPixelIDValue())
    ref.SetSpacing(tuple(float(s) for s in spacing))
    ref.SetOrigin(image.GetOrigin())
    ref.SetDirection(image.GetDirection())
    return sitk.Resample(image, ref, sitk.Transform(3, sitk.sitkIdentity), interpolator)


def resample_like_authors(image, scheme: str = "two_step", spacing: float = TARGET_SPACING, stages: dict | None = None):
    """Step 2 in one of the authors' schemes (see ``SCHEMES``)."""
    import SimpleITK as sitk

    if scheme not in SCHEMES:
        raise InputError(f"Unknown Hermes resampling scheme '{scheme}'; use one of {', '.join(SCHEMES)}.")
    if scheme == "bspline":
        out = resample_to_spacing(image, (spacing,) * 3, sitk.sitkBSpline)
        if stages is not None:
            stages["resampled_xyz"] = sitk.GetArrayFromImage(out)
        return out
    xy = resample_to_spacing(image, (spacing, spacing, image.GetSpacing()[2]), sitk.sitkBSpline)
    if stages is not None:
        stages["resampled_xy"] = sitk.GetArrayFromImage(xy)
    if scheme == "inplane":
        return xy
    out = resample_to_spacing(xy, (spacing,) * 3, sitk.sitkNearestNeighbor)
    if stages is not None:
        stages["resampled_xyz"] = sitk.GetArrayFromImage(out)
    return out


def intensity_kind(modality_id: int) -> str:
    """'ct' (fixed HU window) for CT, 'percentile' for every MR and PET modality."""
    return "ct" if int(modality_id) == 0 else "percentile"


def normalise(array: np.ndarray, kind: str) -> tuple[np.ndarray, float, float, tuple]:
    """Step 3 on a (z, y, x) array; returns (float32 array, mean, std, clip range).

    A constant volume (std 0) becomes all zeros instead of NaN."""
    img = np.asarray(array).astype(np.float32)
    if kind == "ct":
        low, high = CT_CLIP
    elif kind == "percentile":
        low, high = np.percentile(img, PERCENTILES[0]), np.percentile(img, PERCENTILES[1])
    else:
        raise InputError(f"Unknown intensity normalisation '{kind}'; use 'ct' or 'percentile'.")
    img = np.clip(img, low, high)
    mean = np.mean(img)
    std = np.std(img)
    img -= mean
    if std > 0:
        img /= std
    return img.astype(np.float32, copy=False), float(mean), float(std), (float(low), float(high))


def pad_to_size(array: np.ndarray, size: int = MIN_SIZE) -> tuple[np.ndarray, tuple]:
    """Step 4: symmetric zero padding of short axes (can give size + 1)."""
    pads = tuple(int(math.ceil((size - n) / 2)) if n < size else 0 for n in array.shape)
    if any(pads):
        array = np.pad(array, [(p, p) for p in pads])
    return array, pads


def preprocess_image(image, modality_id: int, *, scheme: str = "two_step", keep_stages: bool = False,
                     min_size: int = MIN_SIZE) -> Prepared:
    """Steps 1-4 on a 3D SimpleITK image (LPS geometry, any pixel type). ``min_size`` is
    the padding target of step 4 (the authors' 128, the window size; smaller only for
    smaller windows)."""
    import SimpleITK as sitk

    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError("Hermes needs a single-channel 3D image.")
    stages: dict = {}
    source = Geometry.of(image)
    if keep_stages:
        stages["input"] = sitk.GetArrayFromImage(image)
    redirected, redirect = redirect_to_identity(image)
    if keep_stages:
        stages["redirected"] = sitk.GetArrayFromImage(redirected)
    resampled = resample_like_authors(redirected, scheme, stages=stages if keep_stages else None)
    arr, mean, std, clip = normalise(sitk.GetArrayFromImage(resampled), intensity_kind(modality_id))
    if keep_stages:
        stages["clip_zscore"] = arr.copy()
    padded, pads = pad_to_size(arr, min_size)
    if keep_stages:
        stages["padded"] = padded
    return Prepared(np.ascontiguousarray(padded, dtype=np.float32), pads, Geometry.of(resampled), source, redirect,
                    mean, std, clip, stages)


def preprocess_volume(volume: Volume, modality_id: int, **kwargs) -> Prepared:
    """Steps 1-4 on an engine Volume (colour volumes are averaged to grey first)."""
    if volume.channels_last:
        volume = Volume(volume.grayscale(), volume.ijk_to_ras, name=volume.name, meta=volume.meta)
    if volume.array.dtype == np.float16:  # SimpleITK has no half-precision pixel type
        volume = volume.with_array(volume.array.astype(np.float32))
    return preprocess_image(to_sitk(volume), modality_id, **kwargs)


def to_input_grid(prob: np.ndarray, prepared: Prepared, interpolator=None) -> np.ndarray:
    """(T, z, y, x) maps on the padded network grid -> (T, k, j, i) float32 on the
    original image grid. Trilinear by default; points past the resampled grid's edge
    take the nearest edge value rather than 0."""
    import SimpleITK as sitk

    prob = np.asarray(prob, dtype=np.float32)
    if prob.ndim == 3:
        prob = prob[None]
    pz, py, px = prepared.pad
    nx, ny, nz = prepared.grid.size
    if prob.shape[1:] != (nz + 2 * pz, ny + 2 * py, nx + 2 * px):
        raise InputError(f"Probability maps of shape {prob.shape[1:]} do not match the network grid "
                         f"{(nz + 2 * pz, ny + 2 * py, nx + 2 * px)}.")
    transform = sitk.AffineTransform(3)  # identity unless step 1 moved the data
    if prepared.redirect is not None:
        matrix, centre = prepared.redirect
        transform.SetMatrix(np.linalg.inv(matrix).ravel().tolist())
        transform.SetCenter([float(c) for c in centre])
    f = sitk.ResampleImageFilter()
    f.SetReferenceImage(prepared.source.reference(sitk.sitkFloat32))
    f.SetTransform(transform)
    f.SetInterpolator(sitk.sitkLinear if interpolator is None else interpolator)
    f.SetDefaultPixelValue(0.0)
    f.SetUseNearestNeighborExtrapolator(True)
    f.SetOutputPixelType(sitk.sitkFloat32)
    sx, sy, sz = prepared.source.size
    out = np.empty((prob.shape[0], sz, sy, sx), dtype=np.float32)
    for t in range(prob.shape[0]):
        crop = np.ascontiguousarray(prob[t, pz:pz + nz, py:py + ny, px:px + nx])
        image = prepared.grid.apply(sitk.GetImageFromArray(crop))
        out[t] = sitk.GetArrayFromImage(f.Execute(image))
    return out
