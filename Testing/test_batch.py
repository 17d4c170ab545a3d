"""`biomedseg batch` without Ray: a real cohort (Colin27 under three orientations and a corrupt file)
through deepbet, resume, and manifests and globs with the controllable test model."""
import csv
import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from biomedseg.cli import main
from conftest import worker_test_models


def write_reoriented(colin_path, folder):
    """Colin27 as it is, with its first axis flipped, and with its first two axes swapped: the same
    physical image (each affine says where its voxels are)."""
    img = nib.load(str(colin_path))
    data, affine = np.asanyarray(img.dataobj), img.affine
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, data.shape[0] - 1
    swap = np.eye(4)[[1, 0, 2, 3]]
    shutil.copy(colin_path, folder / "colin.nii.gz")
    nib.save(nib.Nifti1Image(data[::-1], affine @ flip, img.header), str(folder / "flipped.nii.gz"))
    nib.save(nib.Nifti1Image(np.transpose(data, (1, 0, 2)), affine @ swap, img.header), str(folder / "swapped.nii.gz"))
    (folder / "broken.nii.gz").write_bytes(colin_path.read_bytes()[:60000])  # truncated gzip
    return ["broken", "colin", "flipped", "swapped"]


def cases(outdir) -> dict:
    data = json.loads((outdir / "summary.json").read_text())
    assert data["schema"] == "biomedseg.batch-summary/1"
    return {r["case"]: r for r in data["cases"]}


@pytest.fixture(scope="module")
def cohort(colin_path, tmp_path_factory):
    """One deepbet batch over the four files (rc, inputs folder, output folder, records)."""
    inputs = tmp_path_factory.mktemp("cohort")
    write_reoriented(colin_path, inputs)
    out = tmp_path_factory.mktemp("cohort_out") / "out"
    rc = main(["batch", str(inputs), "-o", str(out), "--model", "deepbet", "--device", "cpu", "--report", "-q"])
    return rc, inputs, out, cases(out)


def test_a_cohort_writes_every_case_and_records_the_corrupt_one(cohort):
    from biomedseg import __version__
    from biomedseg.catalog import get_model

    rc, _, out, records = cohort
    assert rc == 1  # one case failed
    assert list(records) == ["broken", "colin", "flipped", "swapped"]
    broken = records["broken"]
    assert broken["status"] == "failed" and broken["error"]["kind"] == "bad_input"
    assert "truncated or damaged" in broken["error"]["message"] and broken["outputs"] == []
    known = get_model("deepbet").weights["file_sha256"]
    for name in ("colin", "flipped", "swapped"):
        r = records[name]
        assert r["status"] == r["outcome"] == "ok" and r["error"] is None
        assert r["outputs"] == [f"{name}.seg.nrrd", f"{name}.run.json"]
        assert all((out / f).is_file() for f in r["outputs"])
        assert r["model"] == "deepbet" and r["model_version"] == "1.0.2" and r["engine"] == __version__
        assert {w["file"]: w["sha256"] for w in r["weights"]} == known
        assert r["absent"] == {} and r["seconds"] >= r["model_seconds"] > 0
        report = json.loads((out / f"{name}.run.json").read_text())
        assert report["targets"][0]["voxels"] == r["segments"]["brain"]["voxels"]
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert [row["case"] for row in rows] == list(records)
    colin = rows[1]
    assert colin["brain voxels"] == str(records["colin"]["segments"]["brain"]["voxels"])
    assert float(colin["brain mL"]) == pytest.approx(records["colin"]["segments"]["brain"]["volume_ml"])
    assert rows[0]["error_kind"] == "bad_input" and rows[0]["status"] == "failed"
    assert "model.pt:" + known["model.pt"] in colin["weights_sha256"]


def test_the_orientations_agree_physically(cohort):
    """The same brain whatever the array order: voxel counts, and the masks on Colin's own grid."""
    from biomedseg.io import read_volume
    from biomedseg.io.segmentation_reader import read_segments

    _, inputs, out, records = cohort
    counts = [records[n]["segments"]["brain"]["voxels"] for n in ("colin", "flipped", "swapped")]
    assert max(counts) - min(counts) <= 0.001 * counts[0]
    assert 1.7e6 < counts[0] < 2.2e6  # about 1.96 L at 1 mm
    colin = read_volume(inputs / "colin.nii.gz")
    reference = read_segments(out / "colin.seg.nrrd", colin)[0][0].mask.astype(bool)
    for name in ("flipped", "swapped"):
        mask = read_segments(out / f"{name}.seg.nrrd", colin)[0][0].mask.astype(bool)
        assert np.count_nonzero(mask != reference) <= 0.001 * reference.sum()


def test_resume_skips_finished_cases_and_a_new_setting_runs_them_again(cohort):
    rc, inputs, out, first = cohort
    stamps = {n: (out / f"{n}.seg.nrrd").stat().st_mtime_ns for n in ("colin", "flipped", "swapped")}
    (inputs / "broken.nii.gz").unlink()  # the corrupt file is gone: everything left is finished
    rc = main(["batch", str(inputs), "-o", str(out), "--model", "deepbet", "--device", "cpu", "--report", "-q"])
    again = cases(out)
    assert rc == 0
    for name, stamp in stamps.items():
        assert again[name]["status"] == "skipped" and again[name]["outcome"] == "ok"
        assert again[name]["settings_hash"] == first[name]["settings_hash"]
        assert again[name]["segments"] == first[name]["segments"]
        assert (out / f"{name}.seg.nrrd").stat().st_mtime_ns == stamp
    assert again["broken"]["status"] == "failed"  # not in this run: its record is kept as it was

    # another threshold is another result: every case runs again and replaces its own files
    rc = main(["batch", str(inputs), "-o", str(out), "--model", "deepbet", "--device", "cpu", "--report", "-q",
               "--threshold", "0.6"])
    third = cases(out)
    assert rc == 0
    for name, stamp in stamps.items():
        assert third[name]["status"] == "ok" and third[name]["settings"]["threshold"] == 0.6
        assert third[name]["settings_hash"] != first[name]["settings_hash"]
        assert (out / f"{name}.seg.nrrd").stat().st_mtime_ns != stamp


def small_image(path, shape=(20, 20, 20), seed=0):
    rng = np.random.default_rng(seed)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = -10
    nib.save(nib.Nifti1Image(rng.integers(0, 1000, shape).astype(np.int16), affine), str(path))
    return path


def test_manifests_give_each_case_its_prompts_and_options(tmp_path):
    """CSV and JSON manifests: per-case prompts and options over the command line's; a bad option in one
    row fails that case only; relative inputs are relative to the manifest."""
    for n in range(3):
        small_image(tmp_path / f"img{n}.nii.gz", seed=n)
    with open(tmp_path / "cases.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case", "input", "prompt", "options"])
        writer.writerow(["small", "img0.nii.gz", "target", '{"radius": 3}'])
        writer.writerow(["large", "img1.nii.gz", "target, bright", '{"radius": 7}'])
        writer.writerow(["wrong", "img2.nii.gz", "", '{"no_such_option": 1}'])
    (tmp_path / "cases.json").write_text(json.dumps({"cases": [
        {"input": "img0.nii.gz", "options": {"radius": 3}},
        {"input": str(tmp_path / "img1.nii.gz"), "case": "with space", "prompt": ["target", "bright"]}]}))
    with worker_test_models():
        rc_csv = main(["batch", str(tmp_path / "cases.csv"), "-o", str(tmp_path / "csv"), "--model", "test-model",
                       "--prompt", "target", "--option", "steps=2", "-q"])
        rc_json = main(["batch", str(tmp_path / "cases.json"), "-o", str(tmp_path / "json"), "--model", "test-model",
                        "--prompt", "target", "--format", "nii.gz", "-q"])
    by_csv, by_json = cases(tmp_path / "csv"), cases(tmp_path / "json")
    assert rc_csv == 1 and rc_json == 0
    small, large, wrong = by_csv["small"], by_csv["large"], by_csv["wrong"]
    assert small["settings"]["options"] == {"steps": 2, "radius": 3} and list(small["segments"]) == ["target"]
    assert list(large["segments"]) == ["target", "bright"]
    assert large["segments"]["target"]["voxels"] > small["segments"]["target"]["voxels"] > 0
    assert wrong["status"] == "failed" and wrong["error"]["kind"] == "bad_input"
    assert "no_such_option" in wrong["error"]["message"]
    assert list(by_json) == ["img0", "with_space"]
    assert by_json["img0"]["segments"]["target"] == small["segments"]["target"]
    assert by_json["with_space"]["outputs"] == ["with_space.nii.gz", "with_space.labels.json", "with_space.labels.csv"]
    assert (tmp_path / "json" / "with_space.nii.gz").is_file()


def test_a_glob_names_cases_by_their_folders_when_stems_collide(tmp_path):
    from biomedseg.batch import find_cases

    for subject in ("sub-01", "sub-02"):
        (tmp_path / subject).mkdir()
        small_image(tmp_path / subject / "T1.nii.gz")
    (tmp_path / "sub-01" / "notes.txt").write_text("not an image")
    found = find_cases(str(tmp_path / "*" / "*"))
    assert [(c.name, c.input.parent.name) for c in found] == [("sub-01_T1", "sub-01"), ("sub-02_T1", "sub-02")]
    with worker_test_models():
        rc = main(["batch", str(tmp_path / "sub-*" / "T1.nii.gz"), "-o", str(tmp_path / "out"),
                   "--model", "test-model", "--prompt", "target", "-q"])
    assert rc == 0 and sorted(cases(tmp_path / "out")) == ["sub-01_T1", "sub-02_T1"]
    assert (tmp_path / "out" / "sub-02_T1.seg.nrrd").is_file()


def test_files_in_the_way_need_overwrite_and_ray_needs_installing(tmp_path, monkeypatch, capsys):
    """A file this batch did not write is not replaced without --overwrite (that case fails, with the
    usual sentence); --ray without Ray importable exits 3 with what to install."""
    small_image(tmp_path / "a.nii.gz")
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.seg.nrrd").write_text("someone else's file")
    with worker_test_models():
        rc = main(["batch", str(tmp_path), "-o", str(out), "--model", "test-model", "--prompt", "target", "-q"])
        assert rc == 1 and cases(out)["a"]["error"]["message"].endswith("already exists.")
        rc = main(["batch", str(tmp_path), "-o", str(out), "--model", "test-model", "--prompt", "target", "-q",
                   "--overwrite"])
        assert rc == 0 and cases(out)["a"]["status"] == "ok"
    monkeypatch.setitem(__import__("sys").modules, "ray", None)  # import ray fails
    capsys.readouterr()
    assert main(["batch", str(tmp_path), "-o", str(out), "--ray", "auto"]) == 3
    assert "biomedseg[cluster]" in capsys.readouterr().err
