"""Voxel-exact geometry through files, for every axis permutation and flip plus an oblique grid.

A mask is defined in patient space -- voxel centres inside a sphere around a RAS point
near the grid centre AND on the patient's right of the plane x = 0 (RAS x > 0) -- so any
mirror, axis swap or half-voxel shift anywhere in the chain changes which voxels are set.
It is written by an independent writer (nibabel, pynrrd in LPS and in RAS, SimpleITK),
read with ``biomedseg.io.read_volume``, and written back with ``write_segmentation`` /
``write_volume``; every file is read back by independent readers (slicerio, nibabel,
SimpleITK, pynrrd) and the expected mask is recomputed from *that reader's* geometry:
zero mismatched voxels are allowed.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "BiomedSeg"))

import nibabel as nib  # noqa: E402
import nrrd  # noqa: E402
import SimpleITK as sitk  # noqa: E402
import slicerio  # noqa: E402

from biomedseg.io import read_volume, write_segmentation, write_volume  # noqa: E402
from biomedseg.volume import LPS_TO_RAS  # noqa: E402
from conftest import require_tool  # noqa: E402
from geometry_cases import DIRECTIONS, rotation  # noqa: E402

SHAPE_IJK = (13, 16, 18)
SPACING_IJK = np.array([1.05, 0.85, 0.75])
#: RAS point the sphere is centred on; the plane x = 0 cuts the sphere 1.37 mm from it.
CENTRE = np.array([1.37, -2.21, 3.53])
#: Grid centre sits a little away from the sphere centre (non-round, no symmetry).
GRID_CENTRE_OFFSET = np.array([0.113, -0.071, 0.049])
RADIUS = 6.0
#: No voxel centre lies closer than this to the part of the sphere surface or cutting plane
#: that bounds the mask, so float32 storage of geometry (NIfTI: ~1e-5 mm here) cannot flip a
#: voxel, while a mirror, swap or even a 1/100-voxel shift would.
MARGIN_MM = 0.002
#: Geometry read back must agree with the written one this closely (float32 headers).
GEOMETRY_ATOL = 1e-3


# ---- geometry helpers (independent of biomedseg) ---------------------------------------------

def ras_grid(ijk_to_ras, shape_ijk):
    """RAS x, y, z of voxel centres as three arrays in (i, j, k) order (broadcast, no meshgrid)."""
    i = np.arange(shape_ijk[0], dtype=np.float64)[:, None, None]
    j = np.arange(shape_ijk[1], dtype=np.float64)[None, :, None]
    k = np.arange(shape_ijk[2], dtype=np.float64)[None, None, :]
    m = np.asarray(ijk_to_ras, dtype=np.float64)
    return [m[r, 0] * i + m[r, 1] * j + m[r, 2] * k + m[r, 3] for r in range(3)]


def sphere_mask_ijk(ijk_to_ras, shape_ijk, radius=RADIUS, centre=CENTRE, plane_x=0.0):
    """The patient-space mask on a grid, in (i, j, k) order: inside the sphere and x > plane_x
    (``plane_x=None``: the whole ball)."""
    x, y, z = ras_grid(ijk_to_ras, shape_ijk)
    d2 = (x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2
    return (d2 < radius ** 2) & (x > plane_x) if plane_x is not None else d2 < radius ** 2


def margins(ijk_to_ras, shape_ijk, radius, centre=CENTRE):
    """Closest voxel centre to the sphere surface (where x > 0 decides nothing) and to the
    plane x = 0 (inside the ball), in mm."""
    x, y, z = ras_grid(ijk_to_ras, shape_ijk)
    d = np.sqrt((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2)
    surface = np.abs(d - radius)[x > -MARGIN_MM]
    plane = np.abs(x)[d < radius + MARGIN_MM]
    return float(surface.min(initial=np.inf)), float(plane.min(initial=np.inf))


def truth_affine(direction, shape_ijk=SHAPE_IJK, spacing=SPACING_IJK):
    m = np.eye(4)
    m[:3, :3] = direction * spacing
    grid_centre = (np.asarray(shape_ijk) - 1) / 2.0
    m[:3, 3] = CENTRE + GRID_CENTRE_OFFSET - m[:3, :3] @ grid_centre
    # nudge the grid along x until no voxel centre lies within MARGIN_MM of the plane x = 0
    for _ in range(200):
        if margins(m, shape_ijk, RADIUS + 0.5)[1] >= MARGIN_MM:
            break
        m[0, 3] += 0.00131
    return m


def choose_radius(ijk_to_ras, shape_ijk):
    """Smallest radius >= RADIUS with no voxel centre within MARGIN_MM of the surface."""
    radius = RADIUS
    for _ in range(200):
        if margins(ijk_to_ras, shape_ijk, radius)[0] >= MARGIN_MM:
            break
        radius += 0.00173
    return radius


def ras_from_lps(m):
    return LPS_TO_RAS @ np.asarray(m, dtype=np.float64)


def sitk_ijk_to_ras(image):
    d = np.array(image.GetDirection()).reshape(3, 3)
    m = np.eye(4)
    m[:3, :3] = d * np.array(image.GetSpacing())
    m[:3, 3] = image.GetOrigin()
    return ras_from_lps(m)


def nrrd_ijk_to_ras(header):
    m = np.eye(4)
    m[:3, :3] = np.asarray(header["space directions"], dtype=np.float64).T
    m[:3, 3] = header["space origin"]
    space = header["space"]
    assert space in ("left-posterior-superior", "right-anterior-superior"), space
    return ras_from_lps(m) if space == "left-posterior-superior" else m


# ---- independent writers -------------------------------------------------------------------

def write_nifti_nibabel(path, mask_ijk, ijk_to_ras):
    nib.save(nib.Nifti1Image(mask_ijk.astype(np.uint8), ijk_to_ras), str(path))


def _write_nrrd_pynrrd(path, mask_ijk, ijk_to_ras, space):
    m = ras_from_lps(ijk_to_ras) if space == "left-posterior-superior" else ijk_to_ras
    header = {"space": space, "space directions": m[:3, :3].T, "space origin": m[:3, 3],
              "kinds": ["domain"] * 3, "encoding": "raw"}
    nrrd.write(str(path), mask_ijk.astype(np.uint8), header, index_order="F")


def write_nrrd_lps(path, mask_ijk, ijk_to_ras):
    _write_nrrd_pynrrd(path, mask_ijk, ijk_to_ras, "left-posterior-superior")


def write_nrrd_ras(path, mask_ijk, ijk_to_ras):
    _write_nrrd_pynrrd(path, mask_ijk, ijk_to_ras, "right-anterior-superior")


def write_mha_sitk(path, mask_ijk, ijk_to_ras):
    lps = ras_from_lps(ijk_to_ras)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(mask_ijk.transpose(2, 1, 0)).astype(np.uint8))
    image.SetSpacing(spacing.tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    image.SetDirection((lps[:3, :3] / spacing).ravel().tolist())
    sitk.WriteImage(image, str(path))


INPUT_WRITERS = {
    "nifti_nibabel_ras": (".nii.gz", write_nifti_nibabel),
    "nrrd_pynrrd_lps": (".nrrd", write_nrrd_lps),
    "nrrd_pynrrd_ras": (".nrrd", write_nrrd_ras),
    "mha_sitk_lps": (".mha", write_mha_sitk),
}


# ---- independent readers of our outputs: (name, mask in (i, j, k), ijk_to_ras) --------------

def read_seg_nrrd_slicerio(path):
    seg = slicerio.read_segmentation(str(path))
    (segment,) = seg["segments"]
    assert segment["name"] == "sphere"
    voxels = seg["voxels"]
    if voxels.ndim == 4:  # layers axis (not expected for one segment)
        voxels = voxels[..., segment.get("layer", 0)]
    return [("slicerio", voxels == segment["labelValue"], ras_from_lps(seg["ijkToLPS"]))]


def read_nifti_both(path):
    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj) == 1
    out = [("nibabel", data, np.asarray(img.affine, dtype=np.float64))]
    # readers that prefer the qform (FSL, some ITK versions) must see the same grid
    qform, qform_code = img.get_qform(coded=True)
    sform, sform_code = img.get_sform(coded=True)
    assert qform_code > 0 and sform_code > 0, (qform_code, sform_code)
    out += [("nibabel qform", data, qform), ("nibabel sform", data, sform)]
    image = sitk.ReadImage(str(path))
    out.append(("SimpleITK", sitk.GetArrayFromImage(image).transpose(2, 1, 0) == 1, sitk_ijk_to_ras(image)))
    return out


def read_nrrd_both(path):
    data, header = nrrd.read(str(path), index_order="F")
    out = [("pynrrd", data == 1, nrrd_ijk_to_ras(header))]
    image = sitk.ReadImage(str(path))
    out.append(("SimpleITK", sitk.GetArrayFromImage(image).transpose(2, 1, 0) == 1, sitk_ijk_to_ras(image)))
    return out


def read_mha_sitk(path):
    image = sitk.ReadImage(str(path))
    return [("SimpleITK", sitk.GetArrayFromImage(image).transpose(2, 1, 0) == 1, sitk_ijk_to_ras(image))]


def check_against_reader(label, mask_ijk, ijk_to_ras, truth, radius, failures):
    """Compare a read-back mask with the sphere evaluated in the reader's own geometry."""
    if not np.allclose(ijk_to_ras, truth, atol=GEOMETRY_ATOL):
        failures.append(f"{label}: geometry differs from the written one:\n{ijk_to_ras}\nvs\n{truth}")
        return
    expected = sphere_mask_ijk(ijk_to_ras, mask_ijk.shape, radius)
    bad = int(np.count_nonzero(expected != mask_ijk))
    if bad:
        failures.append(f"{label}: {bad} voxels differ from the sphere in the reader's geometry")


def parse_reference_geometry(seg_path):
    """Slicer's 'Reference image geometry' conversion parameter: IJK-to-RAS (row major) + extent."""
    header = nrrd.read_header(str(seg_path))
    params = header["Segmentation_ConversionParameters"].split("&")
    value = next(p.split("|")[1] for p in params if p.startswith("Reference image geometry|"))
    numbers = [float(v) for v in value.strip(";").split(";")]
    return np.array(numbers[:16]).reshape(4, 4), [int(v) for v in numbers[16:]]


# ---- the test -------------------------------------------------------------------------------

@pytest.mark.parametrize("writer", sorted(INPUT_WRITERS))
@pytest.mark.parametrize("name,direction", DIRECTIONS, ids=[n for n, _ in DIRECTIONS])
def test_patient_space_mask_survives_every_file(tmp_path, name, direction, writer):
    truth = truth_affine(direction)
    radius = choose_radius(truth, SHAPE_IJK)
    surface_margin, plane_margin = margins(truth, SHAPE_IJK, radius)
    assert surface_margin >= MARGIN_MM and plane_margin >= MARGIN_MM, "test geometry too close to a boundary"
    mask_ijk = sphere_mask_ijk(truth, SHAPE_IJK, radius)
    ball = sphere_mask_ijk(truth, SHAPE_IJK, radius, plane_x=None)
    # the mask is substantial, and really cut by the plane (a good part of the ball has x < 0)
    assert 150 < mask_ijk.sum() < 0.8 * ball.sum()

    suffix, write_input = INPUT_WRITERS[writer]
    source = tmp_path / f"input{suffix}"
    write_input(source, mask_ijk, truth)

    volume = read_volume(source)
    failures: list[str] = []
    np.testing.assert_allclose(volume.ijk_to_ras, truth, atol=GEOMETRY_ATOL)
    assert volume.shape == SHAPE_IJK[::-1] and not volume.channels_last
    assert set(np.unique(volume.array).tolist()) == {0, 1}
    read_mask = volume.array.astype(bool)  # (k, j, i)
    check_against_reader("read_volume", read_mask.transpose(2, 1, 0), volume.ijk_to_ras, truth, radius, failures)
    # also through Volume's own voxel coordinates (ras_of_voxels)
    ras = volume.ras_of_voxels()
    own = (np.sum((ras - CENTRE) ** 2, axis=-1) < radius ** 2) & (ras[..., 0] > 0)
    if not np.array_equal(own, read_mask):
        failures.append(f"read_volume: {int(np.count_nonzero(own != read_mask))} voxels differ via ras_of_voxels")

    outputs = {
        "seg.nrrd": (tmp_path / "out.seg.nrrd", read_seg_nrrd_slicerio),
        "nii.gz": (tmp_path / "out.nii.gz", read_nifti_both),
        "nrrd": (tmp_path / "out_nrrd.nrrd", read_nrrd_both),  # its own label tables: not out.labels.json
    }
    for label, (path, reader) in outputs.items():
        written = write_segmentation(path, volume, {"sphere": read_mask})
        assert written[0] == path and path.exists()
        for reader_name, mask, geometry in reader(path):
            check_against_reader(f"{label} via {reader_name}", mask, geometry, truth, radius, failures)
    reference, extent = parse_reference_geometry(outputs["seg.nrrd"][0])
    if not np.allclose(reference, volume.ijk_to_ras, rtol=0, atol=1e-9):
        failures.append(f"seg.nrrd reference image geometry {reference.tolist()} != {volume.ijk_to_ras.tolist()}")
    if extent != [0, SHAPE_IJK[0] - 1, 0, SHAPE_IJK[1] - 1, 0, SHAPE_IJK[2] - 1]:
        failures.append(f"seg.nrrd reference extent {extent}")

    mha = write_volume(tmp_path / "out.mha", volume.with_array(read_mask.astype(np.uint8)))
    for reader_name, mask, geometry in read_mha_sitk(mha):
        check_against_reader(f"write_volume mha via {reader_name}", mask, geometry, truth, radius, failures)

    # our own reader reads our outputs back onto the same grid with the same voxels
    for path in (outputs["nii.gz"][0], outputs["nrrd"][0], mha):
        again = read_volume(path)
        if not (again.same_grid(volume, atol=GEOMETRY_ATOL) and np.array_equal(again.array > 0, read_mask)):
            failures.append(f"read_volume({path.name}) differs from what was written")
    assert not failures, "\n".join(failures)


# ---- real files ----------------------------------------------------------------------------

@pytest.mark.parametrize("fixture", ["colin_path", "ct_chest_path"], ids=["ch2_nifti_ras", "ctchest_nrrd_lps"])
def test_real_files_agree_with_simpleitk_and_keep_a_cut_sphere(tmp_path, request, fixture):
    path = request.getfixturevalue(fixture)
    volume = read_volume(path)
    image = sitk.ReadImage(str(path))
    # SimpleITK, reading the same file through ITK, places the voxels identically.
    np.testing.assert_allclose(volume.ijk_to_ras, sitk_ijk_to_ras(image), atol=1e-4)
    assert np.array_equal(volume.array, sitk.GetArrayFromImage(image))

    # A sphere around a point near the grid centre, cut by the sagittal plane 2.3 mm to its
    # right, on the real grid -> seg.nrrd / nii.gz -> independent readers.
    shape_ijk = volume.shape[::-1]
    grid_centre = (volume.ijk_to_ras @ np.append((np.asarray(shape_ijk) - 1) / 2.0, 1.0))[:3]
    centre = grid_centre + [0.37, -0.41, 0.29]
    plane_x = centre[0] + 2.3
    radius = 0.2 * float(np.min(np.asarray(shape_ijk) * volume.spacing))
    mask_ijk = sphere_mask_ijk(volume.ijk_to_ras, shape_ijk, radius, centre, plane_x)
    assert 100 < mask_ijk.sum() < 0.5 * sphere_mask_ijk(volume.ijk_to_ras, shape_ijk, radius, centre, None).sum()
    failures: list[str] = []
    for path_out, reader in ((tmp_path / "real.seg.nrrd", read_seg_nrrd_slicerio),
                             (tmp_path / "real.nii.gz", read_nifti_both)):
        write_segmentation(path_out, volume, {"sphere": mask_ijk.transpose(2, 1, 0)})
        for reader_name, mask, geometry in reader(path_out):
            expected = sphere_mask_ijk(geometry, mask.shape, radius, centre, plane_x)
            assert np.allclose(geometry, volume.ijk_to_ras, atol=GEOMETRY_ATOL), (path_out.name, reader_name)
            bad = int(np.count_nonzero(expected != mask))
            if bad:
                failures.append(f"{path_out.name} via {reader_name}: {bad} voxels differ")
    assert not failures, "\n".join(failures)


# ---- validators from Debian (nifti-bin, teem-apps) -------------------------------------------

VALIDATOR_DIRECTIONS = [DIRECTIONS[0], DIRECTIONS[21], DIRECTIONS[-1]]


@pytest.fixture
def written_outputs(tmp_path, request):
    name, direction = request.param
    truth = truth_affine(direction)
    radius = choose_radius(truth, SHAPE_IJK)
    source = tmp_path / "input.nrrd"
    write_nrrd_lps(source, sphere_mask_ijk(truth, SHAPE_IJK, radius), truth)
    volume = read_volume(source)
    mask = volume.array.astype(bool)
    paths = {}
    for suffix in (".seg.nrrd", ".nii.gz", ".nrrd"):  # the two labelmaps each get their own label tables
        stem = "out_nrrd" if suffix == ".nrrd" else "out"
        paths[suffix] = write_segmentation(tmp_path / f"{stem}{suffix}", volume, {"sphere": mask})[0]
    paths["image.nii"] = write_volume(tmp_path / "image.nii", volume.with_array(mask.astype(np.int16)))
    return volume, paths


@pytest.mark.parametrize("written_outputs", VALIDATOR_DIRECTIONS, indirect=True,
                         ids=[n for n, _ in VALIDATOR_DIRECTIONS])
def test_nifti_tool_says_header_is_good(written_outputs):
    tool = require_tool("nifti_tool", "apt-get install nifti-bin")
    volume, paths = written_outputs
    for key in (".nii.gz", "image.nii"):
        result = subprocess.run([tool, "-check_hdr", "-check_nim", "-infiles", str(paths[key])],
                                capture_output=True, text=True, timeout=60)
        out = result.stdout + result.stderr
        assert "header IS GOOD" in out and "nifti_image IS GOOD" in out, out
        assert "FAILURE" not in out, out


@pytest.mark.parametrize("written_outputs", VALIDATOR_DIRECTIONS, indirect=True,
                         ids=[n for n, _ in VALIDATOR_DIRECTIONS])
def test_unu_reads_our_nrrd_and_seg_nrrd(written_outputs, tmp_path):
    # Debian installs teem's unu as teem-unu
    tool = shutil.which("unu") or require_tool("teem-unu", "apt-get install teem-apps")
    volume, paths = written_outputs
    for key in (".nrrd", ".seg.nrrd"):
        copy = tmp_path / f"unu_copy{key.replace('.', '_')}.nrrd"
        result = subprocess.run([tool, "save", "-f", "nrrd", "-i", str(paths[key]), "-o", str(copy)],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        # teem understood the geometry fields the way we meant them
        data, header = nrrd.read(str(copy), index_order="F")
        np.testing.assert_allclose(nrrd_ijk_to_ras(header), volume.ijk_to_ras, atol=1e-9)
        original, _ = nrrd.read(str(paths[key]), index_order="F")
        assert np.array_equal(data, original)


# ---- smaller exactness checks of the writers -------------------------------------------------

def test_reference_geometry_string_is_exact_for_tiny_and_large_entries(tmp_path):
    """Slicer's reference geometry must hold the affine itself: 1e-10 is not 1e-1."""
    from biomedseg.volume import Volume

    m = np.eye(4)
    m[:3, :3] = rotation([0.3, -1.0, 0.2], 1e-8) @ np.diag([0.5, 1e-3, 2.0])
    m[:3, 3] = [-1e-10, 123456.789, 2.5e-7]
    volume = Volume(np.zeros((3, 4, 5), np.uint8), m)
    mask = np.zeros(volume.shape, bool)
    mask[1, 2, 3] = True
    path = write_segmentation(tmp_path / "tiny.seg.nrrd", volume, {"sphere": mask})[0]
    reference, extent = parse_reference_geometry(path)
    np.testing.assert_allclose(reference, m, rtol=1e-15, atol=0)
    assert extent == [0, 4, 0, 3, 0, 2]


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_colour_volume_keeps_channels_and_grid(tmp_path, suffix):
    from biomedseg.volume import Volume

    rgb = np.random.default_rng(0).integers(0, 256, (3, 4, 5, 3), dtype=np.uint8)
    volume = Volume(rgb, truth_affine(DIRECTIONS[-1][1], shape_ijk=(5, 4, 3)), channels_last=True)
    back = read_volume(write_volume(tmp_path / f"rgb{suffix}", volume))
    assert back.channels_last and back.n_channels == 3
    assert back.same_grid(volume, atol=1e-9) and np.array_equal(back.array, rgb)
