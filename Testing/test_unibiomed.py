"""UniBiomed's adapter, environment and panel/CLI paths, without a GPU or its weights.

The authors' model is not run here. Its ``predict_forward`` is replaced by a stand-in
(Testing/worker_models/unibiomed_standin) whose answers and masks are simple functions of the frames
it is shown, so every voxel the adapter returns is known from the geometry alone:

(1) the requests in the authors' phrasing; answers with several [SEG], none, empty, malformed;
(2) the 5 language-model slices and the forward/backward videos;
(3) through a real worker, every storage order (48) and an oblique grid: the masks land on the right
    voxels, named after their phrases, and the language model saw the same 5 physical slices;
    propagation choices, a one-slice image, segment answers with and without [SEG];
(4) the CLI: findings printed, masks written, -o X.json with both; the panel's phrase links;
(5) `env create unibiomed --dry-run` prints the exact pins and commands; steps run and recorded;
(6) "needs an NVIDIA GPU" before anything is downloaded; the environment the worker must run in;
(7) the remote code of the downloaded snapshot, when the hub cache has it.
"""
from __future__ import annotations

import itertools
import json
import shlex
import sys

import numpy as np
import pytest

from biomedseg.catalog import get_model
from biomedseg.errors import DependencyMissingError, InputError
from biomedseg.models.unibiomed import frames as fr
from biomedseg.models.unibiomed.prompting import build_request, parse_answer, segment_names, sentence_findings
from biomedseg.volume import Volume
from conftest import standin_registered, worker_client
from geometry_cases import affine, reoriented, rotation

STANDIN = "unibiomed-standin"
LPS = np.diag([-1.0, -1.0, 1.0])
SPACING = (0.8, 0.9, 2.5)
WINDOW = {"window": "0,255"}  # grey levels pass unchanged, so the stand-in reads each slice's code


def coded_volume() -> Volume:
    """(9, 12, 16) LPS volume: axial slice k has background level 20 + 10 k (its code); a fixed random 30% of
    the voxels are bright (200)."""
    k = np.indices((9, 12, 16))[0]
    array = (20 + 10 * k).astype(np.int16)
    array[np.random.default_rng(7).random(array.shape) < 0.3] = 200
    return Volume(array, affine(LPS, SPACING, (10.0, -20.0, 30.0)), name="coded")


def expected(volume: Volume) -> dict:
    """'bright blob' = the bright voxels; 'the corner' = the anterior, patient-right quarter of every axial slice."""
    ras = volume.ras_of_voxels()
    r, a = ras[..., 0].round(6), ras[..., 1].round(6)
    right = r > np.median(np.unique(r))
    anterior = a > np.median(np.unique(a))
    return {"bright blob": volume.array > 128, "the corner": right & anterior}


def storages():
    base = coded_volume()
    cases = [(f"perm{''.join(map(str, p))}_flip{''.join('1' if f else '0' for f in fl)}", *reoriented(base, p, fl))
             for p in itertools.permutations(range(3)) for fl in itertools.product((False, True), repeat=3)]
    tilted = Volume(base.array, affine(rotation([1.0, 2.0, 3.0], 12.0) @ LPS, SPACING, (10.0, -20.0, 30.0)),
                    name="oblique")
    assert tilted.slice_orientation("axial") == base.slice_orientation("axial")
    return cases + [("oblique", tilted, lambda a: a)]


STORAGES = storages()


@pytest.fixture(scope="module")
def standin():
    with standin_registered(STANDIN):
        yield


@pytest.fixture(scope="module")
def client(standin):
    with worker_client() as c:
        yield c


# ---- (1) requests and answers ------------------------------------------------------------------
def test_requests_are_the_authors_phrasing():
    assert build_request("segment", target="the left lung") == "<image>Please segment the left lung."
    assert build_request("findings") == ("<image>Could you describe the abnormality in this image? Please highlight "
                                         "the region with interleaved segmentation masks.")
    assert build_request("findings", about="liver") == (
        "<image>Can we observe any signs of abnormality in liver? Please respond with interleaved segmentation masks "
        "for the corresponding parts.")
    assert build_request("question", question="Is the  liver enlarged?") == (
        "<image>Is the liver enlarged? Please respond with interleaved segmentation masks for the corresponding parts.")
    assert build_request("question", question="Is it normal?", ground=False) == "<image>Is it normal?"


def test_answers_with_several_seg_none_empty_and_malformed():
    grg = parse_answer("<p> A hypodense lesion in the liver </p> [SEG]. The <p> spleen </p> [SEG] is normal.<|im_end|>", 2)
    assert [g.phrase for g in grg.grounded] == ["A hypodense lesion in the liver", "spleen"]
    assert grg.text == "A hypodense lesion in the liver. The spleen is normal." and grg.kind == "grounded"
    assert sentence_findings(grg, segment_names(grg)) == [("A hypodense lesion in the liver.",
                                                           ["A hypodense lesion in the liver"]),
                                                          ("The spleen is normal.", ["spleen"])]
    disease = parse_answer("It is [SEG]. liver tumor.", 1)  # the phrase follows the stock sentence
    assert [g.phrase for g in disease.grounded] == ["liver tumor"] and disease.text == "liver tumor."
    seg = parse_answer("Sure, [SEG].<|im_end|>", 1, "left lung")
    assert seg.text == "left lung" and seg.grounded[0].phrase == "left lung" and not seg.notes
    none = parse_answer("There is no abnormality.<|im_end|>", 0)
    assert none.kind == "no [SEG]" and none.grounded == [] and none.text == "There is no abnormality."
    assert parse_answer("", 0).kind == "empty" and parse_answer("<|im_end|>", 0).kind == "empty"
    short = parse_answer("<p> lesion </p> [SEG] and <p> cyst </p> [SEG].", 1)  # fewer masks than [SEG]
    assert [g.has_mask for g in short.grounded] == [True, False] and "2 [SEG]" in short.notes[0]
    unbalanced = parse_answer("<p> nodule [SEG] in the lung.", 1)
    assert unbalanced.grounded[0].phrase == "nodule" and "unbalanced" in unbalanced.notes[0]
    extra = parse_answer("Nothing to see.", 2)  # masks without tokens are kept, matched in order
    assert [g.phrase for g in extra.grounded] == ["finding 1", "finding 2"]
    twin = parse_answer("<p> lesion </p> [SEG], <p> lesion </p> [SEG].", 2)
    assert segment_names(twin, ["lesion"]) == ["lesion 2", "lesion 3"]


# ---- (2) the 5 language-model slices and the videos ---------------------------------------------
def test_language_frames_and_videos():
    assert fr.language_frames(9, 4) == [2, 3, 4, 5, 6]
    assert fr.language_frames(9, 0) == [0, 1, 2, 3, 4] and fr.language_frames(9, 8) == [4, 5, 6, 7, 8]
    assert fr.language_frames(3, 1) == [0, 1, 2] and fr.language_frames(1, 0) == [0]
    first = [2, 3, 4, 5, 6]
    assert fr.videos(9, first, "both") == [("forward", [2, 3, 4, 5, 6, 7, 8]), ("backward", [2, 3, 4, 5, 6, 1, 0])]
    assert fr.videos(9, first, "forward") == [("forward", [2, 3, 4, 5, 6, 7, 8])]
    assert fr.videos(9, first, "none") == [("language frames", first)]
    assert fr.videos(9, [4, 5, 6, 7, 8], "both") == [("backward", [4, 5, 6, 7, 8, 3, 2, 1, 0])]  # nothing above
    assert fr.videos(5, [0, 1, 2, 3, 4], "both") == [("language frames", [0, 1, 2, 3, 4])]
    stacks = fr.restack((4, 1, 1), [([1, 2, 3], [np.array([1, 0, 1]).reshape(3, 1, 1)]),
                                    ([1, 2, 0], [np.array([0, 0, 1]).reshape(3, 1, 1)])], 2, 1)
    assert stacks[0].ravel().tolist() == [True, True, False, True]  # frame 0 from the second pass only


def test_rank_hook_uses_biomedclip_when_it_is_ready(monkeypatch):
    from biomedseg.models.unibiomed import ranking
    from biomedseg.models.unibiomed.backend import UniBiomedBackend

    backend = UniBiomedBackend("cuda:0")
    frames = fr.Frames(coded_volume(), "axial", (0.0, 255.0))
    details = {"slices": None, "plane": "axial", "window_option": None}
    asked = []
    monkeypatch.setattr(ranking.SliceRanker, "available", lambda self: True)
    monkeypatch.setattr(ranking.SliceRanker, "best", lambda self, volume, target, plane, window:
                        asked.append((target, plane)) or (7, 0.91))
    assert backend.centre(frames, "liver", details) == (7, "BiomedCLIP's best slice for 'liver' (score 0.910)")
    assert asked == [("liver", "axial")]
    monkeypatch.setattr(ranking.SliceRanker, "best", lambda *a: (_ for _ in ()).throw(RuntimeError("no weights")))
    frame, how = backend.centre(frames, "liver", details)
    assert frame == 4 and how == "the middle of the slice range (BiomedCLIP's ranking failed (no weights))"
    assert backend.centre(frames, "liver", dict(details, slices=1))[1] == "slice 1 (chosen)"
    with pytest.raises(InputError, match="outside the slices"):
        backend.centre(frames, "liver", dict(details, slices=40))


def test_without_biomedclip_weights_the_middle_is_used_and_said(monkeypatch):
    from biomedseg.models.unibiomed import ranking
    from biomedseg.models.unibiomed.backend import UniBiomedBackend

    monkeypatch.setattr(ranking, "weights_state", lambda spec: {"present": False})
    monkeypatch.setattr(ranking.importlib.util, "find_spec", lambda name: object())
    frames = fr.Frames(coded_volume(), "axial", (0.0, 255.0))
    assert UniBiomedBackend("cuda:0").centre(frames, "liver", {"slices": None, "plane": "axial"}) == (
        4, "the middle of the slice range (BiomedCLIP's weights are not on this machine)")


# ---- (3) through the worker: every storage order ---------------------------------------------
def test_every_storage_order_lands_on_the_right_voxels(client):
    want = expected(coded_volume())
    assert want["bright blob"].any() and want["the corner"].sum() == want["the corner"].size // 4
    for name, volume, back in STORAGES:
        result = client.run(volume, STANDIN, [], options={"task": "findings", **WINDOW}, timeout=60)
        masks = {s.name: back(s.mask) for s in result.segments}
        assert set(masks) == set(want), name
        for phrase, mask in want.items():
            assert int(np.count_nonzero(masks[phrase] != mask)) == 0, f"{name} {phrase}"
        answer = result.report["answers"][0]
        assert "Seen: 40 50 60 70 80." in answer["answer"], name  # the 5 middle slices, inferior first
        assert [p["pass"] for p in answer["passes"]] == ["forward", "backward"] and not answer["notes"], name
        assert result.findings[0].to_dict() == {"text": "bright blob lies beside the corner.",
                                                "targets": ["bright blob", "the corner"]}, name


@pytest.mark.parametrize("plane,axis", [("coronal", 1), ("sagittal", 2)])
def test_other_planes(client, plane, axis):
    from biomedseg.geometry import make_region

    base = coded_volume()
    array = (20 + 5 * np.indices(base.shape)[axis]).astype(np.int16)  # the code runs along this plane's axis
    array[base.array > 128] = 200
    volume = Volume(array, base.ijk_to_ras, name=plane)
    result = client.run(volume, STANDIN, ["blob"], options={"task": "segment", **WINDOW}, free_text=True,
                        region=make_region(plane), timeout=60)
    assert np.array_equal(result.segments[0].mask, array > 128), plane
    answer = result.report["answers"][0]
    seen = sorted(answer["language_model_slices"])
    middle = volume.shape[axis] // 2
    assert seen == list(range(middle - 2, middle + 3)) or seen == list(range(middle - 3, middle + 2)), seen
    assert not answer["notes"] and len(answer["passes"]) == 2


def test_propagation_choices_and_a_chosen_centre(client):
    volume = coded_volume()
    bright = volume.array > 128
    forward = client.run(volume, STANDIN, ["blob"], options={"propagate": "forward", "slices": 2, **WINDOW},
                         free_text=True, timeout=60)
    got = forward.segments[0].mask
    assert forward.report["answers"][0]["language_model_slices"] == [0, 1, 2, 3, 4]
    assert np.array_equal(got, bright)  # centred on 2: the 5 frames start at the bottom, forward covers all
    none = client.run(volume, STANDIN, ["blob"], options={"propagate": "none", **WINDOW}, free_text=True)
    covered = np.zeros_like(bright)
    covered[2:7] = True
    assert np.array_equal(none.segments[0].mask, bright & covered)
    up = client.run(volume, STANDIN, ["blob"], options={"propagate": "forward", **WINDOW}, free_text=True)
    covered[7:] = True
    assert np.array_equal(up.segments[0].mask, bright & covered)


def test_segment_answers_with_and_without_seg_through_the_worker(client):
    volume = coded_volume()
    result = client.run(volume, STANDIN, ["blob", "nothing", "empty", "twice", "malformed"], options=WINDOW,
                        free_text=True, timeout=60)
    masks = {s.name: s.mask for s in result.segments}
    corner = expected(volume)["the corner"]
    assert set(masks) == {"blob", "twice", "malformed"}
    assert np.array_equal(masks["twice"], (volume.array > 128) | corner)  # every [SEG] of the answer
    assert result.absent_reasons["nothing"] == ('UniBiomed answered "There is no such structure here." without a '
                                                "[SEG] token, so it drew nothing")
    assert result.absent_reasons["empty"] == "UniBiomed gave an empty answer"
    kinds = {a["target"]: a["kind"] for a in result.report["answers"]}
    assert kinds == {"blob": "grounded", "nothing": "no [SEG]", "empty": "empty", "twice": "grounded",
                     "malformed": "grounded"}
    malformed = next(a for a in result.report["answers"] if a["target"] == "malformed")
    assert "2 [SEG] token(s) but 1 mask(s)" in malformed["notes"][0]
    assert {"text": "There is no such structure here.", "targets": []} in [f.to_dict() for f in result.findings]
    from biomedseg.errors import BiomedSegError

    with pytest.raises(BiomedSegError, match="shape"):
        client.run(volume, STANDIN, ["wrong shape"], options=WINDOW, free_text=True)


def test_a_one_slice_image_and_an_empty_findings_answer(client):
    volume = coded_volume()
    one = Volume(volume.array[4:5].copy(), volume.ijk_to_ras, name="slice")
    result = client.run(one, STANDIN, [], options={"task": "question", "question": "What is bright?", **WINDOW})
    assert np.array_equal(next(s for s in result.segments if s.name == "bright blob").mask, one.array > 128)
    assert result.report["answers"][0]["passes"][0]["pass"] == "language frames"
    empty = client.run(volume, STANDIN, [], options={"task": "question", "question": "empty answer please", **WINDOW})
    assert empty.segments == [] and [f.text for f in empty.findings] == ["(UniBiomed gave an empty answer)"]
    assert empty.report["answers"][0]["kind"] == "empty"


def test_plan_refusals(standin):
    from biomedseg.engine import segment

    volume = coded_volume()
    with pytest.raises(InputError, match="takes no prompts"):
        segment(volume, STANDIN, ["liver"], options={"task": "findings"}, free_text=True)
    with pytest.raises(InputError, match="needs the question"):
        segment(volume, STANDIN, [], options={"task": "question"})
    with pytest.raises(InputError, match="needs the target"):
        segment(volume, STANDIN, [], options={"task": "segment"})
    with pytest.raises(InputError, match="'auto' or a slice number"):
        segment(volume, STANDIN, ["blob"], options={"slices": "middle"}, free_text=True)
    assert get_model(STANDIN).options == get_model("unibiomed").options  # the stand-in runs the real options


# ---- (4) CLI and panel ---------------------------------------------------------------------------
def test_cli_prints_the_findings_and_writes_masks_and_json(standin, tmp_path, capsys):
    from biomedseg.cli import main
    from biomedseg.io import write_volume
    from biomedseg.io.segmentation_reader import read_segments

    write_volume(tmp_path / "v.nrrd", coded_volume())
    common = ["segment", str(tmp_path / "v.nrrd"), "--model", STANDIN, "--option", "task=findings", "--option",
              "window=0,255", "--in-process"]
    assert main(common + ["-o", str(tmp_path / "out.seg.nrrd")]) == 0
    err = capsys.readouterr().err
    assert "finding: bright blob lies beside the corner. [bright blob, the corner]" in err
    written = {s.name: s.mask for s in read_segments(tmp_path / "out.seg.nrrd", coded_volume())[0]}
    assert set(written) == {"bright blob", "the corner"}
    assert np.array_equal(written["bright blob"], coded_volume().array > 128)
    assert main(common + ["-o", str(tmp_path / "out.json")]) == 0
    data = json.loads((tmp_path / "out.json").read_text())
    assert [s["name"] for s in data["segments"]] == ["bright blob", "the corner"]
    assert data["findings"][0] == {"text": "bright blob lies beside the corner.", "targets": ["bright blob", "the corner"]}
    assert data["report"]["answers"][0]["language_model_slices"] == [2, 3, 4, 5, 6]


def test_panel_links_each_phrase_to_its_segment():
    from biomedseg.panel import finding_views, findings_html, phrase_segments, segment_of_link
    from biomedseg.panel.messages import RunOutcome
    from biomedseg.results import Finding

    findings = [Finding("A lesion and a second lesion in the liver.", ["lesion", "lesion 2"]),
                Finding("The liver is large.", ["liver"]), Finding("No [SEG] here.", []),
                Finding("Cut short.", ["a very long phrase"])]
    # 'lesion' was written as 'lesion 2' ('lesion' was taken in the node); the result's own 'lesion 2' as 'lesion 3'
    outcome = RunOutcome("done", segment_ids=["S1", "S2", "S3"], names=["lesion 2", "lesion 3", "liver"],
                         result_names=["lesion", "lesion 2", "liver"], findings=findings)
    assert phrase_segments(outcome) == {"lesion": ["S1"], "lesion 2": ["S2"], "liver": ["S3"],
                                        "a very long phrase": []}
    renamed = RunOutcome("done", segment_ids=["S1", "S3"], names=["lesion 2", "liver"], findings=findings[:2])
    assert phrase_segments(renamed) == {"lesion": ["S1"], "lesion 2": [], "liver": ["S3"]} or \
        phrase_segments(renamed) == {"lesion": [], "lesion 2": ["S1"], "liver": ["S3"]}  # names alone are ambiguous
    plain = RunOutcome("done", segment_ids=["S4"], names=["tumor 2"], findings=[Finding("A tumor.", ["tumor"])])
    assert phrase_segments(plain) == {"tumor": ["S4"]}  # the writer's renaming, recognised
    views = finding_views(outcome)
    assert [(l.start, l.end, l.segment_ids) for l in views[0].links] == [(2, 8, ["S1"]), (22, 28, ["S2"])]
    assert views[0].segment_ids == ["S1", "S2"] and views[2].links == []
    html = findings_html(views)
    assert ('<p>A <a href="segment:S1">lesion</a> and a second <a href="segment:S2">lesion</a> in the liver.</p>'
            in html)
    assert '<p>The <a href="segment:S3">liver</a> is large.</p>' in html and "<p>No [SEG] here.</p>" in html
    assert "<p>Cut short. [a very long phrase]</p>" in html
    assert segment_of_link("segment:S3") == "S3" and segment_of_link("https://example.org") is None


# ---- (5) the environment -------------------------------------------------------------------------
def test_env_create_dry_run_prints_the_exact_pins_and_commands(tmp_path, capsys):
    from biomedseg.cli import main
    from biomedseg.cli.environments import CHECK_CODE, PTH_CODE, engine_root

    prefix = tmp_path / "ub"
    assert main(["env", "create", "unibiomed", "--dry-run", "--prefix", str(prefix), "--python", sys.executable]) == 0
    out = capsys.readouterr().out.splitlines()
    py = str(prefix / "bin" / "python")
    pip = [py, "-m", "pip", "install", "--disable-pip-version-check"]
    pins = ["torch==2.3.1", "torchvision==0.18.1", "transformers==4.44.2", "tokenizers==0.19.1", "accelerate==1.3.0",
            "peft==0.14.0", "timm==1.0.9", "einops==0.8.0", "hydra-core==1.3.2", "omegaconf==2.3.0",
            "sentencepiece==0.2.0", "safetensors==0.5.2", "huggingface_hub==0.27.1", "numpy==1.26.4", "pillow==10.4.0"]
    assert out[1:2 + len(pins)] == ["pins:"] + [f"  {p}" for p in pins]
    commands = [line.strip() for line in out if line.startswith("     ")]
    assert commands == [shlex.join(c) for c in [
        [sys.executable, "-m", "venv", str(prefix)],
        pip + ["--index-url", "https://download.pytorch.org/whl/cu121", "torch==2.3.1", "torchvision==0.18.1"],
        pip + pins[2:] + ["scipy", "psutil", "jsonschema", "nibabel", "SimpleITK", "pynrrd"],
        pip + ["packaging", "ninja", "wheel"],
        pip + ["--no-build-isolation", "flash-attn==2.7.3"],
        [py, "-c", PTH_CODE, str(engine_root())],
        [py, "-c", CHECK_CODE, json.dumps(pins)]]]
    steps = [line for line in out if line[:5].strip().rstrip(".").isdigit()]
    assert [("(optional" in s) for s in steps] == [False, False, False, True, True, False, False]
    assert not prefix.exists()  # nothing ran


def test_env_steps_run_optional_failures_are_reported_and_the_record_is_kept(tmp_path, monkeypatch):
    from biomedseg.catalog import environment_python, environment_record
    from biomedseg.cli.environments import CHECK_CODE, EnvPlan, EnvStep, run_plan

    monkeypatch.setenv("BIOMEDSEG_CACHE", str(tmp_path / "cache"))
    pins = [f"numpy=={np.__version__.split('+')[0]}"]
    plan = EnvPlan("demo", "unibiomed", tmp_path / "env", sys.executable, pins, [
        EnvStep("works", [sys.executable, "-c", "pass"]),
        EnvStep("flash-attn (optional)", [sys.executable, "-c", "import sys; sys.exit(3)"], optional=True),
        EnvStep("check", [sys.executable, "-c", CHECK_CODE, json.dumps(pins)])])
    record = run_plan(plan, echo=lambda line: None)
    assert record["optional"] == {"flash-attn (optional)": "failed (exit 3)"} and record["check"]["mismatch"] == {}
    assert environment_record("demo")["prefix"] == str(tmp_path / "env") and environment_python("demo") == sys.executable
    plan.name, plan.steps[0].argv = "broken", [sys.executable, "-c", "import sys; sys.exit(2)"]
    with pytest.raises(DependencyMissingError, match="failed at step 1"):
        run_plan(plan, echo=lambda line: None)
    assert environment_record("broken") is None  # a half-made environment is never used


def test_env_refuses_a_python_the_pins_have_no_wheels_for(monkeypatch):
    import biomedseg.cli.environments as environments

    monkeypatch.setattr(environments, "_python_version", lambda python: "3.13")
    with pytest.raises(InputError, match="needs Python 3.10, 3.11, 3.12"):
        environments.plan_environment("unibiomed")


# ---- (6) where UniBiomed can run ------------------------------------------------------------------
def test_without_cuda_the_catalogue_says_needs_an_nvidia_gpu(monkeypatch, tmp_path, capsys):
    import biomedseg.catalog as catalog
    from biomedseg.cli import main
    from biomedseg.cli.environments import worker_python_for
    from biomedseg.panel.models import model_choices

    monkeypatch.setenv("BIOMEDSEG_CACHE", str(tmp_path))
    monkeypatch.setattr(catalog, "nvidia_gpu", lambda: (False, "this machine has no NVIDIA GPU driver"))
    state = get_model("unibiomed").state()
    assert state["state"] == "needs an NVIDIA GPU" and "nothing is downloaded" in state["detail"]
    choice = next(c for c in model_choices(states={"unibiomed": state}) if c.id == "unibiomed")
    assert not choice.enabled and choice.action is None and choice.action_before_run() is None
    assert main(["models", "unibiomed"]) == 0
    assert "state here: needs an NVIDIA GPU" in capsys.readouterr().out
    with pytest.raises(DependencyMissingError, match="needs an NVIDIA GPU"):
        worker_python_for("unibiomed")


def test_with_cuda_the_model_runs_in_its_own_environment(monkeypatch, tmp_path):
    import biomedseg.catalog as catalog
    from biomedseg.cli.environments import worker_python_for

    monkeypatch.setenv("BIOMEDSEG_CACHE", str(tmp_path))
    monkeypatch.setattr(catalog, "nvidia_gpu", lambda: (True, "an NVIDIA driver is installed"))
    entry = get_model("unibiomed")
    assert entry.state() == {"ready": False, "state": "environment to create",
                             "detail": "it runs in a Python environment of its own: run `biomedseg env create "
                                       "unibiomed`"}
    with pytest.raises(DependencyMissingError) as caught:
        worker_python_for("unibiomed")
    assert caught.value.hint == "run biomedseg env create unibiomed"
    assert worker_python_for("unibiomed", "/some/python") == "/some/python" and worker_python_for("deepbet") is None
    record = catalog.environment_record_path("unibiomed")
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"prefix": str(tmp_path / "env"), "python": sys.executable}))
    assert worker_python_for("unibiomed") == sys.executable == entry.worker_python()
    assert entry.state()["state"] in ("weights to download", "ready")  # its packages were checked there


# ---- (7) the downloaded remote code --------------------------------------------------------------
def test_remote_code_checker_reads_a_snapshot(tmp_path):
    from biomedseg.models.unibiomed.remote_code import check_snapshot

    (tmp_path / "config.json").write_text(json.dumps({"auto_map": {"AutoModel": "modeling_sa2va_chat.Sa2VAChatModel"}}))
    (tmp_path / "added_tokens.json").write_text(json.dumps({"[SEG]": 1}))
    for name in ("configuration_sa2va_chat.py", "sam2.py", "templates.py", "modeling_intern_vit.py",
                 "configuration_intern_vit.py"):
        (tmp_path / name).write_text("import torch\n")
    (tmp_path / "modeling_sa2va_chat.py").write_text(
        "import peft\ntry:\n    import flash_attn\nexcept ImportError:\n    pass\n"
        "class M:\n    def predict_forward(self, image=None, video=None, text=None, tokenizer=None):\n"
        "        for frame_idx in range(9):\n            if frame_idx < 5:\n                pass\n"
        "        return {'prediction': '', 'prediction_masks': []}\n")
    good = check_snapshot(tmp_path, ["peft"])
    assert good["problems"] == [] and good["language_frames"] == 5 and good["imports"] == ["peft", "torch"]
    (tmp_path / "sam2.py").write_text("import mmcv\n")
    (tmp_path / "added_tokens.json").write_text("{}")
    bad = check_snapshot(tmp_path, ["peft"])["problems"]
    assert bad == ["the tokenizer files do not define [SEG]",
                   "the remote code imports mmcv, which the unibiomed environment does not install"]


def test_flash_attn_is_optional_for_transformers_import_check(tmp_path):
    dmu = pytest.importorskip("transformers.dynamic_module_utils")
    from biomedseg.models.unibiomed.backend import _flash_attn_optional

    code = tmp_path / "flash_attention.py"
    code.write_text("import torch\nfrom flash_attn.bert_padding import pad_input\n")
    original = dmu.get_imports
    with _flash_attn_optional(False):
        assert dmu.get_imports(str(code)) == ["torch"]
    assert dmu.get_imports is original and "flash_attn" in dmu.get_imports(str(code))


def test_remote_code_at_the_pinned_revision_in_the_hub_cache():
    hub = pytest.importorskip("huggingface_hub")
    from biomedseg.models.unibiomed.remote_code import check_snapshot

    spec = get_model("unibiomed").weights
    hit = hub.try_to_load_from_cache(spec["repo"], "config.json", revision=spec.get("revision"))
    if not isinstance(hit, str):
        pytest.skip(f"{spec['repo']}@{spec.get('revision')} is not in the hub cache")
    from pathlib import Path

    check = check_snapshot(Path(hit).parent, get_model("unibiomed").data["requires"])
    assert check["problems"] == [], check
    assert check["language_frames"] == fr.LANGUAGE_FRAMES
