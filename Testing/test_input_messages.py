"""Small things seen on real data, each said in a sentence: a reversed slice range, NIfTI space codes
kept on output, DICOM without geometry tags, ITK's own warnings kept off stderr, gated weights offline."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from biomedseg.errors import InputError, WeightsMissingError
from biomedseg.geometry import Region, make_region, region_box
from biomedseg.io import read_volume, write_segmentation
from biomedseg.volume import Volume

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from conftest import require_file  # noqa: E402

#: A real MNI-space template whose sform and qform codes are both 4 (MNI).
JHU_2MM = Path("/usr/share/mricron/templates/JHU-WhiteMatter-labels-2mm.nii.gz")


# ---- 1. a reversed slice range ---------------------------------------------------------------------

def test_a_reversed_slice_range_says_it_is_reversed():
    with pytest.raises(InputError) as err:
        make_region("axial", [17, 15])
    assert err.value.message == "Slice range 17..15 is reversed: the first slice must not be greater than the last."
    assert "15 17" in err.value.hint
    volume = Volume(np.zeros((34, 8, 8), np.int16), np.eye(4))
    with pytest.raises(InputError, match="is reversed") as err:  # a Region made without make_region
        region_box(volume, Region("axial", (17, 15)))
    assert "outside" not in str(err.value)
    assert region_box(volume, make_region("axial", [15, 17])).shape == (3, 8, 8)
    assert region_box(volume, make_region("axial", [16, 16])).shape == (1, 8, 8)  # one slice is no reversal
    with pytest.raises(InputError, match="Slice range 30..40 is outside 0..33"):
        region_box(volume, make_region("axial", [30, 40]))


# ---- 2. NIfTI sform and qform codes survive a round trip -------------------------------------------------

def _round_trip(source: Path, out: Path):
    volume = read_volume(source)
    mask = np.zeros(volume.shape, bool)
    mask[tuple(slice(n // 3, 2 * n // 3) for n in volume.shape)] = True
    write_segmentation(out, volume, {"blob": mask})
    return volume, nib.load(str(out))


@pytest.mark.parametrize("name", ["in.nii.gz", "in.nii"])
def test_nifti_output_keeps_the_inputs_sform_and_qform_codes(tmp_path, name):
    affine = np.array([[-1.5, 0, 0, 90], [0, 1.5, 0, -126], [0, 0, 1.5, -72], [0, 0, 0, 1]])
    img = nib.Nifti1Image(np.arange(12 * 10 * 8, dtype=np.int16).reshape(12, 10, 8), affine)
    img.set_sform(affine, code=4)  # MNI
    img.set_qform(affine, code=2)  # aligned
    nib.save(img, str(tmp_path / name))
    _, out = _round_trip(tmp_path / name, tmp_path / "seg.nii.gz")
    assert (int(out.header["sform_code"]), int(out.header["qform_code"])) == (4, 2)
    assert np.allclose(out.get_sform(), affine) and np.allclose(out.get_qform(), affine)


def test_a_code_the_input_left_at_zero_takes_the_others(tmp_path):
    """Both transforms are written (readers that prefer the qform see the same grid), in the input's space."""
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    img = nib.Nifti1Image(np.zeros((6, 6, 4), np.int16), affine)
    img.set_sform(None, code=0)
    img.set_qform(affine, code=3)  # Talairach
    nib.save(img, str(tmp_path / "tal.nii.gz"))
    _, out = _round_trip(tmp_path / "tal.nii.gz", tmp_path / "seg.nii")
    assert (int(out.header["sform_code"]), int(out.header["qform_code"])) == (3, 3)
    assert np.allclose(out.get_sform(), affine) and np.allclose(out.get_qform(), affine)


def test_output_of_a_non_nifti_input_is_in_scanner_space(tmp_path):
    _, out = _round_trip(Path(get_testdata_file("CT_small.dcm")), tmp_path / "seg.nii.gz")
    assert (int(out.header["sform_code"]), int(out.header["qform_code"])) == (1, 1)


@pytest.mark.parametrize("template,codes", [("colin", (4, 0)), ("jhu", (4, 4))])
def test_real_mni_templates_stay_mni(tmp_path, colin_path, template, codes):
    source = colin_path if template == "colin" else require_file(JHU_2MM, "apt-get install mricron-data")
    header = nib.load(str(source)).header
    assert (int(header["sform_code"]), int(header["qform_code"])) == codes  # as shipped
    volume, out = _round_trip(source, tmp_path / "seg.nii.gz")
    assert (int(out.header["sform_code"]), int(out.header["qform_code"])) == (4, 4)  # MNI, both transforms
    assert np.allclose(out.get_sform(), volume.ijk_to_ras) and np.allclose(out.get_qform(), volume.ijk_to_ras)


# ---- 3. DICOM without spacing, position or orientation ------------------------------------------------------

def _ct_without(folder: Path, tags, n=1) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    uid, paths = generate_uid(), []
    for k in range(n):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        for tag in tags:
            delattr(ds, tag)
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = k + 1
        paths.append(folder / f"im{k}.dcm")
        ds.save_as(str(paths[-1]))
    return paths


GEOMETRY = ("PixelSpacing", "ImagePositionPatient", "ImageOrientationPatient", "SliceLocation")


def test_a_dicom_file_without_geometry_tags_warns_in_sentences(tmp_path):
    from biomedseg.io.dicom_files import read_dicom_geometry_warnings

    [path] = _ct_without(tmp_path, GEOMETRY)
    volume = read_volume(path)
    assert np.allclose(volume.spacing[:2], 1.0)  # what ITK assumed
    spacing, placed = volume.meta["warnings"]
    assert spacing == (f"'{path}' has no Pixel Spacing tag, so its pixels are taken to be 1 mm; distances, "
                       "volumes and models that expect real sizes will be wrong if they are not.")
    assert placed.startswith(f"'{path}' has no Image Position (Patient) or Image Orientation (Patient), so it is "
                             "placed at the origin and taken to be axial;")
    assert read_dicom_geometry_warnings(str(path)) == volume.meta["warnings"]  # the panel's files, the same words


def test_a_dicom_series_without_geometry_tags_warns_once_for_the_series(tmp_path):
    _ct_without(tmp_path / "ct", GEOMETRY, n=3)
    volume = read_volume(tmp_path / "ct")
    assert volume.shape[0] == 3 and len(volume.meta["warnings"]) == 2
    assert volume.meta["warnings"][0].startswith(f"The DICOM series in '{tmp_path / 'ct'}' ('im0.dcm' first) has "
                                                 "no Pixel Spacing tag")
    assert "its slices 1 mm apart" in volume.meta["warnings"][1]


def test_only_what_is_missing_is_warned_and_complete_files_not_at_all(tmp_path):
    [no_spacing] = _ct_without(tmp_path / "a", ["PixelSpacing"])
    assert len(read_volume(no_spacing).meta["warnings"]) == 1
    [no_orientation] = _ct_without(tmp_path / "b", ["ImageOrientationPatient"])
    [sentence] = read_volume(no_orientation).meta["warnings"]
    assert "has no Image Orientation (Patient), so it is taken to be axial;" in sentence
    for name in ("CT_small.dcm", "MR_small.dcm"):
        assert "warnings" not in read_volume(get_testdata_file(name)).meta
    # an enhanced file keeps its geometry in functional groups, which ITK reads: no false alarm
    from biomedseg.io.dicom_files import read_dicom_geometry_warnings
    assert read_dicom_geometry_warnings(get_testdata_file("eCT_Supplemental.dcm")) == []


# ---- 4. ITK's own warnings stay off stderr; our sentence says what the folder holds -------------------------

def test_a_folder_without_dicom_files_says_what_it_holds_and_itk_stays_quiet(tmp_path, capfd):
    import SimpleITK as sitk

    before = sitk.ProcessObject.GetGlobalWarningDisplay()
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "a.txt").write_text("hello")
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.eye(4)), str(folder / "b.nii.gz"))
    (folder / "sub").mkdir()
    with pytest.raises(InputError) as err:
        read_volume(folder)
    assert err.value.message == (f"'{folder}' holds no readable DICOM series: it has no DICOM files, only "
                                 "2 other file(s): a.txt, b.nii.gz and folder(s) sub/.")
    assert "Give one of those files" in err.value.hint
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="holds no readable DICOM series: the folder is empty"):
        read_volume(empty)
    nested = tmp_path / "study"
    (nested / "DICOM").mkdir(parents=True)
    with pytest.raises(InputError, match="only folder\\(s\\) DICOM/") as err:
        read_volume(nested)
    assert "subfolder" in err.value.hint
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == "", captured.err  # no 'WARNING: In .../itkGDCMSeriesFileNames.cxx'
    assert sitk.ProcessObject.GetGlobalWarningDisplay() == before  # put back as it was


def test_dicom_files_that_are_no_series_are_named(tmp_path, capfd):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "report.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 16)  # a preamble and nothing else
    with pytest.raises(InputError, match="its 1 DICOM file\\(s\\) \\(report.dcm\\) are not images"):
        read_volume(folder)
    assert "WARNING" not in capfd.readouterr().err


# ---- 5. gated weights, offline ------------------------------------------------------------------------

def test_gated_weights_offline_say_what_to_do_and_where(tmp_path, monkeypatch):
    from biomedseg.runtime.weights import resolve_weights

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.delenv("BIOMEDSEG_WEIGHTS_DIR", raising=False)
    spec = {"source": "hub", "repo": "example-org/licensed-test-model", "files": ["model.pt"], "revision": "main",
            "sha256": None, "license": "CC-BY-NC-SA-4.0", "gated": True, "size_bytes": 1800000000}
    with pytest.raises(WeightsMissingError) as err:
        resolve_weights(spec)
    text = str(err.value)
    assert err.value.message == ("Weights model.pt of example-org/licensed-test-model are not in the hub cache and "
                                 "offline mode is on; example-org/licensed-test-model is a gated repository.")
    for words in ("accept the licence on the model page", "`hf auth login`", "`huggingface-cli login`", "HF_TOKEN",
                  "Model page: https://huggingface.co/example-org/licensed-test-model"):
        assert words in err.value.hint, words
    assert text.endswith("https://huggingface.co/example-org/licensed-test-model")
    open_spec = {**spec, "gated": False}
    with pytest.raises(WeightsMissingError) as err:
        resolve_weights(open_spec)
    assert "gated" not in str(err.value) and "huggingface.co" not in str(err.value)
