"""What the engine refuses or warns about before anything runs: prompts against the model's targets, the
image's modality against the model's, on real data (slicerio's CTChest4, pydicom's CT and MR samples,
Colin27), from the CLI and the panel logic. Refusals come before any weights are looked for."""
import io
import time

import numpy as np
import pytest

from biomedseg.catalog import check_prompts, get_model
from biomedseg.cli import main
from biomedseg.cli.progress import ProgressBar
from biomedseg.decisions import decide
from biomedseg.errors import InputError, ModalityMismatchError
from biomedseg.io import read_volume
from biomedseg.prompts import TextPrompt
from biomedseg.volume import Volume


@pytest.fixture(scope="module")
def chest_ct(ct_chest_path):
    return read_volume(ct_chest_path)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("BIOMEDSEG_OFFLINE", "1")  # a weights lookup fails at once instead of retrying the hub


def _segment(args, capsys):
    started = time.perf_counter()
    rc = main(["segment", *args])
    return rc, capsys.readouterr().err, time.perf_counter() - started


# ---- prompts against the model's targets ------------------------------------------------------------

def test_a_typo_is_refused_with_the_suggestion_before_any_weights(ct_chest_path, tmp_path, capsys):
    rc, err, seconds = _segment([str(ct_chest_path), "--model", "biomedparse-v1", "--prompt", "livr",
                                 "-o", str(tmp_path / "x.seg.nrrd")], capsys)
    assert rc == 2, err
    assert "has no target 'livr'. Did you mean 'liver'?" in err and "--free-text" in err
    assert seconds < 5 and list(tmp_path.iterdir()) == []


def test_free_text_sends_it_as_written(ct_chest_path, tmp_path, capsys):
    """--free-text passes the check with a warning; the run then stops at the missing weights (exit 3)."""
    rc, err, _ = _segment([str(ct_chest_path), "--model", "biomedparse-v1", "--prompt", "livr", "--free-text",
                           "-o", str(tmp_path / "x.seg.nrrd")], capsys)
    assert rc == 3, err
    assert "'livr' is not among BiomedParse v1's targets; sent as free text" in err
    assert check_prompts("biomedparse-v1", ["livr"], free_text=True) == [TextPrompt("livr")]


def test_free_text_does_not_open_a_fixed_vocabulary():
    with pytest.raises(InputError, match="has no target 'brian'. Did you mean 'brain'.*only its own targets"):
        check_prompts("deepbet", ["brian"], free_text=True)


def test_spellings_of_a_known_name_are_sent_in_the_models_own():
    sent = check_prompts("biomedparse-v1", ["Tumour", "kidneys", "Left Kidney", "COVID-19 infection"])
    assert [p.text for p in sent] == ["tumor", "kidney", "Left Kidney", "COVID-19 infection"]


def test_a_target_of_another_modality_runs_with_a_warning_naming_where_it_was_trained(ct_chest_path, tmp_path,
                                                                                        capsys):
    rc, err, _ = _segment([str(ct_chest_path), "--model", "biomedparse-v1", "--prompt", "left lung, liver",
                           "-o", str(tmp_path / "x.seg.nrrd")], capsys)
    assert rc == 3, err  # the checks passed; the weights are not on this machine
    assert "warning: BiomedParse v1 was trained on 'left lung' in X-Ray images, not in CT" in err
    assert "'liver'" not in err.split("warning:")[-1]  # liver is a CT target: no warning for it


def test_hermes_suggests_both_lungs_for_lungs_and_names_the_command_not_a_function(tmp_path, capsys):
    rc, err, _ = _segment([str(tmp_path / "never-read.nii.gz"), "--model", "hermes", "--prompt", "lungs",
                           "-o", str(tmp_path / "x.seg.nrrd")], capsys)
    assert rc == 2
    assert "left lung" in err and "right lung" in err and "`biomedseg models hermes`" in err
    assert "concepts()" not in err


def test_the_cli_splits_comma_separated_prompts_as_the_panel_does():
    from biomedseg.cli import build_parser, prompts_of

    args = build_parser().parse_args(["segment", "x.nii.gz", "-o", "y.seg.nrrd", "--prompt", "liver, spleen;tumor",
                                      "--prompt", "left kidney"])
    assert [p.text for p in prompts_of(args)] == ["liver", "spleen", "tumor", "left kidney"]


def test_a_model_with_one_target_needs_no_prompt():
    assert check_prompts("deepbet", []) == [TextPrompt("brain")]
    with pytest.raises(InputError, match="No prompt given"):
        check_prompts("hermes", [])


# ---- the image's modality against the model's ------------------------------------------------------

def test_deepbet_on_a_chest_ct_is_refused_with_the_reason_in_under_five_seconds(ct_chest_path, tmp_path, capsys):
    rc, err, seconds = _segment([str(ct_chest_path), "-o", str(tmp_path / "brain.seg.nrrd")], capsys)
    assert rc == 2, err
    assert "made for MRI-T1 images, but its intensities say CT (Hounsfield-like intensities)" in err
    assert "--modality" in err and "--force" in err
    assert seconds < 5 and list(tmp_path.iterdir()) == []


def test_force_and_modality_override_the_guard_and_say_so(chest_ct):
    entry = get_model("deepbet")
    with pytest.raises(ModalityMismatchError):
        decide(entry, chest_ct, [TextPrompt("brain")], {})
    forced = decide(entry, chest_ct, [TextPrompt("brain")], {}, force=True)
    assert forced["force"] and any("Run anyway (--force)" in w for w in forced["warnings"])
    stated = decide(entry, chest_ct, [TextPrompt("brain")], {"modality": "T1"})
    assert stated["modality"] == {"modality": "MRI-T1", "source": "stated", "why": "given as 'T1'", "certain": True,
                                  "warnings": []}


def test_dicom_tags_are_evidence_and_a_sequence_of_the_right_family_only_warns():
    from pydicom.data import get_testdata_file

    entry = get_model("deepbet")
    ct = read_volume(get_testdata_file("CT_small.dcm"))
    with pytest.raises(ModalityMismatchError, match="its DICOM tags say CT"):
        decide(entry, ct, [TextPrompt("brain")], {})
    mr = read_volume(get_testdata_file("MR_small.dcm"))
    assert decide(entry, mr, [TextPrompt("brain")], {})["modality"]["source"] == "tags"  # MR: deepbet's family
    t2 = Volume(np.zeros((8, 8, 8), np.int16), np.eye(4), meta={"modality": "MR", "series_description": "t2_tse"})
    warned = decide(entry, t2, [TextPrompt("brain")], {})
    assert warned["warnings"] == ["deepbet brain extraction (T1 MRI) was trained on MRI-T1; this image is MRI-T2 "
                                  "(DICOM modality MR ('t2_tse'))."]


def test_an_mri_with_padding_or_ringing_below_minus_500_is_not_taken_for_ct(colin_path):
    """One outlier voxel is not air: CT needs a share of voxels near -1000 HU."""
    entry = get_model("deepbet")
    t1 = read_volume(colin_path)
    padded = Volume(t1.array.astype(np.int16), t1.ijk_to_ras)
    padded.array[:2] = -32768  # a padding slab
    padded.array[90, 100, 100] = -900  # a ringing voxel
    decision = decide(entry, padded, [TextPrompt("brain")], {})["modality"]
    assert decision["modality"] == "CT" and decision["certain"] is False  # the guess is said, never a refusal


def test_respelled_prompts_are_one_target():
    assert [p.text for p in check_prompts("biomedparse-v1", ["liver", "livers", "the liver", "kidney tumour",
                                                             "kidney tumor"])] == ["liver", "kidney tumor"]


def test_colour_photographs_and_guesses_that_guess(chest_ct):
    entry = get_model("deepbet")
    photo = Volume(np.zeros((1, 16, 16, 3), np.uint8), np.eye(4), channels_last=True)
    with pytest.raises(ModalityMismatchError, match="a colour photograph"):
        decide(entry, photo, [TextPrompt("brain")], {})
    assert decide(get_model("biomedparse-v1"), photo, [TextPrompt("optic disc")], {})["warnings"] == []
    grey = Volume(np.full((8, 8, 8), 100, np.int16), np.eye(4))  # "MRI-like": a fallback, never a refusal
    assert decide(get_model("hermes"), grey, [TextPrompt("liver")], {})["modality"]["certain"] is False
    assert decide(get_model("medsam2"), chest_ct, [], {})["warnings"] == []  # 'any' modality


# ---- what the CLI prints --------------------------------------------------------------------------------

def test_progress_is_whole_lines_when_stderr_is_not_a_terminal():
    stream = io.StringIO()
    bar = ProgressBar(True, stream)
    for done in range(101):
        bar("encoding slices", done, 100)
    bar("decoding", 1, 1)
    bar.close()
    text = stream.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines[0] == "encoding slices: 0/100" and lines[-1] == "decoding: 1/1"
    assert "encoding slices: 100/100" in lines and len(lines) <= 12


def test_models_id_shows_one_model_in_full_and_json_nests_targets(capsys):
    import json

    assert main(["models", "biomedparse-v1"]) == 0
    out = capsys.readouterr().out
    assert "X-Ray / chest: COVID-19 infection, left lung, lung, lung opacity, right lung, viral pneumonia" in out
    assert "p_value (a number; default 0.05): threshold of the authors' plausibility test" in out and "licence: CC-BY-NC-SA-4.0 (gated" in out and "free text with --free-text" in out
    assert main(["models", "hermes", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert "left lung" in record["targets"]["CT"]["thorax"] and "ivc" in record["synonyms"]["inferior vena cava"]
    assert main(["models"]) == 0
    listing = capsys.readouterr().out
    assert "in all)" not in listing and "biomedseg models hermes" in listing


# ---- the panel, by the same rules ----------------------------------------------------------------------

def test_the_panel_checks_each_prompt_live_as_the_cli_does():
    from biomedseg.panel import can_segment, notes_line, prompt_notes

    notes = prompt_notes("biomedparse-v1", "liver, livr, left lung", "CT")
    assert [n.level for n in notes] == ["ok", "error", "warning"]
    assert not can_segment(notes) and notes_line(notes).startswith("Model 'biomedparse-v1' has no target 'livr'")
    free = prompt_notes("biomedparse-v1", "livr", "CT", free_text=True)
    assert [n.level for n in free] == ["warning"] and can_segment(free)
    assert prompt_notes("biomedparse-v1", "Tumour", "CT")[0].text == "sent as 'tumor'"
    assert prompt_notes("medsam2", "anything", "CT") == []  # takes no text


def test_the_panel_refuses_a_wrong_modality_with_use_anyway(chest_ct):
    from biomedseg.panel import PanelState, build_request, describe_error

    state = PanelState(model="deepbet", prompts=["brain"], modality="MRI-T1")
    with pytest.raises(ModalityMismatchError) as caught:
        build_request(state, chest_ct)
    message = describe_error(caught.value)
    assert message.action == "use_anyway" and "its intensities say CT" in message.text
    state.force = True
    request = build_request(state, chest_ct)
    assert request.kwargs["force"] is True and "Run anyway (--force)" in request.warnings[0]


# ---- why a target is absent, with its figure ---------------------------------------------------------

def test_an_absent_target_carries_its_reason_kind_and_figure_through_the_worker(chest_ct, tmp_path, capsys):
    """Nothing above the threshold: the reason names the threshold and the highest probability, in the
    result (in-process and through the worker), the CLI's lines and the run report."""
    import json

    from conftest import worker_test_models

    from biomedseg.engine import segment
    from biomedseg.worker.client import WorkerClient

    with worker_test_models():
        local = segment(chest_ct, "test-model", ["nothing"], options={"radius": 0.0})
        client = WorkerClient()
        try:
            remote = client.run(chest_ct, "test-model", ["nothing"], options={"radius": 0.0})
        finally:
            client.close()
        rc = main(["segment", str(chest_ct.meta["source"]), "--model", "test-model", "--prompt", "nothing",
                   "--option", "radius=0", "-o", str(tmp_path / "x.seg.nrrd"), "--report", str(tmp_path / "r.json"),
                   "--in-process"])
    for result in (local, remote):
        absence = result.absent_details["nothing"]
        assert (absence.kind, absence.value, absence.cutoff) == ("threshold", 0.0, 0.5)
        assert result.absent_reasons["nothing"] == "no voxel above the threshold 0.5 (the highest probability is 0)"
    err = capsys.readouterr().err
    assert rc == 1 and "not found: 'nothing' (no voxel above the threshold 0.5" in err
    report = json.loads((tmp_path / "r.json").read_text())  # written even when nothing was found
    assert report["targets"] == [{"name": "nothing", "status": "absent", "reason": absence.reason,
                                  "kind": "threshold", "value": 0.0, "cutoff": 0.5}]
    assert not (tmp_path / "x.seg.nrrd").exists()


def test_dicom_seg_pre_flight_refuses_before_the_model_runs(colin_path, tmp_path, capsys):
    rc, err, seconds = _segment([str(colin_path), "-o", str(tmp_path / "brain.dcm")], capsys)
    assert rc == 2 and "DICOM SEG needs a DICOM reference" in err and "was not read from a DICOM series" in err
    assert seconds < 5 and list(tmp_path.iterdir()) == []


def test_probabilities_from_the_cli_are_the_maps_the_masks_came_from(chest_ct, tmp_path, capsys):
    import json

    import nrrd
    from conftest import worker_test_models

    out = tmp_path / "x.seg.nrrd"
    with worker_test_models():
        rc = main(["segment", str(chest_ct.meta["source"]), "--model", "test-model", "--prompt", "core, body",
                   "--option", "radius=40", "-o", str(out), "--probabilities", str(tmp_path / "p.nrrd"),
                   "--threshold", "0.4", "--no-largest", "--no-fill-holes", "--report", str(tmp_path / "r.json")])
    assert rc == 0, capsys.readouterr().err
    maps, header = nrrd.read(str(tmp_path / "p.nrrd"), index_order="C")
    assert maps.shape == chest_ct.shape + (2,) and header["kinds"][0] == "list"  # C order: (k, j, i, target)
    assert json.loads(header["targets"]) == ["core", "body"] and float(header["threshold"]) == 0.4
    import slicerio

    seg = slicerio.read_segmentation(str(out))
    for index, name in enumerate(["core", "body"]):
        label = next(s["labelValue"] for s in seg["segments"] if s["name"] == name)
        mask = slicerio.extract_segments(seg, [(name, label)])["voxels"].transpose(2, 1, 0) > 0  # (k, j, i)
        np.testing.assert_array_equal(mask, maps[..., index] > 0.4)
    assert str(tmp_path / "p.nrrd") in json.loads((tmp_path / "r.json").read_text())["outputs"]


def test_only_a_ct_intensity_window_is_called_one():
    from biomedseg.run_report import ct_window

    assert ct_window({"modality": "CT", "window": [-160.0, 240.0]}) == (-160.0, 240.0)
    assert ct_window({"window": [128, 128, 128], "modality_id": 0}) is None  # Hermes: a sliding window in voxels
    assert ct_window({"modality": "MRI", "window": None}) is None
    assert ct_window({"window": "percentiles 0.5-99.5", "intensity_window": [3, 250]}) == (3.0, 250.0)  # MedSAM2
