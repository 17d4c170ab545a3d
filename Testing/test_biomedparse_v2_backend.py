"""BiomedParse v2's engine side, exactly, without its 4.5 GB checkpoint.

The backend's own code (intensity rule, display orientation, the authors' resize, slice packing
with the edge rule, batches, feature cache, existence gating, slice NMS, the way back) runs around
a stand-in for ``V2Inference`` (Testing/worker_models/biomedparse_v2_standin) whose answers are
simple functions of the packed (slice, previous, next) channels. Every expected voxel and score
is computed here from the geometry alone: which slice is inferior, posterior or left is read from
the voxels' RAS coordinates, not from ``SliceOrientation``.

(1) every storage order (48) and an oblique grid through the worker: zero wrong voxels;
(2) the neighbours and the edge rule in every plane, and a single slice;
(3) a target absent on every slice is reported with kind "existence", its score and threshold,
    and not written; the slice NMS; per-slice existence in the report;
(4) a re-prompt re-runs only the decoder; (5) the seed; (6) CLI, catalogue and panel.
"""
from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from biomedseg.catalog import MODELS_DIR, get_model
from biomedseg.errors import InputError
from biomedseg.prompts import PromptSet
from biomedseg.volume import Volume
from conftest import WORKER_MODELS, load_model_module, standin_registered, worker_client
from geometry_cases import affine, reoriented, rotation

STANDIN = "biomedparse-v2-standin"
LPS = np.diag([-1.0, -1.0, 1.0])
SPACING = (0.8, 0.9, 2.5)  # i, j, k
#: Bright (1000 HU) or dark (-1000 HU) per (axial slice k, band of 8 rows j); slice 2 is dark, so the
#: slices next to it see a dark neighbour and the stand-in's existence head says "absent" there.
CODE = np.array([[1, 1, 0, 1, 0, 1, 1, 0, 1, 0, 0, 1, 1, 1, 0, 1],
                 [1, 0, 1, 1, 0, 0, 1, 1, 1, 0, 1, 0, 1, 1, 0, 0],
                 [0] * 16,
                 [1, 1, 1, 0, 0, 1, 0, 1, 1, 1, 0, 0, 1, 0, 1, 1],
                 [0, 1, 1, 1, 1, 0, 0, 1, 0, 1, 1, 0, 1, 0, 0, 1]], bool)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def bands_volume() -> Volume:
    """(5, 128, 128) LPS CT whose voxels depend on the slice and the row band only."""
    bright = np.repeat(CODE, 8, axis=1)[:, :, None].repeat(128, axis=2)
    return Volume(np.where(bright, 1000, -1000).astype(np.int16), affine(LPS, SPACING, (10.0, -20.0, 30.0)),
                  name="bands")


def display_order(volume: Volume, axis: int, normal: int, sign: float) -> np.ndarray:
    """Array indices along ``axis`` sorted from the negative to the positive end of the patient ``normal``
    (RAS component ``normal``, ``sign`` -1 for a normal pointing to -RAS): display slice order."""
    ras = volume.ras_of_voxels()
    centre = [slice(None) if a == axis else 0 for a in range(3)]
    return np.argsort(sign * ras[tuple(centre)][:, normal], kind="stable")


def neighbours(order: np.ndarray) -> tuple[dict, dict]:
    """previous / next array index of each array index, in display order, with the authors' edge rule."""
    n = len(order)
    prev, nxt = {}, {}
    for d, idx in enumerate(order):
        prev[idx] = order[d - 1] if d > 0 else order[min(1, n - 1)]
        nxt[idx] = order[d + 1] if d < n - 1 else order[max(n - 2, 0)]
    return prev, nxt


def expected_bands(volume: Volume) -> tuple[dict, list]:
    """Masks of 'target', 'right' and 'geometry' and the per-slice existence of 'target' on ``bands_volume``."""
    bright = volume.array > 0
    prev, nxt = neighbours(display_order(volume, 0, 2, 1.0))  # axial: slices from inferior to superior
    target = np.zeros_like(bright)
    existence = []
    for k in range(volume.shape[0]):
        present = bool(bright[prev[k]].any())
        existence.append(sigmoid(3.0 if present else -3.0))
        target[k] = bright[k] & bright[prev[k]] & ~bright[nxt[k]] & present
    x = volume.ras_of_voxels()[..., 0].round(6)  # patient right = larger R
    columns = np.unique(x)
    right, left = x >= columns[-16], x <= columns[15]
    shown = np.asarray([s > 0.5 for s in existence])[:, None, None]
    return {"target": target, "right": right, "geometry": target | (left & shown)}, existence


@pytest.fixture(scope="module")
def standin():
    with standin_registered(STANDIN):
        yield


@pytest.fixture(scope="module")
def client(standin):
    with worker_client() as c:
        yield c


def storages():
    base = bands_volume()
    cases = [(f"perm{''.join(map(str, p))}_flip{''.join('1' if f else '0' for f in fl)}", *reoriented(base, p, fl))
             for p in itertools.permutations(range(3)) for fl in itertools.product((False, True), repeat=3)]
    tilted = Volume(base.array, affine(rotation([1.0, 2.0, 3.0], 12.0) @ LPS, SPACING, (10.0, -20.0, 30.0)),
                    name="oblique")
    assert tilted.slice_orientation("axial") == base.slice_orientation("axial")  # the same slices, tilted
    return cases + [("oblique", tilted, lambda a: a)]


STORAGES = storages()
assert len(STORAGES) == 49


# ---- (1) every storage order and an oblique grid, through the worker ---------------------------
@pytest.mark.parametrize("case", range(len(STORAGES)), ids=[c[0] for c in STORAGES])
def test_every_storage_order_lands_on_the_right_voxels(client, case):
    name, volume, back = STORAGES[case]
    expected, existence = expected_bands(bands_volume())
    assert expected["target"].any() and (~expected["target"]).any() and not all(e > 0.5 for e in existence)
    assert expected["right"][:, :, :16].all() and not expected["right"][:, :, 16:].any()  # LPS: i runs to the left
    result = client.run(volume, STANDIN, ["geometry"], timeout=60)
    (segment,) = result.segments
    wrong = int(np.count_nonzero(back(segment.mask) != expected["geometry"]))
    assert wrong == 0, f"{name}: {wrong} wrong voxels"
    # the per-slice existence list runs along the storage's slice axis, in its array order
    along = result.report["existence_slices"]
    axis = "kji".index(along["axis"])
    scores = np.asarray(result.report["existence"]["geometry"])
    shape = [1, 1, 1]
    shape[axis] = len(scores)
    per_voxel = back(np.broadcast_to(scores.reshape(shape), volume.shape))
    np.testing.assert_allclose(per_voxel[:, 0, 0], existence, atol=1e-5, err_msg=name)
    assert result.report["seed"] == 0 and result.report["slice_batch_size"] == 4


def _planted(bug: str, network):
    """(name, function): a network function with one bug a geometry or neighbour check must catch."""
    pack, resize = network.pack, network.resize

    def swapped(resized, start, stop):
        return pack(resized, start, stop)[:, [0, 2, 1]]

    def repeated_edges(resized, start, stop):
        out = pack(resized, start, stop).clone()
        if start == 0:
            out[0, 1] = out[0, 0]
        if stop == resized.shape[0]:
            out[-1, 2] = out[-1, 0]
        return out

    def mirrored(slices):
        return resize(np.ascontiguousarray(slices[:, ::-1]))

    def transposed(slices):
        return resize(np.ascontiguousarray(np.transpose(slices, (0, 2, 1))))

    def reversed_slices(slices):
        return resize(np.ascontiguousarray(slices[::-1]))

    return {"swapped_neighbours": ("pack", swapped), "repeated_edges": ("pack", repeated_edges),
            "mirrored_rows": ("resize", mirrored), "transposed": ("resize", transposed),
            "reversed_slices": ("resize", reversed_slices)}[bug]


@pytest.mark.parametrize("bug", ["swapped_neighbours", "repeated_edges", "mirrored_rows", "transposed",
                                 "reversed_slices"])
def test_the_voxel_check_has_teeth(backend, monkeypatch, bug):
    """Each planted bug (in the packing or the presentation) moves voxels the check above counts."""
    volume = bands_volume()
    expected = expected_bands(volume)[0]["geometry"]
    assert np.array_equal(run_backend(backend, volume, ["geometry"], cache=False).probabilities["geometry"] > 0.5,
                          expected)
    name, planted = _planted(bug, backend.network)
    monkeypatch.setattr(backend.network, name, planted)
    out = run_backend(backend, volume, ["geometry"], cache=False)
    got = out.probabilities["geometry"] > 0.5 if "geometry" in out.probabilities else np.zeros_like(expected)
    assert np.count_nonzero(got != expected) > 1000, bug


# ---- (2) neighbours and the edge rule in every plane ------------------------------------------
PLANES = {"axial": (0, 2, 1.0), "coronal": (1, 1, 1.0), "sagittal": (2, 0, 1.0)}  # array axis, RAS normal


def slab_volume(axis: int, code) -> Volume:
    """(6, 7, 8) LPS CT whose slices along ``axis`` are each all bright or all dark, per ``code``."""
    shape = (6, 7, 8)
    values = np.asarray(code, bool)[: shape[axis]]
    view = [1, 1, 1]
    view[axis] = shape[axis]
    bright = np.broadcast_to(values.reshape(view), shape)
    return Volume(np.where(bright, 1000, -1000).astype(np.int16), affine(LPS, SPACING))


def run_backend(backend, volume, prompts, plane="axial", **options):
    plan = backend.plan(volume, PromptSet(texts=list(prompts), targets=list(prompts)), options, plane=plane)
    return backend.run(volume, PromptSet(texts=list(prompts), targets=list(prompts)), plan,
                       progress=lambda *a: None, cancelled=lambda: False)


@pytest.fixture(scope="module")
def backend():
    module = load_model_module("biomedparse_v2_standin")
    b = module.StandInV2Backend("cpu")
    b.load(None)
    return b


@pytest.mark.parametrize("plane", list(PLANES))
def test_each_slice_sees_its_patient_neighbours_with_the_authors_edge_rule(backend, plane):
    axis, normal, sign = PLANES[plane]
    code = [1, 0, 0, 1, 1, 0, 1, 0]
    volume = slab_volume(axis, code)
    order = display_order(volume, axis, normal, sign)
    prev, nxt = neighbours(order)
    bright = [bool(code[i]) for i in range(volume.shape[axis])]
    # the code tells the rules apart: swapped neighbours, repeating the edge slice or a dark pad would differ
    edge_first, edge_last = order[0], order[-1]
    assert bright[prev[edge_first]] != bright[edge_first] and bright[nxt[edge_last]] != bright[edge_last]
    assert any(bright[prev[i]] != bright[nxt[i]] for i in order[1:-1])
    for prompt, source in (("previous", prev), ("current", {i: i for i in order}), ("next", nxt)):
        out = run_backend(backend, volume, [prompt], plane=plane)
        wanted = [sigmoid(3.0 if bright[source[i]] else -3.0) for i in range(volume.shape[axis])]
        np.testing.assert_allclose(out.report["existence"][prompt], wanted, atol=1e-5, err_msg=f"{plane} {prompt}")
        assert out.report["existence_slices"]["axis"] == "kji"[axis]
        mask = out.probabilities[prompt] > 0.5
        for i in range(volume.shape[axis]):
            assert np.take(mask, i, axis=axis).all() == bright[source[i]], (plane, prompt, i)
            assert np.take(mask, i, axis=axis).any() == bright[source[i]], (plane, prompt, i)


@pytest.mark.parametrize("plane", list(PLANES))
def test_a_slice_range_packs_its_edge_slices_with_their_true_neighbours(standin, plane):
    """Through the engine: the slices of a --slice-range get the existence and masks they get in a run on the
    whole image (their outer neighbours come from the image); only the image's own edges use the authors' rule."""
    from biomedseg.geometry import make_region

    axis = PLANES[plane][0]
    volume = slab_volume(axis, [1, 0, 0, 1, 1, 0, 1, 0])
    whole = segment(volume, ["previous", "next"], options={"cache": False}, region=make_region(plane))
    region = make_region(plane, (1, 3))  # array indices along the plane's axis, inside the image
    part = segment(volume, ["previous", "next"], options={"cache": False}, region=region)
    inside = [slice(None)] * 3
    inside[axis] = slice(1, 4)
    for prompt in ("previous", "next"):
        assert part.report["existence"][prompt] == whole.report["existence"][prompt][1:4], (plane, prompt)
        got = next((s.mask for s in part.segments if s.name == prompt), np.zeros(volume.shape, bool))
        want = next((s.mask for s in whole.segments if s.name == prompt), np.zeros(volume.shape, bool))
        assert np.array_equal(got[tuple(inside)], want[tuple(inside)]), (plane, prompt)
        assert not np.delete(got, [1, 2, 3], axis=axis).any()  # nothing written outside the range
    assert part.report["context_slices"] == 2


def test_a_single_slice_is_its_own_neighbour(backend):
    array = np.full((1, 12, 12), 1000, np.int16)
    array[0, 0, 0] = -1000  # air somewhere, so the window's min-max is not a constant
    volume = Volume(array, affine(LPS, SPACING), meta={"modality": "CT"})
    out = run_backend(backend, volume, ["previous", "next", "current"])  # NMS keeps the best of three
    assert all(out.report["existence"][p] == [round(sigmoid(3.0), 5)] for p in ("previous", "next", "current"))


# ---- (3) existence, absence and the slice NMS, through the engine -----------------------------
def segment(volume, prompts, **kwargs):
    from biomedseg.engine import segment as engine_segment

    return engine_segment(volume, STANDIN, prompts, device="cpu", **kwargs)


def test_a_target_the_existence_head_rejects_everywhere_is_reported_and_not_written(standin):
    volume = bands_volume()
    expected, existence = expected_bands(volume)
    result = segment(volume, ["target", "absent", "twin"], keep_probabilities=True)
    assert [s.name for s in result.segments] == ["target"]
    assert np.array_equal(result.segments[0].mask, expected["target"])
    assert set(result.absent) == {"absent", "twin"}
    absent = result.absent_details["absent"]
    assert absent.kind == "existence" and absent.cutoff == 0.5 and absent.value == pytest.approx(sigmoid(-3.0))
    assert "existence head" in absent.reason and "absent" not in result.probabilities
    twin = result.absent_details["twin"]  # present by its score, but its mask is target's: the NMS drops it
    assert twin.kind == "model" and "NMS" in twin.reason and twin.value == pytest.approx(sigmoid(2.0))
    report = result.report
    assert report["existence"]["absent"] == [round(sigmoid(-3.0), 5)] * 5
    np.testing.assert_allclose(report["existence"]["target"], existence, atol=1e-5)
    assert report["postprocess"].startswith("slice NMS") and report["existence_threshold"] == 0.5
    assert report["kept_slices"]["target"] == int(expected["target"].any(axis=(1, 2)).sum())
    # a stricter threshold: target too is not found, with its best score
    strict = segment(volume, ["target"], options={"existence_threshold": 0.96})
    assert strict.segments == [] and strict.absent_details["target"].kind == "existence"
    assert strict.absent_details["target"].value == pytest.approx(sigmoid(3.0)) and "0.96" in strict.absent_reasons["target"]


# ---- (4) a re-prompt re-runs only the decoder; (5) the seed -----------------------------------
def test_a_new_prompt_on_the_same_volume_only_decodes_and_the_seed_repeats_a_result(standin):
    from biomedseg.engine import loading

    volume = bands_volume()
    first = segment(volume, ["target"], keep_probabilities=True)
    backend = loading.warm_backend(STANDIN, "cpu", None)
    encodes, decodes = backend.encode_calls, backend.decode_calls
    again = segment(volume, ["target"], keep_probabilities=True)
    other = segment(volume, ["right", "target"], keep_probabilities=True)
    assert backend.encode_calls == encodes and backend.decode_calls == decodes + 4  # 2 batches per run
    assert again.report["cache"].startswith("reused") and other.report["encoded_slices"] == 0
    assert np.array_equal(again.probabilities["target"], first.probabilities["target"])  # cached = fresh
    seeded = segment(volume, ["target"], keep_probabilities=True, options={"seed": 1})
    assert seeded.report["seed"] == 1 and first.report["seed"] == 0
    assert not np.array_equal(seeded.probabilities["target"], first.probabilities["target"])
    assert np.array_equal(seeded.segments[0].mask, first.segments[0].mask)  # the draws nudge, never decide
    uncached = segment(volume, ["target"], keep_probabilities=True, options={"cache": False})
    assert np.array_equal(uncached.probabilities["target"], first.probabilities["target"])
    assert backend.encode_calls == encodes + 2
    # the features depend on the intensity rule: another rule encodes again
    segment(volume, ["target"], options={"ct_window": "v1"})
    assert backend.encode_calls == encodes + 4


# ---- plan: modality, site and intensity rule, before any weights ------------------------------
def plan_of(volume, options=None):
    from biomedseg.models.biomedparse_v2.backend import BiomedParseV2Backend

    return BiomedParseV2Backend("cpu").plan(volume, PromptSet(texts=["liver"], targets=["liver"]),
                                            dict(options or {}))


def test_plan_picks_the_window_by_site_and_says_which_rule_ran():
    ct = bands_volume()
    chest = Volume(ct.array, ct.ijk_to_ras, meta={"modality": "CT", "body_part": "CHEST"})
    plan = plan_of(chest)
    assert plan.report["site"] == "lung" and plan.report["window"] == [-910.0, 590.0]
    assert plan.report["site_source"] == "DICOM body part 'CHEST'" and "W1500/L-160" in plan.report["intensity_rule"]
    v1 = plan_of(chest, {"ct_window": "v1"})
    assert v1.report["window"] == [-1000.0, 1000.0] and "v1's CT window for lung" in v1.report["intensity_rule"]
    assert plan_of(ct).report["window"] == [-160.0, 240.0] and plan_of(ct).report["site_source"] == "default"
    assert plan_of(ct, {"site": "head"}).report["window"] == [0.0, 80.0]
    with pytest.raises(InputError, match="no CT window for site 'knee'"):
        plan_of(ct, {"site": "knee"})
    mr = Volume(np.linspace(0, 900, 6 * 7 * 8).reshape(6, 7, 8).astype(np.float32), affine(LPS, SPACING),
                meta={"modality": "MR"})
    plan = plan_of(mr)
    lo, hi = np.percentile(mr.array[mr.array > 0], [0.5, 99.5])
    assert plan.report["modality"] == "MRI" and plan.report["intensity_window"] == pytest.approx([lo, hi])
    assert "percentiles" in plan.report["intensity_rule"]
    us = Volume(np.arange(6 * 7 * 8).reshape(6, 7, 8).astype(np.uint8), affine(LPS, SPACING), meta={"modality": "US"})
    assert plan_of(us).report["intensity_bounds"] is None and "as is" in plan_of(us).report["intensity_rule"]
    pet = Volume(mr.array, mr.ijk_to_ras, meta={"modality": "PT"})
    assert plan_of(pet).report["modality"] == "PET"
    with pytest.raises(InputError, match="BiomedParse v1"):
        plan_of(Volume(mr.array, mr.ijk_to_ras, meta={"modality": "CR"}))
    assert plan_of(ct, {"batch_size": 2}).batch_size == 2 and plan_of(ct).batch_size == 4
    with pytest.raises(InputError, match="disagree"):
        plan_of(ct, {"batch_size": 2, "slice_batch_size": 3})


# ---- (6) the catalogue, the CLI and the panel -------------------------------------------------
def test_catalogue_entry_and_the_standin_declare_the_same_options():
    entry = get_model("biomedparse-v2")
    assert entry.weights["repo"] == "microsoft/BiomedParse" and entry.weights["files"] == ["biomedparse_v2.ckpt"]
    assert entry.weights["gated"] and entry.weights["sha256"] is None and entry.weights["license"] == "CC-BY-NC-SA-4.0"
    assert {"existence_threshold", "seed", "slice_batch_size", "batch_size", "cache", "modality", "site"} <= set(
        entry.options)
    standin = json.loads((WORKER_MODELS / "biomedparse_v2_standin" / "model.json").read_text())
    real = json.loads((MODELS_DIR / "biomedparse_v2" / "model.json").read_text())
    assert standin["options"] == real["options"] and standin["modalities"] == real["modalities"]


def test_cli_checks_prompts_and_modality_then_refuses_gated_weights_offline(tmp_path, monkeypatch, capsys):
    import nibabel as nib

    from biomedseg.cli import main

    for name in ("BIOMEDSEG_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.delenv("BIOMEDSEG_WEIGHTS_DIR", raising=False)
    image = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.transpose(bands_volume().array, (2, 1, 0)), np.diag([0.8, 0.9, 2.5, 1.0])), str(image))
    out = str(tmp_path / "out.seg.nrrd")
    base = ["segment", str(image), "--model", "biomedparse-v2", "-o", out, "--in-process"]
    assert main(base + ["--prompt", "livr"]) == 2
    assert "has no target 'livr'" in capsys.readouterr().err
    assert main(base + ["--prompt", "liver", "--modality", "X-Ray"]) == 2
    assert "X-Ray" in capsys.readouterr().err
    assert main(base + ["--prompt", "liver"]) == 3
    err = capsys.readouterr().err
    assert "biomedparse_v2.ckpt" in err and "gated" in err and "huggingface.co/microsoft/BiomedParse" in err
    assert not (tmp_path / "out.seg.nrrd").exists()
    assert main(["models", "biomedparse-v2"]) == 0
    text = capsys.readouterr().out
    assert "BiomedParse v2" in text and "CC-BY-NC-SA-4.0" in text and "existence_threshold" in text


def test_panel_builds_a_request_for_v2():
    from biomedseg.panel import PanelState, build_request

    request = build_request(PanelState(model="biomedparse-v2", prompts=["liver", "spleen"], modality="CT",
                                       site="abdomen", options={"seed": 3}), bands_volume())
    assert request.model == "biomedparse-v2" and request.kwargs["options"]["seed"] == 3
    with pytest.raises(InputError, match="has no target"):
        build_request(PanelState(model="biomedparse-v2", prompts=["livr"]), bands_volume())
