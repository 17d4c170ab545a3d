"""BiomedCLIP in the panel (``biomedseg.panel.recognition``) through a real MRML scene, the real worker
and deterministic BiomedCLIP weights this module writes once:

1. recognise the selected volume in the background: the result lands in the panel state as the
   modality/site guess with its source; a modality the DICOM tags state wins and the disagreement
   is shown;
2. check the typed prompts against the chosen model's targets: the warning text is exactly what the
   model's check said (ratio 1.0 warns when an alternative fits better, 0.0 never), debounced,
   skipped for models without a target list;
3. rank the slices for a target: the panel jumps to the top-ranked slice and its RAS is that slice's
   centre (array indices, in any storage order); "Suggest key slice" ranks by the segment's name;
plus one worker session per volume (only the first request sends the image; the embeddings stay
cached), the Segment run slot left free, and nothing sent while BiomedCLIP is not ready.

The weights are deterministic, so the figures say nothing about accuracy; what is tested is the
plumbing from the worker's labels and report to what the panel shows.
"""
from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from biomedseg import slicer_bridge as sb  # noqa: E402
from biomedseg.errors import InputError  # noqa: E402
from biomedseg.panel import PanelController, PanelState, model_choices  # noqa: E402
from biomedseg.panel.guessing import (Guess, guess_modality_site, match_modality, match_site,  # noqa: E402
                                      modalities_for, sites_for)
from biomedseg.panel.recognition import (CLIP, Recognition, RecognitionController, merge_guess,  # noqa: E402
                                         same_modality, slice_centre)
from biomedseg.prompts import ras_to_index  # noqa: E402
from biomedseg.volume import Volume  # noqa: E402
from conftest import chest_like as conftest_chest_like  # noqa: E402
from conftest import mrml_scene  # noqa: E402
from geometry_cases import DIRECTIONS, affine  # noqa: E402

MODEL = "biomedparse-v1"  # a model with a target list per modality and site


@pytest.fixture(scope="module")
def weights(biomedclip_weights):
    return biomedclip_weights


@pytest.fixture(scope="module")
def client():
    from biomedseg.worker.client import WorkerClient

    worker = WorkerClient()
    yield worker
    worker.close()


def chest_like(direction=None) -> Volume:
    return conftest_chest_like(direction, origin=(10.0, -20.0, 30.0))


@pytest.fixture
def setup(client, weights):
    """A scene with the chest volume, the module's PanelController and a RecognitionController on it whose
    readiness is the real model list (BiomedCLIP: weights to download) plus the local weights folder."""
    with mrml_scene() as scene:
        volume = chest_like()
        node = sb.node_from_volume(scene, volume, volume.name)
        panel = PanelController(scene, client=client)
        rc = RecognitionController(panel, weights=str(weights), debounce_s=0.0)
        rc.set_choices(model_choices("cpu"))
        yield scene, volume, node, panel, rc
        rc.forget()


def state(**changes) -> PanelState:
    base = dict(model=MODEL, prompts=["liver"], modality="CT", site="abdomen", device="cpu", show_3d=False)
    base.update(changes)
    return PanelState(**base)


def one(rc, timeout=180):
    outcomes = rc.wait(timeout=timeout)
    assert len(outcomes) == 1, [o.summary for o in outcomes]
    assert outcomes[0].state == "done", outcomes[0].summary
    return outcomes[0]


def test_recognition_lands_in_the_panel_state_with_its_source_and_the_tags_win(setup, client, monkeypatch):
    import biomedseg.panel.recognition as recognition_module

    # deterministic weights spread their scores thin (about 8% each): let any answer count here;
    # the confidence rule itself is tested in test_merge_rules_without_a_worker
    monkeypatch.setattr(recognition_module, "MIN_CONFIDENCE", 0.0)
    scene, volume, node, panel, rc = setup
    assert rc.ready and rc.clip_state["state"] != "ready"  # ready through the local weights folder
    guess = guess_modality_site(volume)  # no tags: the intensity rules (CT) and no site
    assert (guess.modality, guess.modality_stated) == ("CT", False)
    assert rc.recognize(state(), node, guess)
    assert not panel.running  # the Segment run slot stays free while BiomedCLIP works
    first = one(rc)
    assert first.kind == "recognize" and first.image_sent and rc.last_job.volume is not None
    assert rc.session_of(node) in client.sessions  # the image stays in the worker
    rec = first.recognition
    assert set(rec.scores) == {"modality", "site", "view"}
    labels = {(l.target, l.name): l.score for l in first.labels}
    for family, ranked in rec.scores.items():
        assert [s for _, s in ranked] == sorted((s for _, s in ranked), reverse=True)
        assert abs(sum(s for _, s in ranked) - 1.0) < 1e-5
        assert first.report["recognized"][family] == ranked[0][0] == getattr(rec, family)
        assert all(labels[(family, name)] == score for name, score in ranked)
    (modality, p_mod), (site, p_site) = rec.best("modality"), rec.best("site")
    # into the panel state: CT from Hounsfield-like intensities is kept, BiomedCLIP's site in the
    # model's words, with the source of each
    source = f"rules: CT; BiomedCLIP: {site} {p_site:.0%}"
    assert first.panel_state.guess_source == source and first.guess.source == source
    assert first.panel_state.modality == match_modality("CT", modalities_for(MODEL))
    assert first.panel_state.prompts == ["liver"] and first.panel_state.model == MODEL
    assert first.guess.line.startswith(f"Recognised: {modality} {p_mod:.0%}, {site} {p_site:.0%}, "
                                       f"{rec.view} view {rec.best('view')[1]:.0%} (BiomedCLIP)")
    ruled = not same_modality("CT", modality)
    assert ("the intensity rules say CT, which is kept" in first.guess.line) == ruled
    assert first.summary == first.guess.line and rc.recognitions[node.GetID()] is rec

    # DICOM tags that state another modality: the tags win, both are shown; the image is not sent again
    other = "MR" if modality.split("-")[0] != "MRI" else "CT"
    tagged = guess_modality_site(volume, {"modality": other, "body_part": "CHEST"})
    assert tagged.modality_stated and tagged.site_stated
    rc.recognize(state(), node, tagged)
    second = one(rc)
    assert rc.last_job.volume is None and not second.image_sent
    assert second.report["slices_embedded"] == 0  # the embeddings stayed cached with the volume
    assert second.panel_state.modality == match_modality(tagged.modality, modalities_for(MODEL))
    site = match_site("chest", sites_for(MODEL, second.panel_state.modality))  # the body part in BiomedParse's words
    assert second.panel_state.site == site and site in ("lung", "chest")
    assert f"the DICOM tags say {tagged.modality}, which is kept" in second.guess.line
    assert second.guess.modality_from == second.guess.site_from == "DICOM tags"
    assert second.panel_state.guess_source == f"DICOM tags: {second.panel_state.modality}, {site}"


def test_merge_rules_without_a_worker():
    rec = Recognition({"modality": [("MRI", 0.62), ("CT", 0.3)], "site": [("head", 0.58), ("chest", 0.2)]})
    agree = merge_guess(MODEL, Guess("MRI-T1", "head", "", modality_stated=True), rec)
    assert (agree.modality, agree.site, agree.disagreements) == ("MRI", "brain", [])  # one family, synonyms
    assert agree.line == "Recognised: MRI 62%, head 58% (BiomedCLIP)."
    assert agree.source == "DICOM tags: MRI; BiomedCLIP: head 58%"
    rules = merge_guess(MODEL, Guess("CT", "", ""), rec)
    assert (rules.modality, rules.site, rules.source) == ("MRI", "brain", "BiomedCLIP: MRI 62%, head 58%")
    assert rules.line.endswith("(BiomedCLIP); the intensity rules said CT. Check the modality and site.")
    # CT from Hounsfield-like intensities is not overruled; a thin answer overrules nothing
    hounsfield = merge_guess(MODEL, Guess("CT", "", "Guessed from Hounsfield-like intensities."), rec)
    assert (hounsfield.modality, hounsfield.modality_from) == ("CT", "rules")
    assert hounsfield.site == match_site("head", sites_for(MODEL, "CT")) and hounsfield.site_from == "BiomedCLIP"
    assert "the intensity rules say CT, which is kept" in hounsfield.line
    thin = Recognition({"modality": [("MRI", 0.2), ("CT", 0.1)], "site": [("head", 0.3), ("chest", 0.2)]})
    kept = merge_guess(MODEL, Guess("X-Ray", "chest", "Guessed from a single grey slice."), thin)
    assert (kept.modality_from, kept.site_from) == ("rules", "rules")
    assert kept.site == match_site("chest", sites_for(MODEL, kept.modality))
    deepbet = merge_guess("deepbet", None, rec)
    assert (deepbet.modality, deepbet.site) == ("MRI-T1", "head")  # in deepbet's words


def test_prompt_warning_is_what_the_models_check_said(setup, client):
    scene, volume, node, panel, rc = setup
    rc.recognize(state(), node, guess_modality_site(volume))
    one(rc)
    prompts = ["liver", "spleen"]
    alternatives = rc.check_alternatives(state(prompts=prompts))
    assert alternatives and set(alternatives) == set(get_targets(MODEL, "CT", "abdomen"))
    assert rc.check(state(prompts=prompts), node, ratio=1.0)
    strict = one(rc)
    assert strict.kind == "check" and not strict.image_sent and rc.last_job.volume is None
    assert strict.report["slices_embedded"] == 0 and strict.alternatives == alternatives
    assert strict.warning == " ".join(strict.report["warnings"]) == rc.warning
    # with ratio 1 a prompt is flagged exactly when an alternative beats it, and those are named
    flagged = []
    for prompt in prompts:
        own = [l for l in strict.labels if l.target == prompt]
        assert own[0].name == prompt and {l.name for l in own[1:]} == set(alternatives) - {prompt}
        better = [l.name for l in own[1:] if l.score > own[0].score]
        if better:
            flagged.append(prompt)
            sentence = next(w for w in strict.warnings if w.startswith(f"'{prompt}' fits this image far less than"))
            assert all(f"'{name}'" in sentence for name in better[:3])
    assert len(strict.warnings) == len(flagged) >= 1  # deterministic weights: at least one is beaten
    assert rc.check(state(prompts=prompts), node, ratio=1.0) is False  # answered already: nothing sent
    assert rc.warning == strict.warning
    # ratio 0: never a warning; the panel's line is empty
    assert rc.check(state(prompts=prompts), node, ratio=0.0)
    assert rc.warning == ""  # the old warning does not stand for the new question
    calm = one(rc)
    assert calm.warnings == [] and calm.report["warnings"] == [] and rc.warning == ""
    assert calm.summary == f"The prompts fit this image as well as {len(alternatives)} alternatives."
    # no target list (MedSAM2), no prompt, or BiomedCLIP itself: nothing to check, the line is empty
    assert not rc.check(state(model="medsam2", modality="CT", site=""), node)
    assert not rc.check(state(prompts=[]), node) and not rc.check(state(model=CLIP), node)
    assert rc.warning == "" and not rc.busy


def get_targets(model, modality, site):
    from biomedseg.catalog import get_model

    return get_model(model).targets(modality, site)


def test_checks_are_debounced_while_typing(client, weights):
    with mrml_scene() as scene:
        node = sb.node_from_volume(scene, chest_like(), "chest")
        now = [100.0]
        rc = RecognitionController(PanelController(scene, client=client), weights=str(weights), debounce_s=0.8,
                                   clock=lambda: now[0])
        rc.set_choices(model_choices("cpu"))
        assert rc.check(state(prompts=["liv"]), node)
        now[0] += 0.5
        assert rc.check(state(prompts=["liver"]), node)  # a new key: the wait starts again
        now[0] += 0.5
        assert rc.poll() is None and not rc.lane.running and rc.pending["check"].state.prompts == ["liver"]
        now[0] += 0.4
        rc.poll()
        assert rc.lane.running and "check" not in rc.pending  # sent 0.8 s after the last change
        assert rc.last_job.prompts[0].text == "liver"
        assert one(rc).prompts == ["liver"]
        rc.forget()


def test_ranking_jumps_to_the_top_slice_at_its_centre_in_any_storage_order(client, weights):
    flipped = DIRECTIONS[1][1]  # the last axis flipped: display order differs from array order
    with mrml_scene() as scene:
        volume = chest_like(flipped)
        node = sb.node_from_volume(scene, volume, "chest")
        panel = PanelController(scene, client=client)
        rc = RecognitionController(panel, weights=str(weights), debounce_s=0.0, top=4)
        rc.set_choices(model_choices("cpu"))
        rc.recognize(state(), node)
        one(rc)
        assert rc.rank(state(prompts=["lung", "liver"]), node)  # Find slices: the first prompt
        found = one(rc)
        assert found.kind == "rank" and found.target == "lung" and found.purpose == "find"
        assert not found.image_sent and rc.last_job.volume is None
        scores = [r["score"] for r in found.ranking]
        assert len(scores) == 4 and scores == sorted(scores, reverse=True)
        assert found.ranking == found.report["ranking"]["lung"]
        assert [l.name for l in found.labels] == [f"slice {r['slice']}" for r in found.ranking]
        # the jump: the top-ranked slice, at the centre of that slice (world RAS of the node)
        assert found.slice == found.ranking[0]["slice"]
        axis = volume.slice_orientation("axial").slice_axis
        k, j, i = [(n - 1) / 2 for n in volume.shape]
        centre = [k, j, i]
        centre[axis] = found.slice
        expected = (volume.ijk_to_ras @ np.array([centre[2], centre[1], centre[0], 1.0]))[:3]
        assert np.allclose(found.ras, expected)
        index = ras_to_index(sb.grid_of(node), np.array(found.ras))
        assert abs(index[axis] - found.slice) < 1e-6 and np.allclose(np.delete(index, axis),
                                                                     np.delete([k, j, i], axis))
        assert found.summary.startswith(f"Best axial slice for 'lung': {found.slice} (score {scores[0]:.2f}); then ")
        # the slices were embedded once: recognition's are reused, a second ranking embeds none
        assert found.report["slices_embedded"] < volume.shape[axis]
        rc.suggest_key_slice(state(model="medsam2", prompts=[], modality="CT", site=""), node, "liver")
        key = one(rc)
        assert key.purpose == "key slice" and key.target == "liver" and key.report["slices_embedded"] == 0
        assert key.slice == key.ranking[0]["slice"] and key.ranking[0]["score"] == max(r["score"] for r in key.ranking)
        with pytest.raises(InputError, match="Name what the segment shows"):
            rc.suggest_key_slice(state(model="medsam2", prompts=[]), node, "")
        # another volume: its own session, and the first one's closes (the worker's session places are few)
        other = sb.node_from_volume(scene, chest_like(), "other")
        rc.recognize(state(), other)
        assert one(rc).image_sent and rc.session_of(other) in client.sessions
        assert rc.session_of(node) not in client.sessions
        rc.forget()
        assert rc.session_of(other) not in client.sessions  # scene closed: the worker forgets the image


def test_slice_centre_on_an_oblique_grid():
    from geometry_cases import OBLIQUE

    grid = Volume(np.zeros((7, 5, 9), np.uint8), affine(OBLIQUE, (1.5, 0.7, 2.0), (3, 4, 5)))
    for plane in ("axial", "coronal", "sagittal"):
        axis = grid.slice_orientation(plane).slice_axis
        ras = slice_centre(grid, plane, 2)
        index = ras_to_index(grid, ras)
        assert abs(index[axis] - 2) < 1e-9
        assert np.allclose(np.delete(index, axis), np.delete([(n - 1) / 2 for n in grid.shape], axis))


def test_nothing_runs_when_biomedclip_is_not_ready(client, weights):
    with mrml_scene() as scene:
        node = sb.node_from_volume(scene, chest_like(), "chest")
        panel = PanelController(scene, client=client)
        sessions = dict(client.sessions)
        rc = RecognitionController(panel)  # no local weights
        assert not rc.ready and "not known" in rc.why_not_ready()  # no state yet: not ready
        rc.set_states({CLIP: {"ready": False, "state": "weights to download", "detail": "from the hub"}})
        assert not rc.recognize(state(), node) and not rc.check(state(), node)
        with pytest.raises(InputError, match="BiomedCLIP is not ready here"):
            rc.rank(state(), node)
        assert not rc.busy and rc.poll() is None and rc.last_job is None and rc.lane.run is None
        assert client.sessions == sessions and rc.warning == ""
        # a local folder makes it ready, unless the packages are missing
        rc.weights = str(weights)
        assert rc.ready
        rc.set_states({CLIP: {"ready": False, "state": "dependencies missing", "detail": "install torch"}})
        assert not rc.ready and not rc.recognize(state(), node)
        rc.weights = str(weights.parent / "nothing here")
        rc.set_states({CLIP: {"ready": False, "state": "weights to download", "detail": ""}})
        assert not rc.ready
        rc.set_choices([c for c in model_choices("cpu") if c.id != CLIP])
        assert rc.clip_state is None and not rc.ready


class _Widget:
    """A stand-in for a Qt widget as PythonQt shows it: properties as attributes, string-signal connect."""

    def __init__(self):
        self.text = self.toolTip = self.styleSheet = self.currentText = ""
        self.visible = self.enabled = True
        self.currentData = None
        self.handlers = {}

    def connect(self, signal, handler):
        self.handlers.setdefault(signal.split("(")[0], []).append(handler)

    def emit(self, signal, *args):
        for handler in self.handlers.get(signal, []):
            handler(*args)


class _Timer:
    def __init__(self):
        self.active = False

    def setInterval(self, ms):
        pass

    def connect(self, signal, handler):
        pass

    def start(self):
        self.active = True

    def stop(self):
        self.active = False

    def isActive(self):
        return self.active


def test_the_slicer_mixin_shows_the_line_and_the_warning_and_jumps(setup, monkeypatch):
    """BiomedSegLib/recognize.py on stand-ins for PythonQt's widgets, QTimer and slicer.util / the markups
    logic (Slicer's own are not importable here): the real controller, worker and MRML scene behind it."""
    import sys
    import time
    import types
    from pathlib import Path

    scene, volume, node, panel, rc = setup
    jumps, status = [], []
    monkeypatch.setitem(sys.modules, "qt", types.SimpleNamespace(QTimer=_Timer))
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "BiomedSeg"))
    monkeypatch.delitem(sys.modules, "BiomedSegLib.recognize", raising=False)
    logic = types.SimpleNamespace(JumpSlicesToLocation=lambda *ras: jumps.append(ras))
    monkeypatch.setattr(slicer, "util", types.SimpleNamespace(showStatusMessage=lambda text, ms=0: status.append(text),
                                                              setSliceViewerLayers=lambda **kw: None), raising=False)
    monkeypatch.setattr(slicer, "modules", types.SimpleNamespace(markups=types.SimpleNamespace(logic=lambda: logic)),
                        raising=False)
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    from BiomedSegLib.recognize import RecognizeSection

    monkeypatch.delitem(sys.modules, "BiomedSegLib.recognize")  # imported with the stand-in qt: not for others
    w = RecognizeSection()
    names = ["findSlicesButton", "suggestKeySliceButton", "promptsLineEdit", "modalityComboBox", "siteComboBox",
             "modelComboBox", "inputVolumeSelector", "recognizedLabel", "promptWarningLabel",
             "correctSegmentComboBox", "correctStatusLabel", "statusLabel"]
    w.ui = types.SimpleNamespace(**{n: _Widget() for n in names})
    w.ui.promptsLineEdit.text, w.ui.modalityComboBox.currentText, w.ui.siteComboBox.currentText = \
        "liver, spleen", "CT", "abdomen"
    p = types.SimpleNamespace(inputVolume=node, modality="CT", site="abdomen")
    w.logic, w._parameterNode, w._choices = types.SimpleNamespace(controller=panel), p, model_choices("cpu")
    w.panelState = lambda: state(modality=p.modality, site=p.site)
    w.showModelView = lambda modalities=False: None
    w.showMessage = lambda message: pytest.fail(message.text)
    w.addObserver = lambda *args: None
    w.setupRecognizeSection()
    w.recognizer.weights, w.recognizer.debounce_s, w.recognizer.ratio = rc.weights, 0.0, 1.0
    assert not w.ui.recognizedLabel.visible and not w.ui.promptWarningLabel.visible

    def run_timer():  # what the QTimer does in Slicer: poll until nothing runs or waits
        seen = []
        while w._recognizeTimer.isActive():
            seen.append(w.onRecognizeTimer())
            time.sleep(0.01)
        return [o for o in seen if o is not None]

    guess = guess_modality_site(volume)
    w.recognizeVolume(node, guess)
    assert w.ui.recognizedLabel.text == "Recognising the image with BiomedCLIP\u2026" and w.ui.findSlicesButton.enabled
    done = run_timer()
    recognized = next(o for o in done if o.kind == "recognize")
    assert w.ui.recognizedLabel.visible and w.ui.recognizedLabel.text == recognized.guess.line
    assert (p.modality, p.site) == (recognized.panel_state.modality, recognized.panel_state.site)
    checked = [o for o in done if o.kind == "check"][-1]
    assert checked.warning and w.ui.promptWarningLabel.visible
    assert w.ui.promptWarningLabel.text == "\u26a0 " + checked.warning
    w.ui.promptsLineEdit.text = ""
    w.ui.promptsLineEdit.emit("textChanged", "")
    assert not w.ui.promptWarningLabel.visible and not w.ui.findSlicesButton.enabled  # hidden when empty
    w.ui.promptsLineEdit.text = "lung"
    w.ui.findSlicesButton.emit("clicked", True)
    found = next(o for o in run_timer() if o.kind == "rank")
    assert jumps == [found.ras + (True,)] and status[-1] == found.summary == w.ui.statusLabel.text
    w.ui.suggestKeySliceButton.emit("clicked", True)  # a new segment: the first prompt names it
    key = next(o for o in run_timer() if o.kind == "rank")
    assert key.purpose == "key slice" and w.ui.correctStatusLabel.text == key.summary + " Draw the box there (D)."
    assert jumps[-1] == key.ras + (True,)
    w.ui.inputVolumeSelector.emit("currentNodeChanged", None)
    assert not w.ui.recognizedLabel.visible
    w.onRecognizeSceneClose()
    w.closeRecognition()
