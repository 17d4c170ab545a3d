"""The exactness suite through the worker: geometry and voxels survive the process boundary.

Each image file (LPS NRRD and RAS NIfTI, written by independent libraries, for all 48 axis
permutations/flips plus an oblique grid) is read, sent to a worker process through shared
memory, segmented there by a backend that marks the patient-space sphere cut by x = 0 *using
the geometry it received*, sent back, written as .seg.nrrd and read with slicerio. The mask
must match the sphere evaluated in slicerio's geometry with zero mismatched voxels.
"""
from __future__ import annotations

import numpy as np
import pytest

from biomedseg.io import read_volume, write_segmentation
from biomedseg.segments import Segment
from biomedseg.worker.client import WorkerClient
from conftest import worker_test_models
from geometry_cases import DIRECTIONS
from test_exactness_files import (CENTRE, INPUT_WRITERS, SHAPE_IJK, choose_radius, read_seg_nrrd_slicerio,
                                  sphere_mask_ijk, truth_affine)


@pytest.fixture(scope="module")
def client():
    with worker_test_models():
        c = WorkerClient()
        yield c
        c.close()


@pytest.mark.parametrize("writer", ["nrrd_pynrrd_lps", "nifti_nibabel_ras"])
@pytest.mark.parametrize("name,direction", DIRECTIONS, ids=[n for n, _ in DIRECTIONS])
def test_sphere_through_worker_lands_on_exact_voxels(client, tmp_path, writer, name, direction):
    affine = truth_affine(direction)
    radius = choose_radius(affine, SHAPE_IJK)
    suffix, write = INPUT_WRITERS[writer]
    image = tmp_path / f"image{suffix}"
    rng = np.random.default_rng(0)
    write(image, rng.integers(0, 200, SHAPE_IJK).astype(np.uint8), affine)
    volume = read_volume(image)
    result = client.run(volume, "test-model", ["sphere"], timeout=60,
                        options={"mode": "sphere", "steps": 1, "centre": CENTRE.tolist(), "radius": radius})
    (segment,) = result.segments
    out = tmp_path / "result.seg.nrrd"
    write_segmentation(out, volume, [Segment("sphere", segment.mask)])
    ((reader, mask_ijk, ijk_to_ras),) = read_seg_nrrd_slicerio(out)
    expected = sphere_mask_ijk(ijk_to_ras, mask_ijk.shape, radius=radius)
    assert expected.any() and (~expected).any()
    assert int(np.count_nonzero(mask_ijk != expected)) == 0
    # and on the input file's own grid: the worker's result is the input-space sphere
    assert np.array_equal(np.transpose(segment.mask, (2, 1, 0)), sphere_mask_ijk(affine, SHAPE_IJK, radius=radius))
