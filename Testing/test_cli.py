"""`biomedseg models | segment | doctor`, end to end on real data."""
import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import slicerio
from PIL import Image

from biomedseg.cli import main


@pytest.fixture(scope="module")
def segmented(colin_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli")
    # no --prompt: deepbet's one target is the default
    rc = main(["segment", str(colin_path), "-o", str(out / "brain.seg.nrrd"), "--preview", str(out / "brain.png"),
               "--report", str(out / "run.json"), "--device", "cpu", "-q"])
    return rc, out


def test_run_report_of_a_real_deepbet_run(segmented, colin_path):
    """The README's run-report schema, from deepbet on Colin27: what was asked, decided, found, and with what."""
    from biomedseg import __version__
    from biomedseg.catalog import get_model

    rc, out = segmented
    report = json.loads((out / "run.json").read_text())
    assert report["schema"] == "biomedseg.run-report/1" and report["engine"]["biomedseg"] == __version__
    assert report["input"]["source"] == str(colin_path) and report["input"]["shape_kji"] == [181, 217, 181]
    assert report["request"]["prompts"] == [{"type": "text", "text": "brain"}]
    assert report["request"]["threshold"] == 0.5 and report["request"]["force"] is False
    model = report["model"]
    assert model["id"] == "deepbet" and model["licence"] == "MIT"
    known = get_model("deepbet").weights["file_sha256"]
    assert {w["file"]: w["sha256"] for w in model["weights"]} == known
    assert report["decisions"]["modality"]["source"] == "intensities" and report["decisions"]["warnings"] == []
    (brain,) = report["targets"]
    mask = slicerio.extract_segments(slicerio.read_segmentation(str(out / "brain.seg.nrrd")), [("brain", 1)])
    voxels = int((mask["voxels"] == 1).sum())
    assert brain == {"name": "brain", "status": "found", "voxels": voxels, "volume_ml": round(voxels / 1000.0, 4),
                     "label": 1, "terminology": brain["terminology"]}
    assert brain["terminology"]["type"][1] == "12738006"
    assert report["device"]["used"] == "cpu" and set(report["times_s"]) == {"read", "run", "write", "total"}
    assert report["outputs"] == [str(out / "brain.seg.nrrd"), str(out / "brain.png")]


def test_segment_writes_seg_nrrd_a_person_can_open(segmented, colin_bet_path):
    rc, out = segmented
    assert rc == 0
    seg = slicerio.read_segmentation(str(out / "brain.seg.nrrd"))
    (brain,) = seg["segments"]
    assert brain["name"] == "brain" and brain["terminology"]["type"][2] == "Brain"
    mask = slicerio.extract_segments(seg, [("brain", 1)])["voxels"] == 1
    reference = np.asarray(nib.load(str(colin_bet_path)).dataobj) > 0  # (i, j, k), like slicerio's voxels
    dice = 2 * (mask & reference).sum() / (mask.sum() + reference.sum())
    assert dice >= 0.90
    png = Image.open(out / "brain.png")
    assert png.width > 600 and png.height > 300
    # three panels with coloured outline pixels (not just grey)
    rgb = np.asarray(png.convert("RGB")).astype(int)
    assert ((rgb[..., 0] != rgb[..., 2]) & (rgb[..., 0] > 200)).sum() > 500


def test_existing_output_is_not_replaced(segmented, colin_path, capsys):
    _, out = segmented
    before = (out / "brain.seg.nrrd").read_bytes()
    rc = main(["segment", str(colin_path), "--prompt", "brain", "-o", str(out / "brain.seg.nrrd")])
    assert rc == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "brain.seg.nrrd").read_bytes() == before


def test_bad_prompt_and_bad_output_fail_before_any_work(colin_path, tmp_path, capsys):
    assert main(["segment", str(colin_path), "--prompt", "liver", "-o", str(tmp_path / "x.seg.nrrd")]) == 2
    assert "has no target 'liver'" in capsys.readouterr().err
    assert main(["segment", str(colin_path), "--prompt", "brain", "-o", str(tmp_path / "x.png")]) == 2
    assert "must end in one of" in capsys.readouterr().err
    assert main(["segment", str(tmp_path / "missing.nii.gz"), "--prompt", "brain", "-o",
                 str(tmp_path / "x.seg.nrrd")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_models_json_via_console_script():
    out = subprocess.run([sys.executable, "-m", "biomedseg.cli", "models", "--json"], capture_output=True,
                         text=True, check=True).stdout
    models = {m["id"]: m for m in json.loads(out)}
    assert models["deepbet"]["state_ready"] is True
    assert models["biomedparse-v1"]["weights"]["license"] == "CC-BY-NC-SA-4.0"


def test_models_table(capsys):
    assert main(["models"]) == 0
    text = capsys.readouterr().out
    assert "deepbet" in text and "ready" in text and "1 target(s): brain" in text


def test_doctor_reports_torch_and_models(capsys):
    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    import torch

    assert report["torch"] == torch.__version__
    assert report["models"]["deepbet"]["ready"] is True
    assert report["memory_total_gb"] > 0
    assert main(["doctor"]) == 0
    assert "default_device" in capsys.readouterr().out


def test_doctor_checks_the_worker_end_to_end(capsys):
    assert main(["doctor", "--worker", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["worker"]["shared_memory"] == "ok" and report["worker"]["pid"] > 0


def test_doctor_reports_a_broken_worker_python(capsys, tmp_path):
    assert main(["doctor", "--worker", "--worker-python", str(tmp_path / "no-python")]) == 1
    assert "worker error" in capsys.readouterr().out


def test_model_options_and_region_from_the_command_line():
    from biomedseg.cli import build_parser, model_options, prompts_of, region_of
    from biomedseg.geometry import Region
    from biomedseg.prompts import BoxPrompt, PointPrompt, TextPrompt

    args = build_parser().parse_args(["segment", "in.nii.gz", "--prompt", "liver, left kidney", "-o", "o.seg.nrrd",
                                      "--modality", "CT", "--site", "abdomen", "--plane", "coronal",
                                      "--slice-range", "3", "9", "--batch-size", "4",
                                      "--option", "joint=true", "--option", "engine=monai",
                                      "--box", "1", "2", "3", "4", "5", "6", "--point", "1", "1", "1",
                                      "--exclude-point", "2", "2", "2", "--target", "tumour"])
    assert model_options(args) == {"modality": "CT", "site": "abdomen", "batch_size": 4, "joint": True,
                                   "engine": "monai"}
    # the slice range belongs to the engine (any model), counted along --plane; given backwards, it is refused
    assert region_of(args) == Region("coronal", (3, 9), None)
    backwards = build_parser().parse_args(["segment", "x", "-o", "o.seg.nrrd", "--slice-range", "17", "15"])
    with pytest.raises(Exception, match="Slice range 17..15 is reversed"):
        region_of(backwards)
    assert prompts_of(args) == [TextPrompt("liver"), TextPrompt("left kidney"),
                                BoxPrompt((1.0, 2.0, 3.0), (4.0, 5.0, 6.0), "coronal", "tumour"),
                                PointPrompt((1.0, 1.0, 1.0), True, "coronal", "tumour"),
                                PointPrompt((2.0, 2.0, 2.0), False, "coronal", "tumour")]
    bad = build_parser().parse_args(["segment", "x", "-o", "o.seg.nrrd", "--option", "novalue"])
    with pytest.raises(Exception, match="KEY=VALUE"):
        model_options(bad)


@pytest.mark.parametrize("model", ["deepbet", "biomedparse-v1", "hermes"])
def test_undeclared_option_is_refused_before_any_weights_or_reading(model, colin_path, tmp_path, capsys,
                                                                   monkeypatch):
    """Exit 2 naming the option and listing the model's own, before the image is read or weights looked
    for (biomedparse-v1 and hermes have no weights on this machine)."""
    monkeypatch.setenv("BIOMEDSEG_OFFLINE", "1")
    rc = main(["segment", str(tmp_path / "not-read.nii.gz"), "--model", model, "--prompt",
               {"deepbet": "brain", "biomedparse-v1": "liver", "hermes": "liver"}[model],
               "-o", str(tmp_path / "x.seg.nrrd"), "--option", "bogus=1"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"Model '{model}' has no option 'bogus'" in err and "Its options are:" in err
    if model != "deepbet":
        assert "batch_size (int)" in err
    assert list(tmp_path.iterdir()) == []
    # a declared option with a value of the wrong type is refused the same way
    if model == "biomedparse-v1":
        assert main(["segment", str(colin_path), "--model", model, "--prompt", "liver", "-o",
                     str(tmp_path / "x.seg.nrrd"), "--option", "joint=maybe"]) == 2
        assert "Option 'joint' of model 'biomedparse-v1' must be true or false" in capsys.readouterr().err
    # --modality is the engine's for every model: saying a T1 image is CT is taken at its word and refused
    if model == "deepbet":
        assert main(["segment", str(colin_path), "--prompt", "brain", "--modality", "CT", "-o",
                     str(tmp_path / "x.seg.nrrd")]) == 2
        assert "made for MRI-T1 images, but you said it is CT" in capsys.readouterr().err


def test_empty_weights_and_oversized_prompts_are_refused_the_same_in_process_and_in_the_worker(colin_path, tmp_path,
                                                                                               capsys):
    out = str(tmp_path / "x.seg.nrrd")
    assert main(["segment", str(colin_path), "--prompt", "brain", "--weights", "", "-o", out]) == 2
    assert "--weights is empty" in capsys.readouterr().err
    for extra in ([], ["--in-process"]):
        assert main(["segment", str(colin_path), "--model", "hermes", "--prompt", "x" * 1500, "-o", out, *extra]) == 2
        assert "longer than any target name" in capsys.readouterr().err
    from biomedseg.catalog import check_prompts
    from biomedseg.errors import InputError

    with pytest.raises(InputError, match="1001 prompts are more than one run takes"):
        check_prompts("biomedparse-v1", [f"t{i}" for i in range(1001)])
