"""Volume geometry: basics, patient axes, and slicing into display planes.

Every expectation is derived from geometry (voxel RAS coordinates, direction columns),
never from a table of remembered answers.
"""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "BiomedSeg"))

from biomedseg.errors import InputError  # noqa: E402
from biomedseg.volume import (  # noqa: E402
    LPS_TO_RAS, PATIENT_DIRECTIONS, SLICE_PLANES, Volume, from_nibabel, from_nrrd,
    from_sitk, nrrd_header, to_nibabel, to_sitk)
from geometry_cases import DIRECTIONS, OBLIQUE, rotation  # noqa: E402

SPACING_IJK = np.array([0.7, 1.3, 2.9])
ORIGIN = np.array([-12.25, 31.5, -7.125])


def affine(direction, spacing=SPACING_IJK, origin=ORIGIN):
    m = np.eye(4)
    m[:3, :3] = np.asarray(direction) * spacing
    m[:3, 3] = origin
    return m


def make_volume(direction, shape_kji=(4, 5, 6), channels=0):
    shape = tuple(shape_kji) + ((channels,) if channels else ())
    array = np.arange(int(np.prod(shape)), dtype=np.int32).reshape(shape)
    return Volume(array, affine(direction), name="v", channels_last=bool(channels))


# ---- basics -------------------------------------------------------------------------------

def test_spacing_origin_direction_and_lps():
    d = OBLIQUE
    v = make_volume(d)
    np.testing.assert_allclose(v.spacing, SPACING_IJK, atol=1e-12)
    np.testing.assert_allclose(v.origin, ORIGIN)
    np.testing.assert_allclose(v.direction, d, atol=1e-12)
    np.testing.assert_allclose(v.direction.T @ v.direction, np.eye(3), atol=1e-12)
    # LPS matrix: x and y negated, z kept.
    lps = v.ijk_to_lps
    np.testing.assert_allclose(lps[0], -v.ijk_to_ras[0])
    np.testing.assert_allclose(lps[1], -v.ijk_to_ras[1])
    np.testing.assert_allclose(lps[2:], v.ijk_to_ras[2:])
    assert v.shape == (4, 5, 6) and v.n_channels == 1


def test_ras_of_voxels_matches_affine_at_every_voxel():
    v = make_volume(OBLIQUE, (3, 4, 5))
    ras = v.ras_of_voxels()
    assert ras.shape == (3, 4, 5, 3)
    for k, j, i in itertools.product(range(3), range(4), range(5)):
        expected = v.ijk_to_ras @ np.array([i, j, k, 1.0])
        np.testing.assert_allclose(ras[k, j, i], expected[:3], atol=1e-12)
    # origin is voxel (0, 0, 0); stepping i moves by the first column.
    np.testing.assert_allclose(ras[0, 0, 0], v.origin)
    np.testing.assert_allclose(ras[0, 0, 1] - ras[0, 0, 0], v.ijk_to_ras[:3, 0], atol=1e-12)
    np.testing.assert_allclose(ras[1, 0, 0] - ras[0, 0, 0], v.ijk_to_ras[:3, 2], atol=1e-12)


def test_with_array_same_grid_and_errors():
    v = make_volume(np.eye(3))
    mask = v.array % 2 == 0
    m = v.with_array(mask, name="mask")
    assert m.same_grid(v) and m.name == "mask" and m.array.dtype == bool
    m.ijk_to_ras[0, 3] = 99  # a copy: the source is untouched
    assert v.origin[0] == ORIGIN[0]
    with pytest.raises(InputError, match=r"does not fit the grid"):
        v.with_array(np.zeros((4, 5, 7)))
    shifted = Volume(v.array, affine(np.eye(3), origin=ORIGIN + [0.01, 0, 0]))
    assert not v.same_grid(shifted)


def test_grayscale_averages_rgb_ignoring_alpha():
    rgba = np.zeros((1, 2, 3, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 30, 60, 90, 255
    v = Volume(rgba, np.eye(4), channels_last=True)
    assert v.n_channels == 4
    np.testing.assert_allclose(v.grayscale(), 60.0)
    gray = Volume(np.ones((1, 2, 3)), np.eye(4))
    assert gray.grayscale() is gray.array


@pytest.mark.parametrize("name,direction", DIRECTIONS, ids=[n for n, _ in DIRECTIONS])
def test_orientation_code_names_where_axes_point(name, direction):
    v = make_volume(direction)
    code = v.orientation_code()
    for col, letter in enumerate(code):
        # the letter's unit direction is the RAS axis closest to the column
        assert v.direction[:, col] @ np.asarray(PATIENT_DIRECTIONS[letter]) > 0.7, (code, col)


@pytest.mark.parametrize("bad,match", [
    (dict(ijk_to_ras=np.diag([1.0, 0.0, 1.0, 1.0])), "spacing must be positive"),
    (dict(ijk_to_ras=np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])), "not invertible"),
    (dict(ijk_to_ras=np.array([[1, 2, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])), "not invertible"),
    (dict(ijk_to_ras=np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1.0]])), "not affine"),
    (dict(ijk_to_ras=np.diag([1.0, np.nan, 1.0, 1.0])), "non-finite"),
    (dict(array=np.zeros((2, 3, 4), dtype=np.complex64)), "complex"),
    (dict(array=np.zeros((2, 3, 4, 5))), "4D images"),
    (dict(array=np.zeros((0, 3, 4))), "empty"),
    (dict(array=np.full((2, 3, 4), np.inf, dtype=np.float32)), "24 voxels are NaN or infinite"),
])
def test_validate_refuses_what_cannot_be_placed(bad, match):
    kwargs = dict(array=np.zeros((2, 3, 4)), ijk_to_ras=np.eye(4), name="bad-volume")
    kwargs.update(bad)
    with pytest.raises(InputError, match=match) as info:
        Volume(**kwargs)
    assert "bad-volume" in str(info.value)


# ---- patient axes -------------------------------------------------------------------------

@pytest.mark.parametrize("name,direction", DIRECTIONS[:-1], ids=[n for n, _ in DIRECTIONS[:-1]])
def test_axis_closest_to_on_permuted_and_flipped_directions(name, direction):
    v = make_volume(direction)
    for letter, ras_axis in (("R", 0), ("A", 1), ("S", 2)):
        # the ijk column holding +-1 in this RAS row; array axis order is (k, j, i)
        ijk_axis = int(np.flatnonzero(direction[ras_axis])[0])
        assert v.axis_closest_to(letter) == 2 - ijk_axis
        opposite = {"R": "L", "A": "P", "S": "I"}[letter]
        assert v.axis_closest_to(opposite) == 2 - ijk_axis
        assert v.axis_closest_to(letter.lower()) == 2 - ijk_axis


@pytest.mark.parametrize("degrees,expected", [
    # rotating about R by 30 deg: j -> (0, .87, .5), k -> (0, -.5, .87): S is still k, A still j
    (30.0, {"S": 0, "A": 1, "R": 2}),
    # by 60 deg: j -> (0, .5, .87), k -> (0, -.87, .5): S is now j, A is k
    (60.0, {"S": 1, "A": 0, "R": 2}),
    # by -120 deg: j -> (0, -.5, -.87), k -> (0, .87, -.5): S closest to j (flipped), A to k
    (-120.0, {"S": 1, "A": 0, "R": 2}),
])
def test_axis_closest_to_on_oblique_directions(degrees, expected):
    d = rotation([1, 0, 0], degrees)
    v = make_volume(d)
    for letter, axis in expected.items():
        assert v.axis_closest_to(letter) == axis, letter


# ---- slice orientation ----------------------------------------------------------------------

PLANES = sorted(SLICE_PLANES)


def _display_steps(volume, plane):
    """RAS step of one display slice / row / column, checked constant over the whole stack."""
    so = volume.slice_orientation(plane)
    ras = so.to_display(volume.ras_of_voxels())  # (slice, row, col, 3)
    steps = []
    for axis in range(3):
        diffs = np.diff(ras, axis=axis).reshape(-1, 3)
        np.testing.assert_allclose(diffs, np.broadcast_to(diffs[0], diffs.shape), atol=1e-9)
        steps.append(diffs[0])
    return so, ras, steps


@pytest.mark.parametrize("plane", PLANES)
@pytest.mark.parametrize("name,direction", DIRECTIONS, ids=[n for n, _ in DIRECTIONS])
def test_display_round_trip_is_exact(name, direction, plane):
    for channels in (0, 3):
        v = make_volume(direction, (4, 5, 6), channels)
        so = v.slice_orientation(plane)
        shown = so.to_display(v.array)
        assert sorted(shown.shape[:3]) == sorted(v.shape)
        if channels:
            assert shown.shape[3] == channels
        back = so.from_display(shown)
        assert back.shape == v.array.shape
        assert np.array_equal(back, v.array)
        # and the other way round: any display-ordered stack lands on the grid
        stack = np.arange(shown.size).reshape(shown.shape)
        assert np.array_equal(so.to_display(so.from_display(stack)), stack)


@pytest.mark.parametrize("plane", PLANES)
@pytest.mark.parametrize("name,direction", DIRECTIONS, ids=[n for n, _ in DIRECTIONS])
def test_display_rows_and_columns_point_the_plane_way(name, direction, plane):
    normal, row_dir, col_dir = SLICE_PLANES[plane]
    v = make_volume(direction, (4, 5, 6))
    so, ras, (slice_step, row_step, col_step) = _display_steps(v, plane)
    # slice/row/col steps are whole voxel steps along array axes
    assert {round(float(np.linalg.norm(s)), 9) for s in (slice_step, row_step, col_step)} == \
        {round(float(s), 9) for s in SPACING_IJK}
    for step, letter in ((slice_step, normal), (row_step, row_dir), (col_step, col_dir)):
        unit = step / np.linalg.norm(step)
        target = np.asarray(PATIENT_DIRECTIONS[letter])
        if name == "oblique":
            # tilted 22 degrees about a skew axis: each display axis within 30 degrees of its direction
            assert unit @ target > np.cos(np.deg2rad(30)), (plane, letter, unit)
        else:
            np.testing.assert_allclose(unit, target, atol=1e-12, err_msg=f"{plane} {letter}")
    # the display index of an array slice agrees with where that slice lands
    n = v.array.shape[so.slice_axis]
    for index in range(n):
        taken = np.take(v.array, index, axis=so.slice_axis)
        shown = so.to_display(v.array)[so.display_slice_index(index, n)]
        assert sorted(taken.ravel()) == sorted(shown.ravel())


@pytest.mark.parametrize("plane", PLANES)
def test_plane_conventions_in_words(plane):
    """Axial: anterior at the top, patient right on the left; coronal/sagittal: superior on top."""
    v = make_volume(np.eye(3), (4, 5, 6))
    _, ras, _ = _display_steps(v, plane)
    top, bottom = ras[0, 0, 0], ras[0, -1, 0]
    left, right = ras[0, 0, 0], ras[0, 0, -1]
    if plane == "axial":
        assert top[1] > bottom[1]  # top row more anterior
        assert left[0] > right[0]  # left column more to the patient's right
    elif plane == "coronal":
        assert top[2] > bottom[2] and left[0] > right[0]
    else:
        assert top[2] > bottom[2] and left[1] > right[1]  # anterior on the left
    assert ras[1, 0, 0] @ np.asarray(PATIENT_DIRECTIONS[SLICE_PLANES[plane][0]]) > \
        ras[0, 0, 0] @ np.asarray(PATIENT_DIRECTIONS[SLICE_PLANES[plane][0]])


def test_unknown_plane_is_refused():
    with pytest.raises(InputError, match="Unknown slice plane 'oblique'"):
        make_volume(np.eye(3)).slice_orientation("oblique")


def test_lps_identity_axial_display_is_the_array_as_stored():
    """A DICOM-like LPS identity volume (and every 2D image) is already in axial display order."""
    v = Volume(np.arange(60).reshape(3, 4, 5), LPS_TO_RAS @ np.eye(4))
    so = v.slice_orientation("axial")
    assert (so.slice_axis, so.row_axis, so.col_axis) == (0, 1, 2)
    assert not (so.flip_slices or so.flip_rows or so.flip_cols)
    assert np.array_equal(so.to_display(v.array), v.array)


def test_png_is_a_one_slice_volume_shown_as_stored(tmp_path):
    from PIL import Image

    from biomedseg.io import read_volume

    rng = np.random.default_rng(3)
    gray = rng.integers(0, 255, size=(7, 11), dtype=np.uint8)
    rgb = rng.integers(0, 255, size=(7, 11, 3), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "g.png")
    Image.fromarray(rgb).save(tmp_path / "c.png")
    for name, pixels in (("g.png", gray), ("c.png", rgb)):
        v = read_volume(tmp_path / name)
        assert v.shape == (1, 7, 11)
        assert v.channels_last == (pixels.ndim == 3)
        shown = v.slice_orientation("axial").to_display(v.array)
        assert shown.shape[0] == 1
        assert np.array_equal(shown[0], pixels)
        # and geometrically: rows step posterior, columns step to the patient's left
        so, ras, (_, row_step, col_step) = _display_steps(Volume(np.zeros((2, 7, 11)), v.ijk_to_ras), "axial")
        np.testing.assert_allclose(row_step / np.linalg.norm(row_step), PATIENT_DIRECTIONS["P"], atol=1e-12)
        np.testing.assert_allclose(col_step / np.linalg.norm(col_step), PATIENT_DIRECTIONS["L"], atol=1e-12)


# ---- conversions ----------------------------------------------------------------------------

@pytest.mark.parametrize("name,direction", [DIRECTIONS[0], DIRECTIONS[13], DIRECTIONS[-1]],
                         ids=[DIRECTIONS[0][0], DIRECTIONS[13][0], "oblique"])
def test_conversions_round_trip(name, direction):
    v = make_volume(direction, (4, 5, 6))
    image = to_sitk(v)
    # SimpleITK is LPS: its origin is the RAS origin with x, y negated.
    np.testing.assert_allclose(image.GetOrigin(), LPS_TO_RAS[:3, :3] @ v.origin)
    np.testing.assert_allclose(image.GetSpacing(), v.spacing)
    for other in (from_sitk(image), from_nibabel(to_nibabel(v))):
        assert other.same_grid(v, atol=1e-5)
        assert np.array_equal(other.array, v.array)
    for space in ("left-posterior-superior", "right-anterior-superior"):
        header = nrrd_header(v, space)
        back = from_nrrd(np.transpose(v.array, (2, 1, 0)), header)
        assert back.same_grid(v, atol=1e-12) and np.array_equal(back.array, v.array)
    # the sitk index of voxel (i, j, k) is the same physical point
    idx = (3, 1, 2)
    lps = np.array(image.TransformIndexToPhysicalPoint(idx))
    np.testing.assert_allclose(LPS_TO_RAS[:3, :3] @ lps, v.ras_of_voxels()[idx[2], idx[1], idx[0]], atol=1e-9)


def test_sitk_2d_image_becomes_one_slice_volume():
    import SimpleITK as sitk

    pixels = np.arange(12, dtype=np.uint8).reshape(3, 4)
    image = sitk.GetImageFromArray(pixels)
    image.SetSpacing((0.5, 0.25))
    image.SetOrigin((10.0, 20.0))
    v = from_sitk(image)
    assert v.shape == (1, 3, 4) and np.array_equal(v.array[0], pixels)
    np.testing.assert_allclose(v.spacing, [0.5, 0.25, 1.0])
    np.testing.assert_allclose(v.origin, [-10.0, -20.0, 0.0])


def test_colour_volume_nrrd_header_marks_vector_axis():
    v = make_volume(np.eye(3), (2, 3, 4), channels=3)
    header = nrrd_header(v)
    assert header["kinds"][0] == "vector" and np.all(np.isnan(header["space directions"][0]))
    back = from_nrrd(np.transpose(v.array, (3, 2, 1, 0)), header)
    assert back.channels_last and np.array_equal(back.array, v.array) and back.same_grid(v)
