"""Outputs checked before any model runs (``io.preflight.check_outputs``): each refusal in its sentence,
on images read by the real readers, and one run of each format that the check lets through and that
then writes."""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("highdicom")

from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from biomedseg.errors import DependencyMissingError, InputError  # noqa: E402
from biomedseg.io import read_volume, write_segmentation  # noqa: E402
from biomedseg.io.preflight import check_outputs  # noqa: E402
from biomedseg.volume import Volume  # noqa: E402


def nifti_input(folder: Path, name="in.nii.gz") -> Volume:
    folder.mkdir(parents=True, exist_ok=True)
    data = np.zeros((12, 10, 8), np.int16)
    data[3:8, 2:7, 2:6] = 100
    nib.save(nib.Nifti1Image(data, np.diag([1.2, 1.1, 2.5, 1.0])), str(folder / name))
    return read_volume(folder / name)


def ct_series(folder: Path, n=3, drop=()) -> list[Path]:
    """A real CT series: copies of pydicom's CT_small.dcm with one series UID, 5 mm apart; ``drop``: tags removed."""
    folder.mkdir(parents=True, exist_ok=True)
    uid, paths = generate_uid(), []
    for k in range(n):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1], -50.0 + 5 * k]
        ds.SliceLocation = -50.0 + 5 * k
        for tag in drop:
            delattr(ds, tag)
        paths.append(folder / f"ct{k}.dcm")
        ds.save_as(str(paths[-1]))
    return paths


def mask(volume: Volume) -> dict:
    m = np.zeros(volume.shape, bool)
    m[tuple(slice(0, max(1, n // 2)) for n in volume.shape)] = True
    return {"liver": m}


def refused(match: str, *args, **kwargs) -> InputError:
    with pytest.raises(InputError, match=match) as err:
        check_outputs(*args, **kwargs)
    assert err.value.hint, "every refusal says what to do"
    return err.value


# ---- happy paths: the check names every file, and the write it allowed then succeeds ----------------

@pytest.mark.parametrize("name,written", [
    ("out.seg.nrrd", ["out.seg.nrrd"]),
    ("out.nii.gz", ["out.nii.gz", "out.labels.json", "out.labels.csv"]),
    ("out.nii", ["out.nii", "out.labels.json", "out.labels.csv"]),
    ("out.nrrd", ["out.nrrd", "out.labels.json", "out.labels.csv"]),
])
def test_each_file_format_passes_and_then_writes(tmp_path, name, written):
    volume = nifti_input(tmp_path / "in")
    out = tmp_path / "out" / name  # a folder still to be made
    others = [tmp_path / "out" / "preview.png", tmp_path / "out" / "report.json", tmp_path / "out" / "prob.nrrd"]
    targets = check_outputs(out, volume, others=others)
    assert targets == [out.parent / w for w in written] + others
    assert write_segmentation(out, volume, mask(volume)) == targets[:len(written)]
    # again without --overwrite: refused, naming the file; with it: allowed
    refused("already exists", out, volume)
    assert check_outputs(out, volume, overwrite=True) == targets[:len(written)]


def test_result_json_passes(tmp_path):
    volume = nifti_input(tmp_path)
    assert check_outputs(tmp_path / "result.json", volume) == [tmp_path / "result.json"]


def test_dicom_seg_from_a_dicom_series_passes_and_writes(tmp_path):
    files = ct_series(tmp_path / "ct")
    volume = read_volume(tmp_path / "ct")
    inside = tmp_path / "ct" / "seg.dcm"  # beside the input files: allowed
    assert check_outputs(inside, volume, others=[tmp_path / "preview.png"]) == [inside, tmp_path / "preview.png"]
    assert write_segmentation(inside, volume, mask(volume)) == [inside]
    assert pydicom.dcmread(inside).FrameOfReferenceUID == pydicom.dcmread(files[0]).FrameOfReferenceUID


def test_paths_alone_without_an_image(tmp_path):
    assert check_outputs(tmp_path / "x.dcm", None) == [tmp_path / "x.dcm"]  # the DICOM checks need the image


# ---- names -------------------------------------------------------------------------------------------

def test_an_unknown_output_suffix_is_refused(tmp_path):
    volume = nifti_input(tmp_path)
    err = refused("Output '.*out.png' ends in '.png', which BiomedSeg does not write", tmp_path / "out.png", volume)
    assert ".seg.nrrd" in err.hint and ".json" in err.hint
    refused("'.*notes.txt' ends in '.txt', which BiomedSeg does not write", tmp_path / "out.seg.nrrd", volume,
            others=[tmp_path / "notes.txt"])


def test_two_outputs_of_one_run_naming_one_file_are_refused(tmp_path):
    volume = nifti_input(tmp_path / "in")
    out = tmp_path / "out.seg.nrrd"
    refused("is named twice among this run's outputs \\(as the output and as another output\\)",
            out, volume, others=[out])
    refused("out.labels.json' is named twice .*as the label table of 'out.nii.gz' and as another output",
            tmp_path / "out.nii.gz", volume, others=[tmp_path / "out.labels.json"])
    (tmp_path / "same").symlink_to(tmp_path)  # another spelling of the same folder
    refused("preview.png' is named twice", out, volume, others=[tmp_path / "preview.png",
                                                                  tmp_path / "same" / "preview.png"])
    assert not (tmp_path / "out.seg.nrrd").exists() and not (tmp_path / "preview.png").exists()


# ---- the input itself ----------------------------------------------------------------------------------

def test_the_input_file_itself_is_refused_even_with_overwrite(tmp_path):
    volume = nifti_input(tmp_path, "scan.nii.gz")
    err = refused("scan.nii.gz' is the input image .*would destroy the image", tmp_path / "scan.nii.gz", volume,
                  overwrite=True)
    assert "another file" in err.hint
    os.link(tmp_path / "scan.nii.gz", tmp_path / "alias.nii.gz")  # a hard link is the same file
    refused("alias.nii.gz' is the input image", tmp_path / "alias.nii.gz", volume, overwrite=True)
    refused("scan.nii.gz' is the input image", tmp_path / "seg.seg.nrrd", volume, overwrite=True,
            others=[tmp_path / "scan.nii.gz"])


def test_one_of_the_input_dicom_files_is_refused_but_the_folder_is_fine(tmp_path):
    files = ct_series(tmp_path / "ct")
    volume = read_volume(tmp_path / "ct")
    refused("ct1.dcm' is one of the input's DICOM files", files[1], volume, overwrite=True)
    assert check_outputs(tmp_path / "ct" / "result.seg.nrrd", volume) == [tmp_path / "ct" / "result.seg.nrrd"]
    refused("Output '.*ct' has no file ending", tmp_path / "ct", volume)  # the folder itself is no file name


# ---- label tables shared by two labelmaps -----------------------------------------------------------------

def test_a_label_table_of_another_labelmap_is_refused_until_that_labelmap_is_gone(tmp_path):
    volume = nifti_input(tmp_path / "in")
    write_segmentation(tmp_path / "X.nii.gz", volume, mask(volume))
    assert json.loads((tmp_path / "X.labels.json").read_text())["labelmap"] == "X.nii.gz"
    for overwrite in (False, True):  # --overwrite does not make it X.nrrd's
        err = refused("X.labels.json' is the label table of 'X.nii.gz' \\(beside it\\), which 'X.nrrd' would share",
                      tmp_path / "X.nrrd", volume, overwrite=overwrite)
        assert "'X_2.nrrd'" in err.hint
    write_segmentation(tmp_path / "X_2.nrrd", volume, mask(volume))
    assert "'X_3.nrrd'" in refused("label table of 'X.nii.gz'", tmp_path / "X.nrrd", volume, overwrite=True).hint
    # X.nii.gz rewritten over its own tables: fine
    assert check_outputs(tmp_path / "X.nii.gz", volume, overwrite=True)[1] == tmp_path / "X.labels.json"
    # once X.nii.gz is gone its tables are ordinary files: X.nrrd may replace them with --overwrite
    (tmp_path / "X.nii.gz").unlink()
    refused("X.nrrd' already exists|X.labels.json' already exists", tmp_path / "X.nrrd", volume)
    check_outputs(tmp_path / "X.nrrd", volume, overwrite=True)
    write_segmentation(tmp_path / "X.nrrd", volume, mask(volume), overwrite=True)
    assert json.loads((tmp_path / "X.labels.json").read_text())["labelmap"] == "X.nrrd"


def test_an_old_label_table_that_names_no_labelmap_is_an_ordinary_file(tmp_path):
    volume = nifti_input(tmp_path / "in")
    (tmp_path / "old.labels.json").write_text(json.dumps({"labels": [{"label": 1, "name": "liver"}]}))
    refused("old.labels.json' already exists", tmp_path / "old.nrrd", volume)
    assert check_outputs(tmp_path / "old.nrrd", volume, overwrite=True)[1] == tmp_path / "old.labels.json"


# ---- what check_target refuses, for every path of the run ---------------------------------------------

def test_path_problems_of_every_output_are_refused(tmp_path):
    volume = nifti_input(tmp_path / "in")
    (tmp_path / "a folder.nii.gz").mkdir()
    refused("a folder.nii.gz': it is a folder", tmp_path / "a folder.nii.gz", volume)
    (tmp_path / "file").write_text("x")
    refused("'.*file' is a file, not a folder", tmp_path / "out.seg.nrrd", volume,
            others=[tmp_path / "file" / "preview.png"])
    (tmp_path / "taken.labels.csv").write_text("x")  # a label table counts as much as the labelmap
    refused("taken.labels.csv' already exists", tmp_path / "taken.nii.gz", volume)
    (tmp_path / "report.json").write_text("{}")
    refused("report.json' already exists", tmp_path / "out.seg.nrrd", volume, others=[tmp_path / "report.json"])


def test_an_unwritable_folder_is_refused(tmp_path, monkeypatch):
    volume = nifti_input(tmp_path / "in")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.geteuid() == 0:  # root may write anywhere: the folder's owner would not, so ask as they would
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != locked and real(p, mode, **kw))
    try:
        refused("locked' is not writable", tmp_path / "out.seg.nrrd", volume, others=[locked / "preview.png"])
    finally:
        locked.chmod(0o700)


# ---- DICOM SEG -----------------------------------------------------------------------------------------

def test_dicom_seg_of_an_image_not_read_from_dicom_is_refused(tmp_path):
    volume = nifti_input(tmp_path)
    err = refused("DICOM SEG needs a DICOM reference", tmp_path / "seg.dcm", volume)
    assert ".seg.nrrd" in err.hint


def test_dicom_seg_of_a_multi_frame_dicom_is_refused(tmp_path):
    enhanced = get_testdata_file("emri_small.dcm")  # Enhanced MR Image Storage: 10 frames in one file
    volume = read_volume(enhanced)
    assert volume.shape[0] == 10 and volume.meta["dicom_files"] == [enhanced]
    refused("emri_small.dcm' is a multi-frame \\(enhanced\\) DICOM image holding all 10 frames in one file",
            tmp_path / "seg.dcm", volume)


def test_dicom_seg_without_highdicom_is_a_missing_dependency(tmp_path, monkeypatch):
    ct_series(tmp_path / "ct")
    volume = read_volume(tmp_path / "ct")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "highdicom" else real(name, *a))
    with pytest.raises(DependencyMissingError, match="pydicom and highdicom \\(highdicom not installed\\)") as err:
        check_outputs(tmp_path / "seg.dcm", volume)
    assert "pip install 'biomedseg[dicom]'" in err.value.hint


def test_dicom_seg_without_a_frame_of_reference_is_refused(tmp_path):
    ct_series(tmp_path / "ct", drop=("FrameOfReferenceUID",))
    volume = read_volume(tmp_path / "ct")
    refused("ct0.dcm' has no Frame of Reference UID", tmp_path / "seg.dcm", volume)


def test_dicom_seg_of_a_volume_changed_after_reading_is_refused(tmp_path):
    ct_series(tmp_path / "ct")
    volume = read_volume(tmp_path / "ct")
    two = Volume(volume.array[:2], volume.ijk_to_ras, meta=dict(volume.meta))
    refused("The reference has 2 slices but lists 3 DICOM files", tmp_path / "seg.dcm", two)
