"""Hermes-R on a CT-sized volume: BiomedSeg's sliding window against a naive per-window loop.

The input is a synthetic CT (int16 Hounsfield units: air, body, lungs, bone, noise) of
512x512x300 voxels at 0.8 x 0.8 x 1.5 mm, run through the authors' preprocessing
(1.5 mm, CT window, z-score), 128^3 windows with stride 64, and back onto the input
grid. Weights are the deterministic name-keyed ones (shared/parity/detweights.py), so
the numbers are about speed, not segmentation quality. Two ways to run the windows:

  engine  -- BiomedSeg (``hermes.inference.sliding_window_probabilities``): distinct windows
             only, ``--batch`` windows per forward pass (default: what the backend picks
             from free memory, but at least 2), float16 autocast on CUDA, stitching on the host
  naive   -- what a plain script does (the authors' loop): every window of their grid,
             repeats included, one at a time, float32, accumulators on the device

Both share the same preprocessing and resampling back, which are timed once and added
to each whole-volume time. A 128^3 window takes tens of seconds on a small CPU, so
``--windows N`` times only the first N windows of each way and extrapolates the rest
from the measured rate (said so in the output), and ``--size`` scales the volume.
When every window runs, the two results are compared. ``--repeat R`` alternates R
timed runs of each way and keeps the best, which matters on shared machines.

Prints windows/s, whole-volume times and, last, ``speedup_vs_naive: X`` (naive
whole-volume time / engine whole-volume time).
Usage: python bench/hermes.py [--device auto|cpu|cuda] [--size 1.0] [--windows N] [--batch B] [--repeat R]
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import time

import numpy as np

from common import load_detweights  # noqa: E402  (also puts the engine on sys.path)

from biomedseg.errors import CancelledError  # noqa: E402
from biomedseg.volume import Volume  # noqa: E402

#: AMOS-CT liver, spleen, right and left kidney: a typical abdominal request.
TASKS = [9, 4, 5, 6]


def synthetic_ct(shape_kji, spacing_ijk, seed=0) -> Volume:
    """Air around an elliptic body (soft tissue), two lungs, a bony ring, a spine; noise."""
    k, j, i = shape_kji
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:j, 0:i].astype(np.float32)
    y = (y - j / 2) / (j / 2)
    x = (x - i / 2) / (i / 2)
    body = (x / 0.85) ** 2 + (y / 0.65) ** 2 < 1
    ring = body & ((x / 0.8) ** 2 + (y / 0.6) ** 2 > 1)
    lungs = (((np.abs(x) - 0.35) / 0.25) ** 2 + ((y + 0.05) / 0.35) ** 2) < 1
    spine = (x / 0.08) ** 2 + ((y - 0.45) / 0.08) ** 2 < 1
    plane = np.full((j, i), -1000, np.int16)
    plane[body] = 40
    plane[ring | spine] = 700
    out = np.empty((k, j, i), np.int16)
    for z in range(k):
        lung_here = lungs if z < 0.6 * k else np.zeros_like(lungs)
        sl = plane.copy()
        sl[lung_here] = -850
        out[z] = sl + rng.normal(0, 20, (j, i)).astype(np.int16)
    affine = np.diag([-spacing_ijk[0], -spacing_ijk[1], spacing_ijk[2], 1.0])  # LPS-stored, as DICOM gives it
    return Volume(out, affine, name="synthetic CT", meta={"modality": "CT"})


def sync(torch, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_engine(torch, net, image, tgt, mod, batch, limit, device):
    """BiomedSeg's stitching; stops (by its own cancel hook) after ``limit`` forward passes."""
    from biomedseg.models.hermes.inference import sliding_window_probabilities

    marks = []

    def progress(stage, done, total):
        sync(torch, device)
        marks.append((time.perf_counter(), done, total))

    start = time.perf_counter()
    try:
        prob = sliding_window_probabilities(net, image, tgt, mod, sw_batch_size=batch, progress=progress,
                                            cancelled=lambda: bool(limit) and len(marks) >= limit,
                                            accumulate_device=torch.device("cpu"))
    except CancelledError:
        prob = None
    sync(torch, device)
    return prob, start, marks


def run_naive(torch, net, image, tgt, mod, limit, device):
    """The authors' loop: every window of their grid (repeats too), one at a time, float32."""
    from biomedseg.models.hermes.inference import window_grid

    b, _, *shape = image.shape
    acc = torch.zeros((b, tgt.shape[1], *shape), device=device)
    count = torch.zeros((b, 1, *shape), device=device)
    windows = window_grid(shape)
    if limit:
        windows = windows[:limit]
    start = time.perf_counter()
    with torch.no_grad():
        for (d0, d1), (h0, h1), (w0, w1) in windows:
            logits, _ = net(image[:, :, d0:d1, h0:h1, w0:w1], tgt, mod)
            acc[:, :, d0:d1, h0:h1, w0:w1] += torch.sigmoid(logits)
            count[:, :, d0:d1, h0:h1, w0:w1] += 1
    out = acc / count
    sync(torch, device)
    return out.cpu(), time.perf_counter() - start, len(windows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--size", type=float, default=1.0, help="scale of the 512x512x300 volume (0.5 = 256x256x150)")
    parser.add_argument("--spacing", type=float, nargs=3, default=[0.8, 0.8, 1.5], help="i j k in mm")
    parser.add_argument("--windows", type=int, default=0,
                        help="time only the first N windows of each way and extrapolate (0 = all)")
    parser.add_argument("--batch", type=int, default=0,
                        help="engine windows per pass (0 = what the backend picks from free memory, at least 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up passes per way")
    parser.add_argument("--repeat", type=int, default=1, help="timed runs of each way, alternating; the best counts")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from biomedseg.runtime.device import resolve_device
    from biomedseg.models.hermes.backend import auto_batch_size
    from biomedseg.models.hermes.inference import WINDOW, _autocast, end_pad, unique_windows, window_grid
    from biomedseg.models.hermes.network import build_hermes_r
    from biomedseg.models.hermes.preprocess import preprocess_volume, to_input_grid

    device_name, reason = resolve_device(args.device)
    device = torch.device(device_name)
    shape = tuple(max(16, round(n * args.size)) for n in (300, 512, 512))
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPU cores, python "
          f"{platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print(f"device: {device_name} ({reason})")
    if device.type == "cuda":
        print(f"gpu: {torch.cuda.get_device_name(device)}")

    t = time.perf_counter()
    volume = synthetic_ct(shape, args.spacing)
    print(f"volume: (k,j,i)={shape} int16, spacing {tuple(args.spacing)} mm, made in {time.perf_counter() - t:.1f} s")

    net = build_hermes_r()
    load_detweights().fill_module(net)
    net = net.to(device).eval()

    t = time.perf_counter()
    prepared = preprocess_volume(volume, 0)
    t_prep = time.perf_counter() - t
    image = torch.from_numpy(prepared.array)[None, None].to(device)
    padded_shape = tuple(end_pad(image)[0].shape[2:])
    n_unique = len(unique_windows(padded_shape))
    n_grid = len(window_grid(padded_shape))
    print(f"network grid: {tuple(prepared.array.shape)} at 1.5 mm; windows of {WINDOW[0]}^3: {n_unique} distinct, "
          f"{n_grid} in the authors' loop; preprocessing {t_prep:.1f} s")

    tgt = torch.tensor([TASKS + [-1]], device=device)
    mod = torch.tensor([[0]], device=device)
    batch = args.batch or max(2, auto_batch_size(device_name))  # this benchmark is about batching: >= 2
    limit_windows = min(args.windows, n_unique) if args.windows else 0
    passes = math.ceil(limit_windows / batch) if limit_windows else 0
    amp = "float16 autocast" if device.type == "cuda" else "float32"
    warmup = args.warmup
    print(f"engine: {batch} windows per pass, {amp}; naive: 1 window per pass, float32; warm-up passes: {warmup}")

    window = end_pad(image)[0][:, :, :128, :128, :128]
    for _ in range(warmup):
        with torch.no_grad():
            with _autocast(device, None):
                net(window.repeat(batch, 1, 1, 1, 1), tgt.repeat(batch, 1), mod.repeat(batch, 1))
            net(window, tgt, mod)
        sync(torch, device)

    # ---- engine and naive, alternating so both see the same machine load ---------------
    def peak_note():
        if device.type != "cuda":
            return ""
        return f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"

    engine_s = naive_s = math.inf
    for r in range(args.repeat):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        prob, start, marks = run_engine(torch, net, image, tgt, mod, batch, passes, device)
        engine_windows = min(len(marks) * batch, n_unique)
        engine_s = min(engine_s, marks[-1][0] - start)
        print(f"engine, run {r + 1}: {engine_windows} windows in {marks[-1][0] - start:.1f} s{peak_note()}")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        naive_prob, seconds, naive_windows = run_naive(torch, net, image, tgt, mod, limit_windows, device)
        naive_s = min(naive_s, seconds)
        print(f"naive,  run {r + 1}: {naive_windows} windows in {seconds:.1f} s{peak_note()}")
    engine_rate = engine_windows / engine_s
    naive_rate = naive_windows / naive_s
    best = f"best of {args.repeat}" if args.repeat > 1 else "one run"
    print(f"engine: measured {engine_windows} windows in {engine_s:.1f} s ({best}) = {engine_rate:.3f} windows/s")
    print(f"naive:  measured {naive_windows} windows in {naive_s:.1f} s ({best}) = {naive_rate:.3f} windows/s")

    # ---- back onto the input grid (shared by both) ----------------------------------------
    if prob is not None:
        maps = prob[0, :len(TASKS)].numpy()
    else:  # windows were left out: time the same resampling on maps of the right shape
        maps = np.zeros((len(TASKS),) + prepared.array.shape, np.float32)
    t = time.perf_counter()
    to_input_grid(maps, prepared)
    t_post = time.perf_counter() - t
    print(f"resampling {len(TASKS)} maps back to the input grid: {t_post:.1f} s")

    if prob is not None and not limit_windows:
        diff = float((prob - naive_prob[:, :, :prob.shape[2], :prob.shape[3], :prob.shape[4]]).abs().max())
        print(f"max |engine - naive| probability: {diff:.2e}")

    full = not limit_windows or (engine_windows >= n_unique and naive_windows >= n_grid)
    engine_total = t_prep + t_post + (engine_s if engine_windows >= n_unique else n_unique / engine_rate)
    naive_total = t_prep + t_post + (naive_s if naive_windows >= n_grid else n_grid / naive_rate)
    how = "measured" if full else (f"extrapolated from {engine_windows} engine and {naive_windows} naive windows "
                                   f"to {n_unique} and {n_grid}")
    print(f"whole volume ({how}; preprocessing and resampling back measured): "
          f"engine {engine_total:.1f} s, naive {naive_total:.1f} s")
    print(f"window throughput ratio (engine / naive windows/s): {engine_rate / naive_rate:.2f}")
    print(f"speedup_vs_naive: {naive_total / engine_total:.2f}")


if __name__ == "__main__":
    main()
