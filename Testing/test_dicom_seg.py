"""DICOM SEG output checked by tools that did not write it: dciodvfy, highdicom's reader, dcmqi.

The reference is real CT (slicerio's CTChest4.nrrd, cropped) written as a CT Image
Storage series; masks are made in patient space from the volume's geometry, so a wrong
frame order, flip or row/column swap anywhere shows up as mismatching voxels.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")
sitk = pytest.importorskip("SimpleITK")
nrrd = pytest.importorskip("nrrd")
slicerio = pytest.importorskip("slicerio")

from biomedseg import __version__  # noqa: E402
from biomedseg.errors import InputError  # noqa: E402
from biomedseg.io import read_volume, write_segmentation  # noqa: E402
from biomedseg.segments import Segment  # noqa: E402
from biomedseg.volume import Volume, to_sitk  # noqa: E402
from geometry_cases import rotation  # noqa: E402

CT_CHEST = Path(slicerio.__file__).parent / "data" / "CTChest4.nrrd"
SEGMENT_NAMES = ["liver", "left kidney", "blob of interest", "tumor"]


# ---- a real CT as a DICOM series ------------------------------------------------------------

def chest_ct(variant: str) -> tuple[np.ndarray, np.ndarray]:
    """Cropped CTChest4 HU as (k, j, i) int16 and its ijk->LPS matrix for a test geometry.

    'axial': the usual DICOM axial orientation (row direction 1,0,0; column direction 0,1,0).
    'oblique-flipped': the file's own flipped orientation (-1,0,0 / 0,-1,0) turned 20 and 15
    degrees about two axes around the volume centre.
    """
    data, header = nrrd.read(str(CT_CHEST), index_order="C")  # (k, j, i)
    assert header["space"] == "left-posterior-superior"
    m = np.eye(4)
    m[:3, :3] = np.asarray(header["space directions"], float).T
    m[:3, 3] = header["space origin"]
    k0, j0, i0 = 10, 40, 40
    hu = data[k0:k0 + 10, j0:j0 + 48, i0:i0 + 40].astype(np.int16)
    m[:3, 3] = (m @ [i0, j0, k0, 1])[:3]
    if variant == "axial":  # flip i and j so the rows run to the left and columns to posterior
        ni, nj = hu.shape[2], hu.shape[1]
        m[:3, 3] = (m @ [ni - 1, nj - 1, 0, 1])[:3]
        m[:3, 0] *= -1
        m[:3, 1] *= -1
        hu = hu[:, ::-1, ::-1].copy()
    elif variant == "oblique-flipped":
        centre = (m @ [*(np.array(hu.shape[::-1]) - 1) / 2, 1])[:3]
        rot = rotation((0, 0, 1), 20) @ rotation((1, 0, 0), 15)
        m[:3, :3] = rot @ m[:3, :3]
        m[:3, 3] = centre + rot @ (m[:3, 3] - centre)
    else:
        raise ValueError(variant)
    return hu, m


def write_ct_series(folder: Path, hu: np.ndarray, ijk_to_lps: np.ndarray, reverse_names=False) -> list[Path]:
    """One CT Image Storage file per slice with the Patient..CT Image modules filled in."""
    folder.mkdir(parents=True, exist_ok=True)
    spacing = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
    direction = ijk_to_lps[:3, :3] / spacing
    study, series, frame_of_reference = (pydicom.uid.generate_uid() for _ in range(3))
    paths = []
    for k, plane in enumerate(hu):
        ds = pydicom.Dataset()
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        ds.SOPClassUID = pydicom.uid.CTImageStorage
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Chest^CT", "CT4", "19700101", "O"
        ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime = study, "20240102", "101500"
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "A1", ""
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.Modality = series, 3, "CT"
        ds.SeriesDescription, ds.PatientPosition = "Chest CT test series", "HFS"
        ds.BodyPartExamined = "CHEST"
        ds.Manufacturer = "slicerio sample data"
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_of_reference, ""
        ds.InstanceNumber, ds.ContentDate, ds.ContentTime = k + 1, "20240102", "101500"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.AcquisitionNumber, ds.KVP = 1, "120"
        ds.ImagePositionPatient = [round(float(v), 6) for v in (ijk_to_lps @ [0, 0, k, 1])[:3]]
        ds.ImageOrientationPatient = [round(float(v), 8) + 0.0 for v in np.r_[direction[:, 0], direction[:, 1]]]
        ds.PixelSpacing = [round(float(spacing[1]), 8), round(float(spacing[0]), 8)]
        ds.SliceThickness = round(float(spacing[2]), 6)
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = plane.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.WindowCenter, ds.WindowWidth = 40, 400
        ds.PixelData = np.ascontiguousarray(plane, dtype="<i2").tobytes()
        name = f"ct{(len(hu) - 1 - k) if reverse_names else k:03d}.dcm"
        ds.save_as(folder / name, enforce_file_format=True)
        paths.append(folder / name)
    return paths


def patient_space_masks(volume: Volume) -> dict[str, np.ndarray]:
    """Masks defined in RAS millimetres: half-spheres cut by the sagittal plane through the
    centre, an ellipsoid overlapping the first, and an empty one."""
    ras = volume.ras_of_voxels()
    centre = (volume.ijk_to_ras @ [*(np.array(volume.shape[::-1]) - 1) / 2, 1])[:3]
    d = ras - centre
    x = ras[..., 0] - centre[0]
    liver = (np.linalg.norm(d - [10, 5, 0], axis=-1) < 30) & (x > 0)  # patient right
    kidney = (np.linalg.norm(d - [-15, -10, 5], axis=-1) < 22) & (x < 0)  # patient left
    blob = ((d[..., 0] / 35) ** 2 + (d[..., 1] / 12) ** 2 + (d[..., 2] / 14) ** 2) < 1
    masks = {"liver": liver, "left kidney": kidney, "blob of interest": blob,
             "tumor": np.zeros(volume.shape, bool)}
    assert all(masks[n].any() for n in SEGMENT_NAMES[:3]) and (liver & blob).any()
    return masks


@pytest.fixture(scope="module", params=["axial", "oblique-flipped"])
def written(request, tmp_path_factory):
    """A CT series, the volume read back from it, our masks and the DICOM SEG written from them."""
    root = tmp_path_factory.mktemp(request.param)
    hu, ijk_to_lps = chest_ct(request.param)
    files = write_ct_series(root / "ct", hu, ijk_to_lps, reverse_names=request.param != "axial")
    if shutil.which("dciodvfy"):  # the reference itself is a valid CT Image
        run = subprocess.run(["dciodvfy", str(files[0])], capture_output=True, text=True, timeout=60)
        assert not [ln for ln in run.stderr.splitlines() if ln.startswith("Error")], run.stderr
    volume = read_volume(root / "ct")
    assert volume.shape == hu.shape and len(volume.meta["dicom_files"]) == hu.shape[0]
    masks = patient_space_masks(volume)
    out = root / "seg.dcm"
    written = write_segmentation(out, volume, masks, series_description="Test SEG")
    assert written == [out] and out.exists() and not list(root.glob(".*partial"))
    return volume, masks, out


def _dciodvfy(path: Path) -> None:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed")
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    report = run.stdout + run.stderr
    errors = [ln for ln in report.splitlines() if ln.startswith("Error")]
    assert run.returncode == 0 and not errors, report


def _on_reference_grid(hd_volume, reference: Volume) -> np.ndarray:
    """highdicom volume (slice, row, column[, segment]) -> our (k, j, i[, segment]) grid via LPS."""
    spatial = hd_volume.spatial_shape
    idx = np.stack(np.meshgrid(*(np.arange(n) for n in spatial), indexing="ij"), axis=-1).reshape(-1, 3)
    lps = hd_volume.map_indices_to_reference(idx)
    ijk = (np.linalg.inv(reference.ijk_to_lps) @ np.c_[lps, np.ones(len(lps))].T).T[:, :3]
    assert np.allclose(ijk, np.round(ijk), atol=1e-3), "SEG voxels are not on the reference grid"
    ijk = np.round(ijk).astype(int)
    values = np.asarray(hd_volume.array).reshape(len(idx), -1)
    inside = np.all((ijk >= 0) & (ijk < reference.shape[::-1]), axis=1)
    assert not values[~inside].any(), "SEG has foreground outside the reference"
    out = np.zeros(reference.shape + values.shape[1:], dtype=values.dtype)
    out[ijk[inside, 2], ijk[inside, 1], ijk[inside, 0]] = values[inside]
    return out


# ---- checks -----------------------------------------------------------------------------------

def test_dciodvfy_accepts_the_seg(written):
    _dciodvfy(written[2])


def test_highdicom_reads_back_the_same_voxels_and_descriptions(written):
    volume, masks, out = written
    seg = hd.seg.segread(out)
    source = pydicom.dcmread(volume.meta["dicom_files"][0])
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == source.StudyInstanceUID and seg.PatientID == source.PatientID
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert seg.SeriesInstanceUID != source.SeriesInstanceUID and seg.SeriesDescription == "Test SEG"
    assert seg.Manufacturer == "BiomedSeg"
    referenced = {item.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence
                  for item in s.ReferencedInstanceSequence}
    assert referenced == {pydicom.dcmread(f).SOPInstanceUID for f in volume.meta["dicom_files"]}

    items = list(seg.SegmentSequence)
    assert [it.SegmentNumber for it in items] == [1, 2, 3, 4]
    assert [it.SegmentLabel for it in items] == SEGMENT_NAMES
    liver, kidney, blob, tumor = items
    assert liver.SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
    assert liver.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "123037004"
    kidney_type = kidney.SegmentedPropertyTypeCodeSequence[0]
    assert (kidney_type.CodingSchemeDesignator, kidney_type.CodeValue) == ("SCT", "64033007")
    assert kidney_type.SegmentedPropertyTypeModifierCodeSequence[0].CodeMeaning == "Left"
    assert blob.SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Tissue"  # unknown name
    assert tumor.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    for it in items:
        assert it.SegmentAlgorithmType == "AUTOMATIC"
        algo = it.SegmentationAlgorithmIdentificationSequence[0]
        assert (algo.AlgorithmName, algo.AlgorithmVersion) == ("BiomedSeg", __version__)
        assert algo.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"  # Artificial Intelligence
    kidney_rgb = hd.color.CIELabColor.from_dicom_value(tuple(kidney.RecommendedDisplayCIELabValue)).to_rgb()
    assert np.allclose(kidney_rgb, (185, 102, 83), atol=1)

    # Voxels: every segment, mapped through the SEG's own geometry onto our grid.
    hd_volume = seg.get_volume(segment_numbers=[1, 2, 3, 4])
    theirs = _on_reference_grid(hd_volume, volume)
    assert theirs.shape == volume.shape + (4,)
    for n, name in enumerate(SEGMENT_NAMES):
        mismatches = int(np.count_nonzero(theirs[..., n].astype(bool) != masks[name]))
        assert mismatches == 0, f"{name}: {mismatches} voxels differ"


def test_dcmqi_reads_back_the_same_voxels_and_labels(written, tmp_path):
    volume, masks, out = written
    tool = shutil.which("segimage2itkimage")
    if tool is None:
        pytest.skip("dcmqi's segimage2itkimage is not installed")
    run = subprocess.run([tool, "--inputDICOM", str(out), "--outputDirectory", str(tmp_path),
                          "--outputType", "nrrd", "--prefix", "seg"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    meta = json.loads((tmp_path / "seg-meta.json").read_text())
    attributes = [a for group in meta["segmentAttributes"] for a in group]
    by_label = {a["SegmentLabel"]: a for a in attributes}
    assert set(by_label) >= set(SEGMENT_NAMES[:3])
    assert by_label["left kidney"]["SegmentedPropertyTypeModifierCodeSequence"]["CodeValue"] == "7771000"
    reference = to_sitk(volume)
    for name in SEGMENT_NAMES:
        number = SEGMENT_NAMES.index(name) + 1
        image_path = tmp_path / f"seg-{number}.nrrd"
        if not masks[name].any() and not image_path.exists():
            continue  # dcmqi writes no image for a segment without frames
        image = sitk.ReadImage(str(image_path))
        on_grid = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        theirs = sitk.GetArrayFromImage(on_grid).astype(bool)
        assert int(sitk.GetArrayFromImage(image).astype(bool).sum()) == int(theirs.sum())  # nothing off-grid
        mismatches = int(np.count_nonzero(theirs != masks[name]))
        assert mismatches == 0, f"{name}: {mismatches} voxels differ from dcmqi's image"


def _ct_small() -> Volume:
    from pydicom.data import get_testdata_file

    source = Path(get_testdata_file("CT_small.dcm"))
    volume = read_volume(source)
    assert volume.shape == (1, 128, 128) and volume.meta["dicom_files"] == [str(source)]
    return volume


def test_single_file_reference_and_non_ascii_labels(tmp_path):
    """A one-slice DICOM (pydicom's real CT_small.dcm) read as a file still gets a valid SEG;
    labels outside the source's character set and over 64 bytes survive as UTF-8 LO values."""
    volume = _ct_small()
    bright = volume.array > np.percentile(volume.array, 70)
    long_name = "Läsion 肝臓 " + "x" * 80
    out = tmp_path / "one.dcm"
    write_segmentation(out, volume, [Segment("lesion", bright), Segment(long_name, ~bright)])
    _dciodvfy(out)
    seg = hd.seg.segread(out)
    labels = [it.SegmentLabel for it in seg.SegmentSequence]
    assert labels[0] == "lesion" and long_name.startswith(labels[1]) and len(labels[1].encode()) <= 64
    assert labels[1].startswith("Läsion 肝臓") and seg.SpecificCharacterSet == "ISO_IR 192"
    theirs = _on_reference_grid(seg.get_volume(segment_numbers=[1, 2]), volume)
    assert np.count_nonzero(theirs[..., 0].astype(bool) != bright) == 0
    assert np.count_nonzero(theirs[..., 1].astype(bool) != ~bright) == 0


def test_all_segments_empty_is_still_valid(tmp_path):
    volume = _ct_small()
    out = tmp_path / "empty.dcm"
    write_segmentation(out, volume, {"liver": np.zeros(volume.shape, bool)}, content_label="EMPTY")
    _dciodvfy(out)
    seg = hd.seg.segread(out)
    assert seg.ContentLabel == "EMPTY" and seg.SegmentSequence[0].SegmentLabel == "liver"
    assert not np.asarray(seg.get_volume(segment_numbers=[1]).array).any()


def test_non_dicom_reference_is_refused(tmp_path):
    volume = read_volume(CT_CHEST)
    with pytest.raises(InputError) as err:
        write_segmentation(tmp_path / "x.dcm", volume, {"liver": np.zeros(volume.shape, bool)})
    assert "DICOM SEG needs a DICOM reference" in str(err.value) and ".seg.nrrd" in str(err.value)
    assert not (tmp_path / "x.dcm").exists()


def test_reference_changed_after_reading_is_refused(written, tmp_path):
    volume, masks, _ = written
    moved = volume.ijk_to_ras.copy()
    moved[:3, 3] += 3 * moved[:3, 2]  # same shape, but three slices further on
    shifted = Volume(volume.array, moved, meta=dict(volume.meta))
    with pytest.raises(InputError, match="first slice is not where"):
        write_segmentation(tmp_path / "x.dcm", shifted, masks)
    cropped = Volume(volume.array[1:], volume.ijk_to_ras, meta=dict(volume.meta))
    with pytest.raises(InputError, match="slices but lists"):
        write_segmentation(tmp_path / "y.dcm", cropped, {n: m[1:] for n, m in masks.items()})
    with pytest.raises(InputError, match="Unknown DICOM SEG option"):
        write_segmentation(tmp_path / "z.dcm", volume, masks, series_descripton="typo")
    with pytest.raises(InputError, match="cannot be built"):  # CS: upper case only
        write_segmentation(tmp_path / "w.dcm", volume, masks, content_label="lower case")
    assert not list(tmp_path.iterdir())
