"""The slice-wise strategy: patient-plane slicing, exact placement back, the engine's region crop, cache."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from biomedseg.errors import CancelledError, InputError
from biomedseg.geometry import crop_for_roi, crop_volume, make_region, region_box, uncrop
from biomedseg.runtime.slicewise import FeatureCache, run_slicewise
from biomedseg.io import read_volume
from geometry_cases import reoriented


class QuadrantModel:
    """Marks the top-left quadrant of each displayed slice ('corner') and pixels above the
    slice mean ('bright'). Its answer depends on how the slice is presented, so any wrong
    transpose or flip in the engine moves the result."""

    def __init__(self):
        self.encoded = 0

    def encode(self, slices, context):
        self.encoded += len(slices)
        return {"image": torch.as_tensor(np.asarray(slices, np.float32))}

    def decode(self, features, prompts, context):
        image = features["image"]
        b, rows, cols = image.shape
        corner = torch.zeros_like(image)
        corner[:, : rows // 2, : cols // 2] = 1
        bright = (image > image.mean(dim=(1, 2), keepdim=True)).float()
        per_prompt = {"corner": corner, "bright": bright}
        return torch.stack([per_prompt[p] for p in prompts], dim=1)


@pytest.fixture(scope="module")
def chest(ct_chest_path):
    return read_volume(ct_chest_path)


def test_axial_top_left_is_anterior_right(chest):
    probs = run_slicewise(chest, QuadrantModel(), ["corner"], batch_size=7)["corner"]
    ras = chest.ras_of_voxels()
    marked, unmarked = ras[probs > 0.5], ras[probs <= 0.5]
    # axial display: top = anterior (larger y), left = patient right (larger x); this grid is
    # axis-aligned, so the marked quadrant is exactly the anterior-right quarter of each slice
    assert marked[:, 1].min() > unmarked[:, 1].min() and marked[:, 0].min() > unmarked[:, 0].min()
    y_mid, x_mid = np.median(ras[..., 1]), np.median(ras[..., 0])
    assert np.all(marked[:, 1] > y_mid) and np.all(marked[:, 0] > x_mid)
    assert len(marked) == chest.shape[0] * (chest.shape[1] // 2) * (chest.shape[2] // 2)
    assert probs.shape == chest.shape


@pytest.mark.parametrize("plane", ["axial", "coronal", "sagittal"])
@pytest.mark.parametrize("perm,flips", [((0, 1, 2), (False, False, False)), ((2, 0, 1), (True, False, True)),
                                        ((1, 2, 0), (False, True, False)), ((2, 1, 0), (True, True, True))])
def test_results_follow_patient_space_whatever_the_array_order(chest, plane, perm, flips):
    reference = run_slicewise(chest, QuadrantModel(), ["corner", "bright"], plane=plane, batch_size=5)
    vol, back = reoriented(chest, perm, flips)
    result = run_slicewise(vol, QuadrantModel(), ["corner", "bright"], plane=plane, batch_size=3)
    for prompt in ("corner", "bright"):
        assert np.array_equal(back(result[prompt]), reference[prompt]), prompt


def test_slice_range_and_roi_restrict_work_and_output(chest):
    """The engine's one crop path: region -> box -> cropped volume -> slices -> back on the full grid."""
    model = QuadrantModel()
    orient = chest.slice_orientation("axial")
    box = region_box(chest, make_region("axial", (10, 19)))
    sub = run_slicewise(crop_volume(chest, box), model, ["bright"], batch_size=4)["bright"]
    probs = uncrop(sub, box, chest.shape)
    assert model.encoded == 10
    along = np.moveaxis(probs, orient.slice_axis, 0)
    assert along[:10].max() == 0 and along[20:].max() == 0 and along[10:20].max() == 1
    # the cropped slices are the same slices: results inside the range equal a whole-volume run's
    whole = run_slicewise(chest, QuadrantModel(), ["bright"])["bright"]
    assert np.array_equal(probs[box.slices], whole[box.slices])
    ras = chest.ras_of_voxels()
    lo, hi = ras[5, 30, 40], ras[20, 80, 90]
    crop = crop_for_roi(chest, np.minimum(lo, hi), np.maximum(lo, hi))
    assert crop.start == (5, 30, 40) and crop.stop == (21, 81, 91)
    assert region_box(chest, make_region("axial", None, (lo, hi))) == crop
    cropped = crop_volume(chest, crop)
    assert np.allclose(cropped.ras_of_voxels(), ras[crop.slices])  # the crop stays where it was
    probs = uncrop(run_slicewise(cropped, QuadrantModel(), ["bright"])["bright"], crop, chest.shape)
    outside = np.ones(chest.shape, bool)
    outside[crop.slices] = False
    assert probs[outside].max() == 0 and probs[crop.slices].max() == 1
    # both: their intersection
    both = region_box(chest, make_region("axial", (10, 12), (lo, hi)))
    assert both.start == (10, 30, 40) and both.stop == (13, 81, 91)
    with pytest.raises(InputError, match="outside 0..33"):
        region_box(chest, make_region("axial", (30, 40)))
    with pytest.raises(InputError, match="do not overlap"):
        region_box(chest, make_region("axial", (0, 2), (lo, hi)))
    with pytest.raises(InputError, match="does not overlap"):
        crop_for_roi(chest, [1e4, 1e4, 1e4], [2e4, 2e4, 2e4])
    assert region_box(chest, make_region("axial", (0, chest.shape[0] - 1))) is None  # all of it: no crop


def test_reprompt_uses_cached_features(chest):
    model, cache = QuadrantModel(), FeatureCache()
    first = run_slicewise(chest, model, ["bright"], cache=cache, batch_size=8)
    assert model.encoded == chest.shape[0] and cache.misses == chest.shape[0]
    second = run_slicewise(chest, model, ["corner", "bright"], cache=cache, batch_size=8)
    assert model.encoded == chest.shape[0]  # encoder not run again
    assert cache.hits == chest.shape[0]
    assert np.array_equal(first["bright"], second["bright"])
    # another volume (edited voxels) is not served from the cache
    edited = chest.with_array(chest.array.copy())
    edited.array[0, 0, 0] += 1
    run_slicewise(edited, model, ["bright"], cache=cache)
    assert model.encoded == 2 * chest.shape[0]


def test_progress_and_cancel_between_batches(chest):
    events = []
    run_slicewise(chest, QuadrantModel(), ["bright"], batch_size=10, progress=lambda *e: events.append(e))
    assert [e[1] for e in events] == [0, 10, 20, 30, 34] and all(e[2] == 34 for e in events)
    calls = []
    with pytest.raises(CancelledError):
        run_slicewise(chest, QuadrantModel(), ["bright"], batch_size=10,
                      cancelled=lambda: calls.append(1) or len(calls) > 2)
