"""Probability maps as a volume (issue 14 item 8): the .nrrd file, the panel's soft-map overlay.

The file is read back with pynrrd (a third-party reader) and compared bit for bit with the maps
written, and its geometry with the labelmap ``write_segmentation`` writes for the same reference
(axis-aligned and oblique). A stand-in model whose maps are soft (a logistic fall-off around
spheres, written into tmp_path) runs through ``engine.segment`` and through the panel controller
with a real worker and real MRML nodes (slicer-core): thresholding the maps gives exactly the
masks the engine wrote (no post-processing), and a second run reuses the overlay nodes.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

import nrrd

from biomedseg.errors import InputError
from biomedseg.io import read_volume, write_segmentation
from biomedseg.io.probabilities import VALUE, read_probabilities, write_probabilities
from biomedseg.prompts import BoxPrompt, TextPrompt
from biomedseg.volume import Volume
from conftest import registered_models
from geometry_cases import OBLIQUE, affine, rotation

TOYS = Path(__file__).parent / "toy_models"
SHAPE = (9, 11, 13)  # (k, j, i)
REFERENCES = {
    "axis-aligned LPS": affine(np.diag([-1.0, -1.0, 1.0]), (0.7, 0.8, 2.5), (101.2, 150.9, -220.4)),
    "oblique": affine(OBLIQUE, (0.6, 1.3, 2.2), (-17.123, 44.456, -9.789)),
}
TARGETS = ["core", "shell", "faint"]

SOFT_MODEL = {
    "id": "test-soft-maps", "version": "0", "family": "test", "title": "Soft maps around spheres (tests only)",
    "task": "Each target: a logistic fall-off around a sphere at the volume's centre; 'faint' stays below 0.4.",
    "input": "3d", "prompt_kind": "text", "modalities": ["any"], "backend": "backend:SoftMaps", "requires": [],
    "devices": ["cpu"], "prompt_types": ["text"], "results": ["masks"],
    "postprocess": {"keep_largest": False, "fill_holes": False},
    "options": {"width": {"type": "number", "help": "mm of the fall-off", "min": 0, "default": 1.5}},
    "weights": {"source": "package", "package": "numpy", "files": ["numpy/__init__.py"], "license": "MIT",
                "gated": False},
}
SOFT_BACKEND = '''
import numpy as np
from biomedseg.models.base import Backend, Plan
from biomedseg.results import ModelOutput


def soft_maps(volume, targets, width):
    ras = volume.ras_of_voxels()
    distance = np.linalg.norm(ras - ras.reshape(-1, 3).mean(axis=0), axis=-1)
    out = {}
    for n, target in enumerate(targets):
        p = 1.0 / (1.0 + np.exp((distance - (4.0 + 2.0 * n)) / width))
        out[target] = (0.4 * p if target == "faint" else p).astype(np.float32)
    return out


class SoftMaps(Backend):
    def load(self, context):
        pass

    def plan(self, volume, prompts, options, *, plane="axial"):
        return Plan(batch_size=1, units="volume", details=dict(options))

    def run(self, volume, prompts, plan, *, progress, cancelled):
        progress("mapping", 1, 1)
        return ModelOutput(soft_maps(volume, prompts.targets, plan.details["width"]))
'''


@pytest.fixture(scope="module")
def soft_model(tmp_path_factory):
    """The soft stand-in (and the labels-only toy) registered here and in the workers started meanwhile."""
    folder = tmp_path_factory.mktemp("soft_model") / "soft_maps"
    folder.mkdir()
    (folder / "model.json").write_text(json.dumps(SOFT_MODEL))
    (folder / "backend.py").write_text(SOFT_BACKEND)
    with registered_models(os.pathsep.join([str(folder), str(TOYS / "box_labels")])):
        yield "test-soft-maps"


def reference_volume(kind: str, seed: int = 0) -> Volume:
    rng = np.random.default_rng(seed)
    return Volume(rng.integers(-1000, 1000, SHAPE).astype(np.int16), REFERENCES[kind], name="CT")


def random_maps(n: int, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    maps = {}
    for name in TARGETS[:n]:
        p = rng.random(SHAPE, dtype=np.float32)
        p.flat[:3] = [0.0, 1.0, np.float32(np.nextafter(np.float32(0.5), np.float32(1)))]  # edges, last bit
        maps[name] = p
    return maps


def labelmap_header(tmp_path: Path, reference: Volume) -> dict:
    """The header of the .nrrd labelmap the engine writes for ``reference`` (the geometry to match)."""
    mask = np.zeros(reference.shape, bool)
    mask[2:5, 3:7, 4:9] = True
    (path,) = [p for p in write_segmentation(tmp_path / "labels.nrrd", reference, {"x": mask})
               if p.name == "labels.nrrd"]
    return nrrd.read_header(str(path))


# ---- the file --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(REFERENCES))
@pytest.mark.parametrize("n", [1, 3])
def test_maps_read_back_bit_exact_on_the_labelmaps_geometry(tmp_path, kind, n):
    reference = reference_volume(kind)
    maps = random_maps(n)
    out = write_probabilities(tmp_path / "p.nrrd", reference, maps, 0.35, model_id="test-soft-maps")
    assert out == tmp_path / "p.nrrd"
    data, header = nrrd.read(str(out), index_order="F")
    labels = labelmap_header(tmp_path, reference)
    assert data.dtype == np.float32 and header["type"] == "float"
    assert header["space"] == labels["space"] == "left-posterior-superior"
    assert np.array_equal(header["space origin"], labels["space origin"])
    if n == 1:
        assert header["kinds"] == ["domain"] * 3 and data.shape == SHAPE[::-1]
        assert np.array_equal(header["space directions"], labels["space directions"])
        assert np.array_equal(np.transpose(data, (2, 1, 0)), maps["core"])
        assert read_volume(out).same_grid(reference, atol=1e-12)  # the engine's own reader places it too
    else:
        assert header["kinds"] == ["list", "domain", "domain", "domain"] and data.shape == (3,) + SHAPE[::-1]
        assert np.all(np.isnan(header["space directions"][0]))
        assert np.array_equal(header["space directions"][1:], labels["space directions"])
        for index, name in enumerate(TARGETS):
            assert header[f"component{index}_name"] == name
            assert np.array_equal(np.transpose(data[index], (2, 1, 0)), maps[name])
    assert json.loads(header["targets"]) == TARGETS[:n]
    assert float(header["threshold"]) == 0.35 and header["model"] == "test-soft-maps" and header["value"] == VALUE
    back, threshold = read_probabilities(out)
    assert threshold == 0.35 and list(back) == TARGETS[:n]
    assert all(back[t].dtype == np.float32 and np.array_equal(back[t], maps[t]) for t in maps)


def test_refusals_and_atomic_replace(tmp_path, monkeypatch):
    reference, maps = reference_volume("oblique"), random_maps(1)
    for name in ("p.nii.gz", "p.seg.nrrd", "p.nhdr", "p"):
        with pytest.raises(InputError, match="written as .nrrd"):
            write_probabilities(tmp_path / name, reference, maps, 0.5)
    with pytest.raises(InputError, match="no probability maps"):
        write_probabilities(tmp_path / "p.nrrd", reference, {}, 0.5)
    with pytest.raises(InputError, match="shape"):
        write_probabilities(tmp_path / "p.nrrd", reference, {"core": maps["core"][1:]}, 0.5)
    with pytest.raises(InputError, match="Threshold"):
        write_probabilities(tmp_path / "p.nrrd", reference, maps, 1.0)
    assert list(tmp_path.iterdir()) == []
    path = write_probabilities(tmp_path / "p.nrrd", reference, maps, 0.5)
    before = path.read_bytes()
    with pytest.raises(InputError, match="already exists"):
        write_probabilities(path, reference, random_maps(1, seed=9), 0.5)
    assert path.read_bytes() == before
    monkeypatch.setattr(nrrd, "write", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left")))
    with pytest.raises(InputError, match="disk is full"):
        write_probabilities(path, reference, random_maps(1, seed=9), 0.5, overwrite=True)
    monkeypatch.undo()
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["p.nrrd"]  # no partial file
    write_probabilities(path, reference, random_maps(1, seed=9), 0.5, overwrite=True)
    assert np.array_equal(read_probabilities(path)[0]["core"], random_maps(1, seed=9)["core"])


def test_engine_maps_thresholded_are_the_masks_it_wrote(tmp_path, soft_model):
    from biomedseg.engine import segment

    reference = reference_volume("oblique")
    result = segment(reference, soft_model, [TextPrompt(t) for t in TARGETS], device="cpu", threshold=0.45,
                     keep_largest=False, fill_holes=False, keep_probabilities=True)
    assert [s.name for s in result.segments] == ["core", "shell"] and result.absent == ["faint"]
    assert list(result.probabilities) == TARGETS  # 'faint' found nothing above 0.45, yet its map is kept
    path = write_probabilities(tmp_path / "p.nrrd", reference, result.probabilities, 0.45, model_id=soft_model)
    maps, threshold = read_probabilities(path)
    assert threshold == 0.45
    soft = (maps["core"] > 0.05) & (maps["core"] < 0.95)
    assert soft.sum() > 50  # really soft: many voxels in between
    for seg in result.segments:
        assert np.array_equal(maps[seg.name] > threshold, seg.mask), seg.name
    assert not (maps["faint"] > threshold).any() and maps["faint"].max() > 0.3
    # a model that returns labels only has no maps: nothing to write
    centre = reference.ras_of_voxels().reshape(-1, 3).mean(axis=0)
    box = BoxPrompt(tuple(centre - 3), tuple(centre + 3), None, "cube")
    labels_only = segment(reference, "toy-box-labels", [box], device="cpu", keep_probabilities=True)
    assert labels_only.probabilities == {} and labels_only.labels
    with pytest.raises(InputError, match="no probability maps"):
        write_probabilities(tmp_path / "labels.nrrd", reference, labels_only.probabilities, 0.5)


# ---- the panel's overlay ---------------------------------------------------------------------------------

slicer = pytest.importorskip("slicer")

from biomedseg import panel  # noqa: E402
from biomedseg import slicer_bridge as sb  # noqa: E402
from biomedseg.slicer_bridge.probability_maps import PROBABILITY_ATTRIBUTE, band_colors  # noqa: E402
from conftest import mrml_scene  # noqa: E402


@pytest.fixture
def scene():
    with mrml_scene() as s:
        yield s


def colour_of(table, index) -> list[float]:
    rgba = [0.0] * 4
    table.GetColor(index, rgba)
    return rgba


def assert_overlay(node, reference_node, probability, threshold):
    assert node.GetClassName() == "vtkMRMLScalarVolumeNode"
    # world RAS (a node keeps spacing, directions and origin apart: equal to rounding)
    assert np.allclose(sb.grid_of(node).ijk_to_ras, sb.grid_of(reference_node).ijk_to_ras, rtol=0, atol=1e-9)
    assert sb.grid_of(node).shape == sb.grid_of(reference_node).shape
    shown = sb.volume_from_node(node)
    assert shown.array.dtype == np.float32 and np.array_equal(shown.array, probability)
    display = node.GetDisplayNode()
    table = display.GetColorNode()
    assert table is not None and table.GetClassName() == "vtkMRMLColorTableNode"
    assert table.GetNumberOfColors() == 256 and not display.GetAutoWindowLevel()
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == (0.0, 1.0)
    at = int(round(threshold * 255))
    assert colour_of(table, 0)[3] == 0.0 and colour_of(table, at)[3] > 0.8  # far below: clear; at it: bright
    assert colour_of(table, at)[1] > 0.9 and colour_of(table, 255)[3] < colour_of(table, at)[3]
    assert float(node.GetAttribute("BiomedSeg.threshold")) == threshold


def test_band_colours_light_the_threshold_band_only():
    colours = band_colors(0.4)
    v = np.linspace(0, 1, 256)
    far_below = v < 0.4 - 0.25
    assert np.all(colours[far_below, 3] == 0) and np.all(colours[np.abs(v - 0.4) < 0.1, 3] > 0.5)
    assert np.argmax(colours[:, 3]) == int(np.argmin(np.abs(v - 0.4))) and np.all(colours[v > 0.65, 3] > 0)


def test_overlay_node_on_the_reference_grid_and_reused(scene):
    reference = reference_volume("oblique")
    ref_node = sb.node_from_volume(scene, reference, "CT")
    transform = slicer.vtkMRMLLinearTransformNode()  # a moved image: the map goes where the image is shown
    scene.AddNode(transform)
    transform.SetMatrixTransformToParent(sb.numpy_to_matrix(affine(rotation((0, 1, 1), 40.0), (1, 1, 1), (3.0, -2.0, 7.5))))
    ref_node.SetAndObserveTransformNodeID(transform.GetID())
    composite = slicer.vtkMRMLSliceCompositeNode()
    scene.AddNode(composite)
    mine = sb.node_from_volume(scene, Volume(np.zeros(SHAPE, np.float32), np.eye(4)), "core probability")
    first = random_maps(1)["core"]
    node = sb.show_probability_map(scene, ref_node, "core", first, 0.3)
    assert node.GetName() == "core probability" and node.GetAttribute(PROBABILITY_ATTRIBUTE) == "core"
    assert node.GetID() != mine.GetID() and not sb.volume_from_node(mine).array.any()  # a person's node: untouched
    assert node.GetParentTransformNode() is None
    assert_overlay(node, ref_node, first, 0.3)
    assert composite.GetForegroundVolumeID() == node.GetID()
    n_nodes = scene.GetNumberOfNodes()
    second = random_maps(1, seed=5)["core"]
    again = sb.show_probability_map(scene, ref_node, "core", second, 0.6)
    assert again.GetID() == node.GetID() and scene.GetNumberOfNodes() == n_nodes  # no pile-up
    assert_overlay(again, ref_node, second, 0.6)
    with pytest.raises(InputError, match="shape"):
        sb.show_probability_map(scene, ref_node, "core", second[:, 1:], 0.6)


def drive(controller, timeout=60.0):
    deadline = time.monotonic() + timeout
    while True:
        result = controller.poll()
        if result.finished:
            return result.outcome
        assert time.monotonic() < deadline, "run did not finish"
        time.sleep(0.02)


def test_panel_asks_for_maps_and_shows_each_target(scene, soft_model):
    from biomedseg.engine import segment
    from biomedseg.panel.request import build_request
    from biomedseg.worker.client import WorkerClient

    reference = reference_volume("oblique")
    ref_node = sb.node_from_volume(scene, reference, "CT")
    state = panel.PanelState(model=soft_model, prompts=list(TARGETS), threshold=0.45, postprocess="none",
                             show_3d=False, show_probabilities=True)
    assert build_request(state, reference).kwargs["probabilities"] is True
    assert build_request(panel.PanelState(model=soft_model, prompts=["core"]), reference).kwargs["probabilities"] is False
    expected = segment(reference, soft_model, [TextPrompt(t) for t in TARGETS], device="cpu",
                       keep_probabilities=True).probabilities
    client = WorkerClient()
    try:
        controller = panel.PanelController(scene, client=client)
        controller.start(state, ref_node)
        outcome = drive(controller)
        assert outcome.state == "done" and outcome.names == ["core", "shell"] and outcome.absent == ["faint"]
        nodes = controller.probability_nodes
        assert list(nodes) == TARGETS and [n.GetName() for n in nodes.values()] == [f"{t} probability" for t in TARGETS]
        for target, node in nodes.items():
            assert_overlay(node, ref_node, expected[target], 0.45)  # bit for bit through the worker
        seg_node = outcome.segmentation_node
        for info in sb.segments_of(seg_node):
            assert np.array_equal(sb.segment_mask(seg_node, info["id"], ref_node), expected[info["name"]] > 0.45)
        ids, n_nodes = [n.GetID() for n in nodes.values()], scene.GetNumberOfNodes()
        controller.start(state, ref_node, seg_node)  # again, into the same segmentation: overlays reused
        assert drive(controller).state == "done"
        assert [n.GetID() for n in controller.probability_nodes.values()] == ids
        assert scene.GetNumberOfNodes() == n_nodes
        composites = [scene.GetNodesByClass("vtkMRMLSliceCompositeNode").GetItemAsObject(i) for i in
                      range(scene.GetNodesByClass("vtkMRMLSliceCompositeNode").GetNumberOfItems())]
        if not composites:  # a bare scene has no slice views: give it one, as Slicer's layout would
            composites = [scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")]
            controller.start(state, ref_node, seg_node)
            assert drive(controller).state == "done"
        # the first target's map is over the image; the others wait in the scene
        assert {c.GetForegroundVolumeID() for c in composites} == {controller.probability_nodes[TARGETS[0]].GetID()}
        controller.start(panel.PanelState(model=soft_model, prompts=["core"], show_3d=False), ref_node, seg_node)
        assert drive(controller).state == "done" and controller.probability_nodes == {}
        assert {c.GetForegroundVolumeID() for c in composites} == {None}  # unticked: no old map over the result
    finally:
        client.close()
