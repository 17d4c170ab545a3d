"""Every input the engine cannot use is refused with an InputError naming the file and the
problem; the inputs it can use (DICOM files and series, 2D images) read with the right
geometry and metadata."""
from __future__ import annotations

import gzip
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "BiomedSeg"))

import nibabel as nib  # noqa: E402
import nrrd  # noqa: E402
import SimpleITK as sitk  # noqa: E402

from biomedseg.errors import InputError  # noqa: E402
from biomedseg.io import list_dicom_series, read_volume  # noqa: E402
from biomedseg.volume import LPS_TO_RAS  # noqa: E402


def refused(path, *phrases, **kwargs) -> str:
    """Read ``path``; require an InputError whose text names the file and every phrase."""
    with pytest.raises(InputError) as info:
        read_volume(path, **kwargs)
    text = str(info.value)
    assert str(path) in text, f"the error does not name the file: {text}"
    for phrase in phrases:
        assert phrase.lower() in text.lower(), f"{phrase!r} not in: {text}"
    assert info.value.kind == "bad_input"
    return text


# ---- writers of bad files -------------------------------------------------------------------

def write_mha(path, *, dims="4 5 6", ndims=3, spacing="1 1 1", matrix="1 0 0 0 1 0 0 0 1",
              element_type="MET_UCHAR", channels=1, offset="0 0 0", payload=None):
    """A MetaImage written by hand, so the header says exactly what the test needs."""
    n_voxels = int(np.prod([int(d) for d in dims.split()]))
    bytes_per = {"MET_UCHAR": 1, "MET_FLOAT": 4}[element_type]
    header = (f"ObjectType = Image\nNDims = {ndims}\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
              f"TransformMatrix = {matrix}\nOffset = {offset}\nElementSpacing = {spacing}\n"
              f"DimSize = {dims}\nElementNumberOfChannels = {channels}\nElementType = {element_type}\n"
              "ElementDataFile = LOCAL\n")
    data = payload if payload is not None else bytes(n_voxels * bytes_per * channels)
    Path(path).write_bytes(header.encode() + data)
    return Path(path)


def write_nifti(path, data, affine=np.eye(4)):
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return Path(path)


def patch_nifti_header(path, edits):
    """Overwrite raw header bytes (nibabel 'fixes' zero pixdims when it writes)."""
    path = Path(path)
    raw = path.read_bytes()
    gz = path.name.endswith(".gz")
    buf = bytearray(gzip.decompress(raw) if gz else raw)
    for offset, fmt, values in edits:
        struct.pack_into(fmt, buf, offset, *values)
    path.write_bytes(gzip.compress(bytes(buf)) if gz else bytes(buf))


# NIfTI-1 header offsets
PIXDIM, SROW_X, SROW_Y = 76, 280, 296


def write_nrrd(path, data, header):
    nrrd.write(str(path), data, header, index_order="F")
    return Path(path)


def lps_header(n_axes=3, vector_axis=None, directions=None, kinds=None):
    rows = list(directions if directions is not None else np.eye(3))
    if vector_axis is not None:
        rows.insert(vector_axis, [np.nan] * 3)
    return {"space": "left-posterior-superior", "space directions": np.array(rows, dtype=np.float64),
            "space origin": np.zeros(3), "kinds": kinds or ["domain"] * n_axes}


# ---- missing, unknown, corrupt ----------------------------------------------------------------

def test_missing_file(tmp_path):
    refused(tmp_path / "nope.nii.gz", "does not exist")


def test_unknown_extension_lists_what_is_readable(tmp_path):
    p = tmp_path / "notes.xyz"
    p.write_text("not an image")
    text = refused(p, "'.xyz' is not a format")
    for suffix in (".nii.gz", ".nrrd", ".mha", ".dcm", ".png"):
        assert suffix in text


@pytest.mark.parametrize("name,phrase", [
    ("garbage.nii", "not a readable NIfTI file"),
    ("garbage.nii.gz", "not a readable NIfTI file"),
    ("garbage.nrrd", "not a readable NRRD file"),
    ("garbage.mha", "cannot be read"),
    ("garbage.png", "cannot be read"),
    ("garbage.dcm", "cannot be read"),
])
def test_garbage_bytes(tmp_path, name, phrase):
    p = tmp_path / name
    p.write_bytes(np.random.default_rng(7).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    refused(p, phrase)


def test_empty_nifti(tmp_path):
    p = tmp_path / "empty.nii"
    p.write_bytes(b"")
    refused(p, "not a readable NIfTI file")


@pytest.mark.parametrize("name", ["cut.nii", "cut.nii.gz"])
def test_truncated_nifti_voxel_data(tmp_path, name):
    full = write_nifti(tmp_path / "full.nii", np.ones((10, 10, 10), np.float32))
    raw = full.read_bytes()[:1000]  # header intact, voxels cut short
    p = tmp_path / name
    p.write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
    refused(p, "voxel data cannot be read", "truncated or damaged")


def test_truncated_nrrd_and_mha(tmp_path):
    good = write_nrrd(tmp_path / "good.nrrd", np.ones((10, 10, 10), np.int16), {**lps_header(), "encoding": "raw"})
    cut = tmp_path / "cut.nrrd"
    cut.write_bytes(good.read_bytes()[:-500])
    refused(cut, "not a readable NRRD file")
    mha = write_mha(tmp_path / "cut.mha", payload=bytes(10))
    refused(mha, "cannot be read")


# ---- 4D, complex, non-finite -------------------------------------------------------------------

def test_4d_nifti(tmp_path):
    refused(write_nifti(tmp_path / "t.nii.gz", np.zeros((4, 5, 6, 3), np.int16)), "4D images", "(4, 5, 6, 3)")


def test_4d_nifti_with_one_time_point_reads_as_3d(tmp_path):
    v = read_volume(write_nifti(tmp_path / "t1.nii.gz", np.arange(120, dtype=np.int16).reshape(4, 5, 6, 1)))
    assert v.shape == (6, 5, 4) and not v.channels_last


@pytest.mark.parametrize("frames,kind", [(5, "time"), (3, "time"), (2, "list"), (3, "domain")])
def test_4d_nrrd(tmp_path, frames, kind):
    """A fourth axis of frames is 4D however few frames it has (3 frames are not RGB)."""
    header = lps_header(4, vector_axis=3, kinds=["domain"] * 3 + [kind])
    p = write_nrrd(tmp_path / f"t_{kind}{frames}.nrrd", np.zeros((4, 5, 6, frames), np.uint8), header)
    refused(p, "4D images", kind)


def test_nrrd_vector_axis_is_colour(tmp_path):
    data = np.random.default_rng(1).integers(0, 255, (3, 4, 5, 6), dtype=np.uint8)
    p = write_nrrd(tmp_path / "rgb.nrrd", data, lps_header(4, vector_axis=0, kinds=["vector"] + ["domain"] * 3))
    v = read_volume(p)
    assert v.channels_last and v.n_channels == 3
    assert np.array_equal(v.array, np.transpose(data, (3, 2, 1, 0)))


def test_4d_mha(tmp_path):
    image = sitk.Image([4, 5, 6, 3], sitk.sitkUInt8)
    sitk.WriteImage(image, str(tmp_path / "t.mha"))
    refused(tmp_path / "t.mha", "4D images", "[4, 5, 6, 3]")


def test_complex_nifti(tmp_path):
    refused(write_nifti(tmp_path / "c.nii.gz", np.ones((4, 5, 6), np.complex64)), "complex-valued")


def test_complex_mha(tmp_path):
    image = sitk.Image([4, 5, 6], sitk.sitkComplexFloat32)
    sitk.WriteImage(image, str(tmp_path / "c.mha"))
    # MetaImage has no complex type: what comes back is 2 float components per voxel
    back = sitk.ReadImage(str(tmp_path / "c.mha"))
    assert back.GetNumberOfComponentsPerPixel() == 2
    refused(tmp_path / "c.mha", "complex-valued")


def test_complex_nrrd(tmp_path):
    header = lps_header(4, vector_axis=0, kinds=["complex"] + ["domain"] * 3)
    p = write_nrrd(tmp_path / "c.nrrd", np.zeros((2, 4, 5, 6), np.float32), header)
    refused(p, "complex-valued")


@pytest.mark.parametrize("fmt", ["nii.gz", "nrrd", "mha"])
def test_nan_and_inf_voxels(tmp_path, fmt):
    data = np.zeros((4, 5, 6), np.float32)  # (i, j, k)
    data[1, 2, 3] = np.nan
    data[0, 0, 0] = np.inf
    data[3, 4, 5] = -np.inf
    p = tmp_path / f"bad.{fmt}"
    if fmt == "nii.gz":
        write_nifti(p, data)
    elif fmt == "nrrd":
        write_nrrd(p, data, lps_header())
    else:
        sitk.WriteImage(sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0))), str(p))
    refused(p, "3 voxels are NaN or infinite")


# ---- spacing and direction -------------------------------------------------------------------

@pytest.mark.parametrize("name", ["z.nii", "z.nii.gz"])
def test_nifti_zero_spacing_with_zero_affine_column(tmp_path, name):
    p = write_nifti(tmp_path / name, np.zeros((4, 5, 6), np.int16))
    patch_nifti_header(p, [(PIXDIM + 8, "<f", (0.0,)), (SROW_Y, "<4f", (0.0, 0.0, 0.0, 0.0))])
    header = nib.load(str(p)).header
    assert int(header["sform_code"]) > 0 and not np.any(header.get_sform()[1, :3])
    refused(p, "spacing must be positive", "[1.0, 0.0, 1.0]")


def test_nifti_zero_pixdim_without_sform_or_qform(tmp_path):
    """nibabel silently replaces a zero pixdim by 1 on load; the file still has no spacing."""
    img = nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), None)
    img.header.set_zooms((1.0, 1.0, 1.0))
    p = tmp_path / "noform.nii"
    nib.save(img, str(p))
    patch_nifti_header(p, [(PIXDIM + 4, "<f", (0.0,))])
    assert int(nib.load(str(p)).header["sform_code"]) == 0
    refused(p, "spacing must be positive", "[0.0, 1.0, 1.0]")


def test_mha_zero_spacing(tmp_path):
    refused(write_mha(tmp_path / "z.mha", spacing="1 0 1"), "spacing must be positive", "[1.0, 0.0, 1.0]")


def test_mha_negative_spacing(tmp_path):
    p = write_mha(tmp_path / "neg.mha", spacing="-1 1 1")
    # What SimpleITK does: the header reads as -1, and the image it builds silently turns the
    # minus sign into a flipped direction with spacing 1. A sign hidden in the spacing is
    # ambiguous (typo or flip?), so BiomedSeg refuses it, naming the value.
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    reader.ReadImageInformation()
    assert reader.GetSpacing()[0] == -1.0
    image = sitk.ReadImage(str(p))
    assert image.GetSpacing()[0] == 1.0 and image.GetDirection()[0] == -1.0
    refused(p, "spacing must be positive", "-1.0")


def test_nrrd_negative_spacings_without_space_directions(tmp_path):
    p = write_nrrd(tmp_path / "neg.nrrd", np.zeros((4, 5, 6), np.uint8), {"spacings": [1.0, -1.0, 1.0]})
    assert "space directions" not in nrrd.read_header(str(p))
    refused(p, "spacing must be positive", "-1.0")


def test_nrrd_positive_spacings_without_space_directions_read(tmp_path):
    p = write_nrrd(tmp_path / "sp.nrrd", np.zeros((4, 5, 6), np.uint8), {"spacings": [0.5, 2.0, 3.0]})
    v = read_volume(p)
    np.testing.assert_allclose(v.spacing, [0.5, 2.0, 3.0])


def test_nrrd_parallel_space_directions(tmp_path):
    directions = np.array([[1.0, 0, 0], [2.0, 0, 0], [0, 0, 1.0]])
    p = write_nrrd(tmp_path / "par.nrrd", np.zeros((4, 5, 6), np.uint8), lps_header(directions=directions))
    refused(p, "direction matrix is not invertible")


@pytest.mark.parametrize("matrix", ["1 0 0 1 0 0 0 0 1", "0 0 0 0 0 0 0 0 0"])
def test_mha_singular_transform_matrix(tmp_path, matrix):
    p = write_mha(tmp_path / "sing.mha", matrix=matrix)
    text = refused(p, "direction matrix", "not invertible")
    assert "\n" not in text  # one sentence, not ITK's matrix dump


def test_nrrd_without_patient_space(tmp_path):
    p = write_nrrd(tmp_path / "nospace.nrrd", np.zeros((4, 5, 6), np.uint8), {})
    refused(p, "no 'space directions'")


# ---- DICOM ----------------------------------------------------------------------------------

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402


def test_empty_folder(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    refused(folder, "holds no readable DICOM series")


def test_folder_without_dicom(tmp_path):
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "a.txt").write_text("hello")
    write_nifti(folder / "b.nii.gz", np.zeros((2, 2, 2), np.int16))
    refused(folder, "holds no readable DICOM series")


def make_series(folder, description, z_positions):
    """A tiny CT series: copies of CT_small.dcm with one new series UID and slice positions."""
    folder.mkdir(parents=True, exist_ok=True)
    uid = generate_uid()
    for n, z in enumerate(z_positions):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesDescription = description
        ds.InstanceNumber = n + 1
        ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1], z]
        ds.SliceLocation = z
        ds.save_as(str(folder / f"{description}_{n}.dcm"))
    return uid


@pytest.fixture
def two_series(tmp_path):
    folder = tmp_path / "study"
    first = make_series(folder, "first", [-75.7, -70.7, -65.7])
    second = make_series(folder, "second", [10.0, 12.5])
    return folder, first, second


def test_two_series_without_uid_lists_both(two_series):
    folder, first, second = two_series
    text = refused(folder, "2 DICOM series", "choose one by UID")
    assert first in text and second in text
    assert "first" in text and "second" in text
    assert {s["uid"] for s in list_dicom_series(folder)} == {first, second}


@pytest.mark.parametrize("which", ["first", "second"])
def test_two_series_with_uid_reads_that_one(two_series, which):
    folder, first, second = two_series
    uid = first if which == "first" else second
    v = read_volume(folder, series_uid=uid)
    positions = sorted(float(pydicom.dcmread(f).ImagePositionPatient[2]) for f in v.meta["dicom_files"])
    assert v.meta["series_uid"] == uid and v.meta["modality"] == "CT"
    assert v.shape[0] == len(positions) == (3 if which == "first" else 2)
    assert all(pydicom.dcmread(f).SeriesInstanceUID == uid for f in v.meta["dicom_files"])
    # slices stacked along S at the spacing of their positions, starting at the lowest one
    np.testing.assert_allclose(v.spacing[2], positions[1] - positions[0], atol=1e-4)
    np.testing.assert_allclose(v.origin[2], positions[0], atol=1e-4)
    assert v.axis_closest_to("S") == 0


def test_two_series_with_unknown_uid(two_series):
    folder, first, second = two_series
    text = refused(folder, "no DICOM series with UID 1.2.3.4", series_uid="1.2.3.4")
    assert first in text and second in text


@pytest.mark.parametrize("name,modality", [("CT_small.dcm", "CT"), ("MR_small.dcm", "MR")])
def test_single_dicom_file_reads_with_its_geometry(name, modality):
    path = get_testdata_file(name)
    ds = pydicom.dcmread(path)
    v = read_volume(path)
    assert v.meta["modality"] == modality
    assert v.shape == (1, int(ds.Rows), int(ds.Columns))
    # geometry from the DICOM tags, converted to RAS here independently
    row_dir = np.array(ds.ImageOrientationPatient[:3], dtype=np.float64)  # direction of i (along a row)
    col_dir = np.array(ds.ImageOrientationPatient[3:], dtype=np.float64)  # direction of j
    flip = LPS_TO_RAS[:3, :3]
    np.testing.assert_allclose(v.origin, flip @ np.array(ds.ImagePositionPatient, dtype=np.float64), atol=1e-4)
    np.testing.assert_allclose(v.spacing[:2], [float(ds.PixelSpacing[1]), float(ds.PixelSpacing[0])], atol=1e-5)
    np.testing.assert_allclose(v.direction[:, 0], flip @ row_dir, atol=1e-5)
    np.testing.assert_allclose(v.direction[:, 1], flip @ col_dir, atol=1e-5)
    expected = ds.pixel_array.astype(np.float64) * float(getattr(ds, "RescaleSlope", 1)) + \
        float(getattr(ds, "RescaleIntercept", 0))
    np.testing.assert_allclose(v.array[0], expected)


def test_dicom_file_without_extension(tmp_path):
    p = tmp_path / "IM0001"
    shutil.copy(get_testdata_file("CT_small.dcm"), p)
    v = read_volume(p)
    assert v.meta["modality"] == "CT" and v.shape[0] == 1


# ---- 2D images ------------------------------------------------------------------------------

@pytest.mark.parametrize("name,mode", [("g.png", "L"), ("c.png", "RGB"), ("c.jpg", "RGB"), ("g.jpg", "L"),
                                       ("g.tif", "L"), ("c.tiff", "RGB"), ("g16.png", "I;16")])
def test_2d_images_are_one_slice_volumes(tmp_path, name, mode):
    from PIL import Image

    rng = np.random.default_rng(5)
    if mode == "RGB":
        pixels = rng.integers(0, 256, (9, 13, 3), dtype=np.uint8)
    elif mode == "I;16":
        pixels = rng.integers(0, 65536, (9, 13), dtype=np.uint16)
    else:
        pixels = rng.integers(0, 256, (9, 13), dtype=np.uint8)
    p = tmp_path / name
    # JPEG: no chroma subsampling, so decoders (libjpeg in ITK, PIL) differ only by rounding
    Image.fromarray(pixels).save(p, **({"quality": 95, "subsampling": 0} if name.endswith(".jpg") else {}))
    decoded = np.asarray(Image.open(p))  # lossy JPEG: compare with what PIL decodes
    v = read_volume(p)
    assert v.shape == (1, 9, 13)
    assert v.meta.get("image_kind") == "2d"
    if mode == "RGB":
        assert v.channels_last and v.n_channels == 3 and v.array.shape == (1, 9, 13, 3)
    else:
        assert not v.channels_last and v.array.shape == (1, 9, 13)
    if name.endswith(".jpg"):
        assert np.abs(v.array[0].astype(int) - decoded.astype(int)).max() <= 2
    else:
        assert np.array_equal(v.array[0], decoded)
    np.testing.assert_allclose(v.spacing, 1.0)
    # shown axially, the image is as stored
    assert np.array_equal(v.slice_orientation("axial").to_display(v.array)[0], v.array[0])


@pytest.mark.parametrize("samples", [2, 3, 7])
def test_multi_sample_grey_tiff_is_refused_not_garbled(tmp_path, samples):
    """ITK decodes several samples per pixel only for RGB TIFFs; others would come back as
    one channel of interleaved bytes, so they are refused."""
    tifffile = pytest.importorskip("tifffile")
    p = tmp_path / f"samples{samples}.tif"
    data = np.random.default_rng(2).integers(0, 256, (9, 13, samples), dtype=np.uint8)
    tifffile.imwrite(p, data, planarconfig="contig", photometric="minisblack")
    garbled = sitk.GetArrayFromImage(sitk.ReadImage(str(p)))
    assert garbled.shape == (9, 13) and not np.array_equal(garbled, data[..., 0])  # what ITK does
    refused(p, f"{samples} samples per pixel")


def test_rgba_tiff_reads_as_four_channels(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    p = tmp_path / "rgba.tif"
    data = np.random.default_rng(4).integers(0, 256, (9, 13, 4), dtype=np.uint8)
    tifffile.imwrite(p, data, planarconfig="contig", photometric="rgb", extrasamples=["unassalpha"])
    v = read_volume(p)
    assert v.channels_last and v.n_channels == 4 and np.array_equal(v.array[0], data)


def test_multi_page_tiff_pages_become_slices(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    p = tmp_path / "pages.tif"
    data = np.random.default_rng(6).integers(0, 256, (5, 9, 13), dtype=np.uint8)
    tifffile.imwrite(p, data)
    v = read_volume(p)
    assert v.shape == (5, 9, 13) and not v.channels_last
    assert np.array_equal(v.array, data)  # page n is slice k = n


def test_nifti_without_orientation_follows_itk_like_slicer(tmp_path):
    """No sform and no qform: use ITK's (Slicer's) guess so results line up in Slicer."""
    import nibabel as nib
    import SimpleITK as sitk

    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    img = nib.Nifti1Image(data, np.diag([2.0, 3.0, 4.0, 1.0]))
    img.set_sform(None, code=0)
    img.set_qform(None, code=0)
    path = tmp_path / "bare.nii"
    nib.save(img, str(path))
    volume = read_volume(path)
    ref = sitk.ReadImage(str(path))
    assert np.array_equal(volume.array, sitk.GetArrayFromImage(ref))
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ volume.ijk_to_ras
    assert np.allclose(lps[:3, 3], ref.GetOrigin())
    assert np.allclose(lps[:3, :3], np.array(ref.GetDirection()).reshape(3, 3) * ref.GetSpacing())
