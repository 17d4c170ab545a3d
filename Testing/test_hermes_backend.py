"""The Hermes-R backend as the engine runs it: a real worker process with a checkpoint
file, masks landing on the right voxels through the authors' resampling, and the
errors (unknown prompt, missing weights, cancel, out of memory) arriving before or
instead of heavy work.

The checkpoint is written by the test with deterministic name-keyed weights
(shared/parity/detweights.py), so no download is needed. Geometry is checked with a
stand-in network whose logits are a function of the preprocessed intensity: whatever
the real network would say, it says it about the voxels this chain hands it, so a
bright sphere defined in patient space must come back as the same sphere.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from biomedseg.errors import CancelledError, InputError, OutOfMemoryError, WeightsMissingError  # noqa: E402
from biomedseg.volume import Volume  # noqa: E402

from conftest import load_detweights, load_model_module, worker_test_models  # noqa: E402
from geometry_cases import affine, rotation  # noqa: E402

_standin = load_model_module("hermes_standin")
hermes_with, intensity_net = _standin.hermes_with, _standin.intensity_net


#: Directions (columns: RAS unit vectors of the i, j, k axes).
LPS = np.diag([-1.0, -1.0, 1.0])  # what a plain DICOM / ITK file gives
LPS_PERMUTED = np.array([[0.0, 0, -1], [-1, 0, 0], [0, -1, 0]])  # i -> P, j -> I, k -> L
OBLIQUE = rotation([1.0, 2.0, 3.0], 22.0) @ LPS_PERMUTED


# ---- fixtures -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A Hermes-R checkpoint in the authors' training format, deterministic weights."""
    detweights = load_detweights()
    from biomedseg.models.hermes.network import build_hermes_r

    net = build_hermes_r()
    detweights.fill_module(net)
    out = tmp_path_factory.mktemp("hermes") / "hermes_r_user_download.pth"
    torch.save({"epoch": 0, "model_state_dict": net.state_dict(), "ema_model_state_dict": None}, out)
    return out


@pytest.fixture(autouse=True)
def no_weights_dir(monkeypatch):
    monkeypatch.delenv("BIOMEDSEG_WEIGHTS_DIR", raising=False)


def run_backend(backend, volume, prompts, options=None, events=None, cancelled=lambda: False):
    """What the engine does around a backend instance: declared options, prompts on the grid, plan,
    and run under the engine's one out-of-memory policy. Returns the probabilities per target."""
    from biomedseg.catalog import get_model
    from biomedseg.catalog import check_options
    from biomedseg.engine.running import run_with_memory_policy
    from biomedseg.prompts import as_prompts, to_grid

    progress = (lambda *a: events.append(a)) if events is not None else (lambda *a: None)
    grid = to_grid(as_prompts(prompts), volume)
    plan = backend.plan(volume, grid, check_options("hermes", get_model("hermes").options, options))

    def runner(plan_now):
        return backend.run(volume, grid, plan_now, progress=progress, cancelled=cancelled)

    output, _ = run_with_memory_policy(runner, plan, "Hermes-R", backend.device, progress)
    return output.probabilities


# ---- (a) a real worker runs Hermes ----------------------------------------------------
def smooth_ct(shape, seed=0) -> np.ndarray:
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0, mode="wrap")
    return np.clip(field / field.std() * 350 - 200, -1024, 1500).astype(np.int16)


@pytest.mark.slow
def test_worker_runs_hermes_like_in_process(checkpoint):
    """Oblique, anisotropic CT (not 1.5 mm) through a real worker process. The trained 128^3
    window costs 15-50 s per forward pass on 2 CPU cores, so the run asks for 32^3 windows
    (4 windows, 2 passes of 2: a few seconds); everything else is the default pipeline.
    The worker's probabilities equal the same pipeline run here, on the input's own grid,
    and the masks are those probabilities thresholded at 0.5."""
    from biomedseg.models.hermes.checkpoint import load_hermes_r
    from biomedseg.models.hermes.inference import predict_on_volume
    from biomedseg.worker.client import WorkerClient

    vol = Volume(smooth_ct((14, 30, 24)), affine(OBLIQUE, (2.4, 1.9, 3.0), (12.0, -40.0, 7.5)), name="oblique ct",
                 meta={"modality": "CT"})
    prompts = ["liver", "kidney left"]  # -> AMOS-CT 9 and 6 for CT
    options = {"window": 32, "batch_size": 2}
    events = []
    # One torch thread on both sides: on a busy 2-core runner, 2 OpenMP threads that get
    # descheduled at every barrier made these small passes 10x slower (13 s vs 1.2 s).
    client = WorkerClient(env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        job = client.submit(vol, "hermes", prompts, device="cpu", weights=str(checkpoint), options=options,
                            probabilities=True, on_progress=lambda j: events.append((j.stage, j.done, j.total)))
        result = client.wait(job, timeout=240)
    finally:
        client.close()
    assert result.device == "cpu"
    windows = [(d, t) for s, d, t in events if s == "Hermes sliding window"]
    assert windows and windows[-1] == (2, 2) and all(t == 2 for _, t in windows)

    net = load_hermes_r(checkpoint, "cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected = predict_on_volume(net, vol, [9, 6], 0, window=(32, 32, 32), sw_batch_size=2)
    finally:
        torch.set_num_threads(threads)
    masks = {s.name: s.mask for s in result.segments}
    for c, prompt in enumerate(prompts):
        got = result.probabilities[prompt]
        assert got.shape == vol.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, expected[c], atol=1e-5, rtol=0)
        assert 0.02 < (expected[c] > 0.5).mean() < 0.98  # a real, non-trivial map
        assert np.array_equal(masks[prompt], got > 0.5)


# ---- (b) geometry: the sphere lands on the right voxels -------------------------------
SPHERE_CENTRE = np.array([6.0, -5.0, 4.0])  # RAS mm, off every axis so a mirror moves it
SPHERE_RADIUS = 9.0
SPHERE_HU, BACKGROUND_HU = -800, 0


def sphere_volume(direction, spacing, size_ijk) -> Volume:
    """A dark sphere in patient space, the grid centred on the origin."""
    size_ijk = np.asarray(size_ijk)
    m = affine(direction, spacing, (0, 0, 0))
    m[:3, 3] = -m[:3, :3] @ ((size_ijk - 1) / 2.0)
    grid = Volume(np.zeros(tuple(size_ijk[::-1]), np.int16), m)
    dist = np.linalg.norm(grid.ras_of_voxels() - SPHERE_CENTRE, axis=-1)
    array = np.where(dist < SPHERE_RADIUS, SPHERE_HU, BACKGROUND_HU).astype(np.int16)
    return Volume(array, m, name="sphere", meta={"modality": "CT"})


def sphere_mismatch(volume, mask) -> tuple[int, int, int]:
    """(voxels wrong away from the surface, voxels inside the sphere, band width)."""
    dist = np.linalg.norm(volume.ras_of_voxels() - SPHERE_CENTRE, axis=-1)
    band = max(float(volume.spacing.max()), 1.5)  # one voxel of the coarser of the two grids
    truth = dist < SPHERE_RADIUS
    away = np.abs(dist - SPHERE_RADIUS) > band
    return int((mask != truth)[away].sum()), int(truth.sum()), band


def intensity_threshold(volume) -> float:
    """The preprocessed value halfway between sphere and background."""
    from biomedseg.models.hermes.preprocess import preprocess_volume

    prep = preprocess_volume(volume, 0)
    return ((SPHERE_HU + BACKGROUND_HU) / 2 - prep.mean) / prep.std


GEOMETRY_CASES = {
    "lps": (LPS, (0.9, 1.3, 2.2), (44, 31, 18)),
    "lps_permuted": (LPS_PERMUTED, (0.9, 1.3, 2.2), (44, 31, 18)),
    "oblique": (OBLIQUE, (1.1, 0.8, 2.5), (36, 50, 16)),
}


@pytest.mark.parametrize("case", sorted(GEOMETRY_CASES))
def test_mask_lands_on_the_sphere_in_patient_space(case):
    vol = sphere_volume(*GEOMETRY_CASES[case])
    assert not np.allclose(vol.spacing, 1.5)
    backend = hermes_with(intensity_net(intensity_threshold(vol)))
    prob = run_backend(backend, vol, ["liver"])["liver"]
    assert prob.shape == vol.shape and prob.dtype == np.float32
    assert backend.last_run["modality_id"] == 0 and backend.last_run["window"] == (128, 128, 128)
    wrong, inside, band = sphere_mismatch(vol, prob > 0.5)
    assert inside > 500
    assert wrong == 0, f"{case}: {wrong} voxels more than {band} mm from the surface are wrong"
    # near the surface the result is a blurred sphere, not something else
    truth = np.linalg.norm(vol.ras_of_voxels() - SPHERE_CENTRE, axis=-1) < SPHERE_RADIUS
    dice = 2 * ((prob > 0.5) & truth).sum() / ((prob > 0.5).sum() + truth.sum())
    assert dice > 0.9


@pytest.mark.slow
def test_worker_puts_the_sphere_on_the_right_voxels():
    """The same sphere check through a real worker process: the Hermes pipeline (1.5 mm
    resampling, windows, resampling back) runs there around the stand-in network, on grids
    that are neither 1.5 mm nor identity-oriented."""
    from biomedseg.worker.client import WorkerClient

    with worker_test_models():
        client = WorkerClient(env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            for case in ("lps_permuted", "oblique"):
                vol = sphere_volume(*GEOMETRY_CASES[case])
                result = client.run(vol, "hermes-standin", ["liver"], device="cpu",
                                    options={"threshold_z": intensity_threshold(vol)}, timeout=240)
                (segment,) = result.segments
                assert segment.name == "liver" and segment.mask.shape == vol.shape
                wrong, inside, band = sphere_mismatch(vol, segment.mask)
                assert inside > 500 and wrong == 0, f"{case}: {wrong} voxels more than {band} mm off the surface"
        finally:
            client.close()


@pytest.mark.parametrize("bug", ["mirror", "swap", "no_redirect_inverse"])
def test_a_mirrored_or_swapped_chain_fails_the_sphere_check(bug, monkeypatch):
    """The check above has teeth: each planted bug moves the sphere off its voxels."""
    from biomedseg.models.hermes import preprocess

    vol = sphere_volume(*GEOMETRY_CASES["lps_permuted"])
    net = intensity_net(intensity_threshold(vol), mirror=bug == "mirror", swap=bug == "swap")
    if bug == "no_redirect_inverse":
        original = preprocess.to_input_grid

        def forgetful(prob, prepared, *a, **kw):
            prepared.redirect = None  # map back as if the direction had been the identity
            return original(prob, prepared, *a, **kw)

        monkeypatch.setattr(preprocess, "to_input_grid", forgetful)
    prob = run_backend(hermes_with(net), vol, ["liver"])["liver"]
    wrong, inside, _ = sphere_mismatch(vol, prob > 0.5)
    assert wrong > 0.2 * inside


# ---- (c) errors come first, and cheaply -----------------------------------------------
def small_ct(shape=(12, 16, 14)) -> Volume:
    return Volume(smooth_ct(shape, seed=3), affine(LPS, (1.7, 1.6, 2.5), (0, 0, 0)), name="ct", meta={"modality": "CT"})


def test_unknown_prompt_is_refused_with_suggestions_before_loading(tmp_path, monkeypatch):
    from biomedseg.engine import loading, segment

    def must_not_load(*a, **kw):
        raise AssertionError("the model was loaded for a prompt it cannot do")

    monkeypatch.setattr(loading, "load_backend", must_not_load)
    monkeypatch.setattr(loading, "new_backend", must_not_load)
    with pytest.raises(InputError, match="Hermes has no task for 'livr'.*Did you mean: liver"):
        segment(small_ct(), "hermes", ["livr"], weights=str(tmp_path / "absent.pth"))
    from biomedseg.worker.client import WorkerClient

    client = WorkerClient()
    try:  # refused on the caller's side: no worker is started for it
        with pytest.raises(InputError, match="left kidney"):
            client.submit(small_ct(), "hermes", ["kidny left"])
        assert not client.alive
    finally:
        client.close()


def test_backend_checks_prompts_and_options_before_heavy_work(monkeypatch):
    from biomedseg.models.hermes import inference

    def no_heavy_work(*a, **kw):
        raise AssertionError("preprocessing started before the request was checked")

    monkeypatch.setattr(inference, "predict_on_volume", no_heavy_work)
    backend = hermes_with(intensity_net(0.0))
    for prompts, options, match in ((["tumour of the livr"], {}, "no task"),
                                     (["liver"], {"modality": "US"}, "CT, PET and MRI"),
                                     (["liver"], {"window": 40}, "multiple of 16"),
                                     (["liver"], {"batch_size": 0}, "batch_size"),
                                     (["liver"], {"engine": "fast"}, "engine"),
                                     (["liver"], {"scheme": "cubic"}, "scheme")):
        with pytest.raises(InputError, match=match):
            run_backend(backend, small_ct(), prompts, options)


def test_missing_weights_say_where_to_get_them(tmp_path, monkeypatch, checkpoint):
    from biomedseg.catalog import get_model
    from biomedseg.engine import load_backend, segment

    with pytest.raises(WeightsMissingError) as err:
        load_backend("hermes", "cpu", None)
    assert err.value.kind == "weights_missing"
    assert "Google Drive" in str(err.value) and "--weights" in str(err.value) and "no licence" in str(err.value)
    with pytest.raises(WeightsMissingError, match="not found at"):
        segment(small_ct(), "hermes", ["liver"], device="cpu", weights=str(tmp_path / "absent.pth"))
    state = get_model("hermes").state()
    assert state["state"] == "weights missing" and "yhygao/universal-medical-image-segmentation" in state["detail"]
    # the catalogue's file name in $BIOMEDSEG_WEIGHTS_DIR is found
    (tmp_path / "hermes_resunet.pth").symlink_to(checkpoint)
    monkeypatch.setenv("BIOMEDSEG_WEIGHTS_DIR", str(tmp_path))
    assert get_model("hermes").state()["ready"] is True


def test_cancel_between_windows():
    vol = small_ct()
    net = intensity_net(0.0)
    events = []

    def cancel_after_two_windows():
        return sum(1 for e in events if e[0] == "Hermes sliding window") >= 2

    with pytest.raises(CancelledError):  # window 16 -> many windows
        run_backend(hermes_with(net), vol, ["liver"], {"window": 16, "batch_size": 1}, events,
                    cancelled=cancel_after_two_windows)
    assert net.calls == 2
    totals = {t for s, _, t in events if s == "Hermes sliding window"}
    assert len(totals) == 1 and totals.pop() > 2
    net.calls = 0
    with pytest.raises(CancelledError):  # already cancelled: nothing runs
        run_backend(hermes_with(net), vol, ["liver"], cancelled=lambda: True)
    assert net.calls == 0


# ---- modality, prompts -> channels, batch size, out of memory -------------------------
def test_modality_from_option_dicom_tag_or_intensities():
    from biomedseg.models.hermes.backend import modality_from

    ct = small_ct()
    mr = Volume(np.abs(ct.array).astype(np.int16), ct.ijk_to_ras)
    assert modality_from(ct, {}) == (0, "DICOM modality CT")
    assert modality_from(ct, {"modality": "MRI-T2"}) == (3, "option")
    assert modality_from(ct, {"modality": "T1"}) == (2, "option")
    assert modality_from(ct, {"modality": 4}) == (4, "option")
    assert modality_from(Volume(ct.array, ct.ijk_to_ras, meta={"modality": "PT"}), {})[0] == 1
    assert modality_from(Volume(ct.array, ct.ijk_to_ras, meta={"modality": "MR"}), {})[0] == -1
    # the series description names the sequence: the same rules as the panel's guess
    t1 = Volume(mr.array, mr.ijk_to_ras, meta={"modality": "MR", "series_description": "T1 MPRAGE SAG"})
    assert modality_from(t1, {}) == (2, "DICOM modality MR ('T1 MPRAGE SAG')")
    flair = Volume(mr.array, mr.ijk_to_ras, meta={"modality": "MR", "series_description": "AX FLAIR"})
    mod, source = modality_from(flair, {})
    assert mod == -1 and "run as unknown MR" in source
    assert modality_from(Volume(ct.array, ct.ijk_to_ras), {}) == (0, "Hounsfield-like intensities")
    assert modality_from(mr, {})[0] == -1
    with pytest.raises(InputError, match=r"the image \(DICOM modality US\) is 'Ultrasound'"):
        modality_from(Volume(ct.array, ct.ijk_to_ras, meta={"modality": "US"}), {})


def test_prompts_map_to_channels_and_modality_picks_the_dataset():
    vol = small_ct()
    backend = hermes_with(intensity_net(0.0))
    from biomedseg.prompts import PromptSet

    def plan(prompts, options=None):
        return backend.plan(vol, PromptSet(texts=prompts, targets=prompts), options or {}).details

    details = plan(["liver", "kidneys", "left kidney", "l kidney"])
    assert details["task_ids"] == [9, 2, 6] and details["prompt_channel"] == {"liver": 0, "kidneys": 1,
                                                                              "left kidney": 2, "l kidney": 2}
    assert plan(["liver"], {"modality": "T2"})["task_ids"] == [38]  # CHAOS for MR
    assert plan(["bcv: liver"])["task_ids"] == [24]


def test_batch_size_follows_free_memory():
    from biomedseg.models.hermes.backend import auto_batch_size

    gb = 1_000_000_000
    assert auto_batch_size("cpu", free_bytes=2 * gb) == 1
    assert auto_batch_size("cpu", free_bytes=64 * gb) == 1  # CPU: more windows per pass buy nothing
    assert auto_batch_size("mps", free_bytes=64 * gb) == 2
    assert auto_batch_size("cuda:0", free_bytes=80 * gb) == 8
    assert auto_batch_size("cuda:0", free_bytes=10 * gb) == 2
    assert auto_batch_size("cuda:0", free_bytes=10 * gb, amp=False) == 1
    assert auto_batch_size("cuda", window=(64, 64, 64), free_bytes=10 * gb) == 8
    assert auto_batch_size("cpu") >= 1  # psutil's figure


def test_out_of_memory_halves_the_batch_down_to_one_then_says_what_to_try(monkeypatch):
    """The engine's one policy, automatic or chosen batch alike: free memory, halve, retry; at one
    window an OutOfMemoryError that names the batch and what to try."""
    from biomedseg.models.hermes import backend as hb

    class Greedy(torch.nn.Module):
        def __init__(self, threshold, limit=1):
            super().__init__()
            self.inner, self.limit = intensity_net(threshold), limit

        def forward(self, x, tgt_idx, mod_idx):
            if x.shape[0] > self.limit:
                raise RuntimeError("CUDA out of memory. Tried to allocate 9.00 GiB")
            return self.inner(x, tgt_idx, mod_idx)

    monkeypatch.setattr(hb, "auto_batch_size", lambda *a, **kw: 4)
    vol = small_ct()
    backend = hermes_with(Greedy(0.0))
    events = []
    out = run_backend(backend, vol, ["liver"], {"window": 16}, events)
    assert backend.last_run["batch_size"] == 1 and out["liver"].shape == vol.shape
    assert [e[0] for e in events if "out of memory" in e[0]] == [
        "out of memory: retrying with batch size 2", "out of memory: retrying with batch size 1"]
    events.clear()
    out_chosen = run_backend(backend, vol, ["liver"], {"window": 16, "batch_size": 2}, events)
    assert [e[0] for e in events if "out of memory" in e[0]] == ["out of memory: retrying with batch size 1"]
    np.testing.assert_array_equal(out_chosen["liver"], out["liver"])  # a smaller batch changes nothing
    with pytest.raises(OutOfMemoryError, match=r"1 window\(s\) of 16\^3 per pass \(after halving") as err:
        run_backend(hermes_with(Greedy(0.0, limit=0)), vol, ["liver"], {"window": 16, "batch_size": 2})
    assert "smaller slice range or ROI" in err.value.hint


def test_catalogue_lists_hermes_prompts_without_torch():
    code = ("import sys; from biomedseg.catalog import get_model; e = get_model('hermes');"
            "t = e.targets(); print(len(t), 'liver' in t, 'left kidney' in e.targets('CT', 'abdomen'),"
            "e.targets('MRI-cine') == ['left ventricle', 'myocardium', 'right ventricle'], 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["52", "True", "True", "True", "False"]


@pytest.mark.slow
def test_cli_slice_range_crops_what_hermes_sees(checkpoint, tmp_path, monkeypatch):
    """`biomedseg segment --model hermes --slice-range 2 9` is honoured: Hermes runs on those slices
    only (as if the file held just them) and nothing is written outside them."""
    import nibabel as nib

    from biomedseg.cli import main
    from biomedseg.engine import segment
    from biomedseg.geometry import crop_volume, make_region, region_box
    from biomedseg.io import read_volume, write_volume

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    vol = Volume(smooth_ct((16, 30, 24), seed=5), affine(LPS, (1.4, 1.2, 2.5), (3.0, -20.0, 11.0)), name="ct")
    src = write_volume(tmp_path / "ct.nii.gz", vol)
    out = tmp_path / "liver.nii.gz"
    args = ["segment", str(src), "--model", "hermes", "--prompt", "liver", "--weights", str(checkpoint),
            "--device", "cpu", "--slice-range", "2", "9", "--option", "window=32", "--batch-size", "2",
            "--modality", "CT", "-o", str(out), "-q"]
    rc = main(args)
    read = read_volume(src)
    box = region_box(read, make_region("axial", (2, 9)))
    assert box.shape[read.slice_orientation("axial").slice_axis] == 8
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = segment(crop_volume(read, box), "hermes", ["liver"], device="cpu", weights=str(checkpoint),
                        options={"window": 32, "batch_size": 2, "modality": "CT"})
    finally:
        torch.set_num_threads(threads)
    if not alone.segments:
        assert rc == 1  # nothing found in the crop: nothing written either way
        return
    assert rc == 0
    labels = np.transpose(np.asarray(nib.load(str(out)).dataobj), (2, 1, 0))  # (k, j, i)
    outside = np.ones(read.shape, bool)
    outside[box.slices] = False
    assert labels[outside].max() == 0
    assert np.array_equal(labels[box.slices] > 0, alone.segments[0].mask)
    assert 0 < alone.segments[0].mask.sum() < alone.segments[0].mask.size
    # a range that leaves Hermes fewer than 8 slices is refused, with the shape
    short = [a if a != "9" else "5" for a in args]
    short[short.index("-o") + 1] = str(tmp_path / "x.nii.gz")
    assert main(short) == 2
    assert not (tmp_path / "x.nii.gz").exists()
