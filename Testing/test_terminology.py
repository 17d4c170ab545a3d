"""Every recommended target of every bundled model gets a real code and its own colour.

The targets are listed from the catalogue (BiomedParse v1's model-card list, Hermes' task
concepts, deepbet's brain), never by hand; the codes are checked for form (SNOMED CT
identifiers carry a Verhoeff check digit), the colours for clashes, the sides for their
modifiers, and the codes for surviving a .seg.nrrd, a labelmap table and a DICOM SEG.
"""
from __future__ import annotations

import itertools
import json
import math
import re
import shutil
import subprocess

import numpy as np
import pytest
import slicerio

from biomedseg.catalog import MODELS_DIR, load_catalog
from biomedseg.io import write_segmentation
from biomedseg.models.hermes import tasks as hermes_tasks
from biomedseg.segments import _terminology_table, canonical_target, prepare_segments, terminology_for
from biomedseg.volume import Volume

TISSUE = ("SCT", "85756007")
LEFT, RIGHT = ["SCT", "7771000", "Left"], ["SCT", "24028007", "Right"]
#: Codes outside SNOMED CT, on purpose: no SNOMED CT code for these is in Slicer's or DICOM's lists.
NON_SNOMED = {("DCM", "112001"), ("NCIt", "C113842"), ("FMA", "77664"), ("FMA", "15052")}
CODE_KEYS = ("category", "type", "typeModifier", "anatomicRegion", "anatomicRegionModifier")

# ---- SNOMED CT identifiers: Verhoeff check digit and partition --------------------------------

_D = [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 0, 6, 7, 8, 9, 5], [2, 3, 4, 0, 1, 7, 8, 9, 5, 6],
      [3, 4, 0, 1, 2, 8, 9, 5, 6, 7], [4, 0, 1, 2, 3, 9, 5, 6, 7, 8], [5, 9, 8, 7, 6, 0, 4, 3, 2, 1],
      [6, 5, 9, 8, 7, 1, 0, 4, 3, 2], [7, 6, 5, 9, 8, 2, 1, 0, 4, 3], [8, 7, 6, 5, 9, 3, 2, 1, 0, 4],
      [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]]
_P = [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 5, 7, 6, 2, 8, 3, 0, 9, 4], [5, 8, 0, 3, 7, 9, 6, 1, 4, 2],
      [8, 9, 1, 6, 0, 4, 3, 5, 2, 7], [9, 4, 5, 3, 1, 2, 6, 8, 7, 0], [4, 2, 8, 6, 5, 7, 3, 9, 0, 1],
      [2, 7, 9, 3, 8, 0, 6, 4, 1, 5], [7, 0, 4, 6, 9, 1, 3, 2, 5, 8]]


def is_sctid(code: str) -> bool:
    """A SNOMED CT concept id: 6-18 digits, no leading zero, concept partition (00 or 10), Verhoeff."""
    if not re.fullmatch(r"[1-9][0-9]{5,17}", code) or code[-3:-1] not in ("00", "10"):
        return False
    check = 0
    for i, digit in enumerate(reversed(code)):
        check = _D[check][_P[i % 8][int(digit)]]
    return check == 0


def test_the_check_digit_test_tells_real_ids_from_typos():
    assert all(is_sctid(c) for c in ("10200004", "7771000", "24028007", "840539006", "22945000"))
    assert not any(is_sctid(c) for c in ("10200005", "22945007", "7771001", "0102004", "1020004A"))


# ---- the catalogue's targets -------------------------------------------------------------------

def bundled_targets() -> dict[str, list[str]]:
    """{model id: recommended targets} for the models shipped in biomedseg/models."""
    out = {e.id: e.targets() for e in load_catalog() if e.folder and e.folder.parent == MODELS_DIR}
    return {k: v for k, v in out.items() if v}


TARGETS = bundled_targets()


def structure(term: dict) -> tuple:
    """What a segment is, as codes (meanings and contexts aside)."""
    return tuple(tuple(term[k][:2]) if k in term else None for k in CODE_KEYS[1:])


def rgb255(color) -> tuple[int, ...]:
    return tuple(round(c * 255) for c in color)


def test_every_target_of_every_bundled_model_has_a_real_code():
    assert {"biomedparse-v1", "hermes", "deepbet"} <= set(TARGETS)
    assert len(TARGETS["biomedparse-v1"]) == 55 and len(TARGETS["hermes"]) >= 50 and TARGETS["deepbet"] == ["brain"]
    categories = {tuple(c) for c in _terminology_table()["categories"].values()}
    for model, targets in TARGETS.items():
        for target in targets:
            found = terminology_for(target)
            assert found is not None, f"{model}: '{target}' has no terminology entry"
            term, color = found
            assert tuple(term["type"][:2]) != TISSUE, f"{model}: '{target}' fell back to Tissue"
            assert tuple(term["category"]) in categories
            assert term["contextName"] and term["anatomicContextName"]
            assert len(color) == 3 and all(0.0 <= c <= 1.0 for c in color)


def test_codes_are_well_formed_and_snomed_ids_pass_their_check_digit():
    pydicom_concepts = pytest.importorskip("pydicom.sr._concepts_dict").concepts
    table = _terminology_table()
    triples = [tuple(v) for v in table["categories"].values()] + [tuple(v) for v in table["modifiers"].values()]
    for entry in table["targets"].values():
        triples += [tuple(entry[k]) for k in ("type", "typeModifier", "anatomicRegion") if k in entry]
    outside = set()
    for scheme, code, meaning in triples:
        assert meaning.strip() and meaning == meaning.strip(), (scheme, code, meaning)
        if scheme == "SCT":
            assert is_sctid(code), f"SCT {code} ({meaning}) is not a valid SNOMED CT concept id"
            continue
        outside.add((scheme, code))
        if scheme in ("DCM", "NCIt"):  # defined in DICOM PS3.16: pydicom's copy of it knows them
            assert any(code in codes for codes in pydicom_concepts[scheme].values()), (scheme, code)
        else:
            assert scheme == "FMA" and code.isdigit(), (scheme, code)
    assert outside == NON_SNOMED


def test_known_codes_and_slicer_colours():
    """Spot checks against Slicer's General Anatomy list and the DICOM tables."""
    liver, liver_rgb = terminology_for("liver")
    assert liver["type"] == ["SCT", "10200004", "Liver"] and rgb255(liver_rgb) == (221, 130, 101)
    lung, lung_rgb = terminology_for("left lung")
    assert lung["type"][:2] == ["SCT", "39607008"] and rgb255(lung_rgb) == (197, 165, 145)
    assert terminology_for("edema")[0]["type"][:2] == ["SCT", "79654002"]
    assert rgb255(terminology_for("edema")[1]) == (140, 224, 228)
    assert terminology_for("nodule")[0]["type"][:2] == ["SCT", "27925004"]
    assert terminology_for("cyst")[0]["type"][:2] == ["SCT", "367643001"]
    assert terminology_for("polyp")[0]["type"][:2] == ["SCT", "68496003"]
    for finding in ("tumor", "kidney tumor", "COVID-19 infection", "lesion", "melanoma", "lung opacity",
                    "neoplastic polyp", "enhancing tumor", "whole tumor", "benign tumor", "viral pneumonia"):
        assert terminology_for(finding)[0]["category"] == ["SCT", "49755003", "Morphologically Altered Structure"]
    kidney_tumor = terminology_for("kidney tumor")[0]
    assert kidney_tumor["type"][:2] == ["SCT", "108369006"]
    assert kidney_tumor["anatomicRegion"][:2] == ["SCT", "64033007"]
    covid = terminology_for("COVID-19 infection")[0]
    assert covid["typeModifier"][:2] == ["SCT", "840539006"] and covid["anatomicRegion"][:2] == ["SCT", "39607008"]


def test_no_two_structures_of_one_model_share_a_colour():
    for model, targets in TARGETS.items():
        by_colour: dict[tuple, set] = {}
        for target in targets:
            term, color = terminology_for(target)
            by_colour.setdefault(rgb255(color), set()).add(structure(term))
        shared = {c: s for c, s in by_colour.items() if len(s) > 1}
        assert not shared, f"{model}: structures share colours {shared}"
        assert len(by_colour) == len(targets), f"{model}: two targets have one colour"


def test_sided_targets_carry_the_side_and_sides_look_different():
    sided = 0
    for targets in TARGETS.values():
        for target in targets:
            words = target.lower().split()
            side = "left" if "left" in words else "right" if "right" in words else None
            if side is None:
                continue
            term, color = terminology_for(target)
            code = LEFT if side == "left" else RIGHT
            if side.capitalize() in term["type"][2]:  # 'Left atrium', 'Left Ventricle': the side is the structure
                assert "typeModifier" not in term
                continue
            sided += 1
            assert term.get("typeModifier") == code or term.get("anatomicRegionModifier") == code, target
            other = target.replace(side, "right" if side == "left" else "left")
            other_term, other_color = terminology_for(other)
            assert structure(other_term)[0] == structure(term)[0]  # the same type on the other side
            assert math.dist(rgb255(color), rgb255(other_color)) >= 30, (target, other)
            both_term, both_color = terminology_for(" ".join(w for w in words if w != side))
            assert "typeModifier" not in both_term and rgb255(both_color) not in {rgb255(color), rgb255(other_color)}
    assert sided >= 30  # Hermes' head-and-neck organs, lungs, kidneys, adrenal glands


def test_synonyms_plurals_and_spellings_resolve_to_the_same_entry():
    catalogue_names = {canonical_target(t) for targets in TARGETS.values() for t in targets}
    checked = 0
    for concept, alternatives in hermes_tasks._SYNONYMS.items():
        for alt in alternatives:
            if alt in catalogue_names:  # 'prostate', 'uterus': a target of their own in BiomedParse
                assert canonical_target(alt) == alt
                continue
            assert canonical_target(alt) == canonical_target(concept), (alt, concept)
            checked += 1
    for body, alternatives in hermes_tasks._SIDED_SYNONYMS.items():
        for alt, side in itertools.product(alternatives, ("left", "right")):
            assert terminology_for(f"{side} {alt}") == terminology_for(f"{side} {body}"), (side, alt)
            checked += 1
    assert checked > 80
    for a, b in [("tumour", "tumor"), ("Tumours", "tumor"), ("kidneys", "kidney"), ("Kidney, Left", "left kidney"),
                 ("L kidney", "left kidney"), ("lungs", "lung"), ("grey matter", "gray matter"),
                 ("Liver Tumours", "liver tumor"), ("oesophagus", "esophagus"), ("left heart atrium", "left atrium")]:
        assert terminology_for(a) == terminology_for(b), (a, b)
    public, pubic = terminology_for("public symphysis"), terminology_for("pubic symphysis")
    assert public == pubic and public[0]["type"][:2] == ["SCT", "82561000"]


def test_unknown_names_still_fall_back_to_tissue():
    assert terminology_for("blob of interest") is None and canonical_target("") is None
    seg = prepare_segments({"blob of interest": np.ones((2, 2, 2), bool)}, (2, 2, 2))[0]
    assert tuple(seg.terminology["type"][:2]) == TISSUE


# ---- the codes survive the writers ------------------------------------------------------------

def small_volume() -> Volume:
    return Volume(np.zeros((4, 6, 8), np.int16), np.diag([0.8, 0.8, 2.0, 1.0]), name="ref")


def boxes(shape, names) -> dict[str, np.ndarray]:
    out = {}
    for n, name in enumerate(names):
        mask = np.zeros(shape, bool)
        mask[n % shape[0], 1:4, n:n + 2] = True
        out[name] = mask
    return out


FILE_TARGETS = ["left lung", "right lung", "kidney tumor", "COVID-19 infection", "public symphysis"]


def test_seg_nrrd_read_back_by_slicerio_carries_the_codes(tmp_path):
    volume = small_volume()
    out = tmp_path / "codes.seg.nrrd"
    write_segmentation(out, volume, boxes(volume.shape, FILE_TARGETS))
    segments = {s["name"]: s for s in slicerio.read_segmentation(str(out), skip_voxels=True)["segments"]}
    assert list(segments) == FILE_TARGETS
    for name, seg in segments.items():
        expected, color = terminology_for(name)
        got = seg["terminology"]
        for key in CODE_KEYS:
            assert (got.get(key) or None) == expected.get(key), (name, key)
        assert rgb255(seg["color"]) == rgb255(color)
    assert segments["left lung"]["terminology"]["typeModifier"] == LEFT
    assert segments["right lung"]["terminology"]["typeModifier"] == RIGHT
    assert segments["left lung"]["color"] != segments["right lung"]["color"]
    assert segments["kidney tumor"]["terminology"]["anatomicRegion"] == ["SCT", "64033007", "Kidney"]
    assert segments["public symphysis"]["terminology"]["type"][1] == "82561000"


def test_labelmap_table_carries_the_codes(tmp_path):
    volume = small_volume()
    out = tmp_path / "codes.nii.gz"
    write_segmentation(out, volume, boxes(volume.shape, FILE_TARGETS))
    labels = {row["name"]: row for row in json.loads((tmp_path / "codes.labels.json").read_text())["labels"]}
    assert labels["kidney tumor"]["terminology"]["anatomicRegion"][1] == "64033007"
    assert labels["right lung"]["terminology"]["typeModifier"] == RIGHT
    csv = (tmp_path / "codes.labels.csv").read_text()
    assert "64033007" in csv and "840539006" in csv and "108369006" in csv


def test_dicom_seg_of_a_kidney_tumor_carries_the_finding_and_its_region(tmp_path):
    pytest.importorskip("highdicom")
    get_testdata_file = pytest.importorskip("pydicom.data").get_testdata_file
    import highdicom as hd

    from biomedseg.io import read_volume

    volume = read_volume(get_testdata_file("CT_small.dcm"))
    names = ["kidney tumor", "right kidney", "enhancing tumor", "lung opacity"]
    out = tmp_path / "tumor.dcm"
    write_segmentation(out, volume, boxes(volume.shape, names))
    if shutil.which("dciodvfy"):
        run = subprocess.run(["dciodvfy", str(out)], capture_output=True, text=True, timeout=60, check=False)
        report = run.stdout + run.stderr
        assert not [ln for ln in report.splitlines() if ln.startswith("Error")], report
    items = {it.SegmentLabel: it for it in hd.seg.segread(out).SegmentSequence}
    tumor = items["kidney tumor"]
    category, kind = tumor.SegmentedPropertyCategoryCodeSequence[0], tumor.SegmentedPropertyTypeCodeSequence[0]
    region = tumor.AnatomicRegionSequence[0]
    assert (category.CodingSchemeDesignator, category.CodeValue) == ("SCT", "49755003")
    assert (kind.CodingSchemeDesignator, kind.CodeValue, kind.CodeMeaning) == ("SCT", "108369006", "Neoplasm")
    assert (region.CodingSchemeDesignator, region.CodeValue, region.CodeMeaning) == ("SCT", "64033007", "Kidney")
    side = items["right kidney"].SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0]
    assert (side.CodeValue, side.CodeMeaning) == ("24028007", "Right")
    enhancing = items["enhancing tumor"].SegmentedPropertyTypeCodeSequence[0]
    assert (enhancing.CodingSchemeDesignator, enhancing.CodeValue) == ("NCIt", "C113842")
    assert items["enhancing tumor"].AnatomicRegionSequence[0].CodeValue == "12738006"
    assert items["lung opacity"].SegmentedPropertyTypeCodeSequence[0].CodeValue == "112001"


def test_in_slicer_left_and_right_keep_their_own_colours():
    """Slicer's lists give both sides of an organ one colour; the panel takes Slicer's codes but keeps the
    catalogue's colour for a sided target, so the left and right lung stay apart in the views."""
    from types import SimpleNamespace

    from biomedseg.panel.controller import PanelController
    from biomedseg.segments import prepare_segments

    mask = np.zeros((2, 2, 2), bool)
    mask[0, 0, 0] = True
    segments = prepare_segments({"left lung": mask, "right lung": mask, "liver": mask}, mask.shape)
    slicer_colour = (0.5, 0.5, 0.5)
    controller = PanelController.__new__(PanelController)
    controller.terminology_lookup = lambda name: ({"type": ["SCT", "1", name]}, slicer_colour)
    shown = controller._segments_of(None, SimpleNamespace(segments=segments))
    colours = {s.name: s.color for s in shown}
    assert colours["left lung"] != colours["right lung"] and slicer_colour not in (colours["left lung"],
                                                                                  colours["right lung"])
    assert colours["liver"] == slicer_colour  # an unsided target takes Slicer's recommended colour
    assert shown[0].terminology == {"type": ["SCT", "1", "left lung"]}
