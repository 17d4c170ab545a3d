"""BiomedParse v1 on a CT volume: BiomedSeg's slice-wise engine against a naive per-slice loop.

The input is a synthetic abdominal CT (int16 Hounsfield units: air, body, organs, bone,
noise), LPS-stored as DICOM gives it. Weights are the deterministic name-keyed ones
(shared/parity/detweights.py) written to a temporary checkpoint, so the figures are about
speed, not segmentation quality. Two ways to segment every slice:

  naive   -- what the authors' scripts do: per slice, their CPU preprocessing (CT window,
             min-max, pad, scipy/scikit-image spline resize, uint8), one forward pass at
             batch 1 in float32 with all prompts joined in one call (their
             ``interactive_infer_image``: image encoder, text encoder, decoder), the
             probabilities un-padded back onto the slice. Nothing is kept between calls.
  engine  -- ``biomedseg.engine.segment`` with BiomedParse's backend: image features once per slice and shared by
             all prompts, each prompt decoded on its own, text embeddings cached, features
             cached for re-prompting, batches sized from free memory; on CUDA the torch
             preprocessing on the device and bfloat16/float16 autocast.

Scenarios on the same volume: one prompt (cold), three prompts (cold: the cache is
emptied first), and a re-prompt (one new prompt after the three-prompt run; the naive
loop has no cache and repeats everything). Prints slices/s and peak memory for each,
the engine's re-prompt speed-up over its own first prompt, and last
``speedup_vs_naive: X`` = naive total time / engine total time over the three scenarios.

CPU defaults are reduced so it finishes in minutes (``--size 256 --slices 4``); a GPU run
wants ``--device cuda --size 1024 --slices 64``. The p-value test is off in both ways (the
naive scripts do not run it, and random weights fail it).
Usage: python bench/biomedparse.py [--device auto|cpu|cuda] [--size S] [--slices N] [--rows R]
                                   [--no-amp] [--exact] [--repeat K]
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from common import load_detweights  # noqa: E402  (also puts the engine on sys.path)

from biomedseg.volume import Volume  # noqa: E402

FIRST = ["liver"]
THREE = ["liver", "spleen", "left kidney"]
REPROMPT = ["pancreas"]


def synthetic_ct(n_slices: int, rows: int, seed: int = 0) -> Volume:
    """An elliptic body in air with a liver-like and a spleen-like blob, kidneys, spine; noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:rows].astype(np.float32)
    y, x = (y - rows / 2) / (rows / 2), (x - rows / 2) / (rows / 2)
    out = np.empty((n_slices, rows, rows), np.int16)
    for z in range(n_slices):
        t = z / max(1, n_slices - 1)
        plane = np.full((rows, rows), -1000.0, np.float32)
        plane[(x / 0.85) ** 2 + (y / 0.65) ** 2 < 1] = 30
        plane[((x + 0.35) / (0.35 - 0.1 * t)) ** 2 + ((y + 0.1) / 0.3) ** 2 < 1] = 60  # liver (patient right)
        plane[((x - 0.5) / 0.15) ** 2 + ((y + 0.05) / 0.2) ** 2 < 1] = 50  # spleen
        for side in (-0.25, 0.25):
            plane[((x - side) / 0.09) ** 2 + ((y - 0.3) / 0.12) ** 2 < 1] = 35  # kidneys
        plane[(x / 0.07) ** 2 + ((y - 0.45) / 0.07) ** 2 < 1] = 700  # spine
        out[z] = (plane + rng.normal(0, 15, plane.shape)).astype(np.int16)
    affine = np.diag([-0.75 * 512 / rows, -0.75 * 512 / rows, 2.5, 1.0])
    return Volume(out, affine, name="synthetic CT", meta={"modality": "CT", "body_part": "ABDOMEN"})


class PeakMemory:
    """Peak resident memory (CPU, sampled every 10 ms) or peak CUDA allocation during a block, above its start."""

    def __init__(self, device: str):
        self.device = device
        self.peak = 0

    def __enter__(self):
        import psutil

        self._proc = psutil.Process()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        self._base = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._top = self._base

        def sample():
            while not self._stop.wait(0.01):
                self._top = max(self._top, self._proc.memory_info().rss)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._top, self._proc.memory_info().rss) - self._base
        return False


def naive_segment(model, tokenizer, volume: Volume, prompts, size: int, device: str):
    """The authors' way, slice by slice (axial slices of an LPS-stored volume are its k planes)."""
    import torch
    import torch.nn.functional as F

    from biomedseg.models.biomedparse.preprocess import (CT_WINDOWS, pad_to_square, resize_spline,
                                                         restore_geometry, scale_to_255)

    out = {p: np.zeros(volume.shape, np.float32) for p in prompts}
    lo, hi = CT_WINDOWS["abdomen"]
    for k in range(volume.shape[0]):
        image = volume.array[k].astype(np.float64)
        resized = resize_spline(pad_to_square(scale_to_255(image, lo, hi)), size)
        rgb = np.stack([resized] * 3, axis=-1).astype(np.uint8)
        with torch.no_grad():
            x = torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].to(device)
            feats = model.image_features(model.normalize(x))
            tokens = tokenizer(list(prompts))
            ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
            token_emb, class_emb = model.text_features(ids)
            dec = model.decode(feats, token_emb[mask.bool()][:, None])
            matched = model.similarity(dec["pred_captions"][0], class_emb).max(0)[1]
            logits = dec["pred_masks"][0, matched]
            probs = F.interpolate(logits[None], (size, size), mode="bilinear")[0].sigmoid()
            probs = restore_geometry(probs, image.shape).float().cpu().numpy()
        for i, p in enumerate(prompts):
            out[p][k] = probs[i]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--size", type=int, default=None, help="model input edge (default 256 on CPU, 1024 on GPU)")
    parser.add_argument("--slices", type=int, default=None, help="slices in the volume (default 4 on CPU, 64 on GPU)")
    parser.add_argument("--rows", type=int, default=512, help="slice edge in voxels (default 512)")
    parser.add_argument("--no-amp", action="store_true", help="engine without CUDA autocast")
    parser.add_argument("--exact", action="store_true", help="engine with the authors' CPU preprocessing on a GPU too")
    parser.add_argument("--repeat", type=int, default=1, help="runs per scenario and way; the fastest counts")
    args = parser.parse_args()

    import torch

    from biomedseg.runtime.device import resolve_device
    from biomedseg.engine import load_backend, segment
    from biomedseg.models.biomedparse.checkpoint import build_biomedparse_v1, expected_shapes

    device, reason = resolve_device(args.device)
    gpu = device.startswith("cuda")
    size = args.size or (1024 if gpu else 256)
    n_slices = args.slices or (64 if gpu else 4)
    volume = synthetic_ct(n_slices, args.rows)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), device {device} ({reason})")
    print(f"volume: {n_slices} axial slices of {args.rows}x{args.rows} (int16 HU), model input {size}x{size}")

    tmp = tempfile.TemporaryDirectory(prefix="biomedparse-bench-")
    t = time.perf_counter()
    state = load_detweights().det_state_dict(expected_shapes())
    checkpoint = Path(tmp.name) / "biomedparse_v1.pt"
    torch.save(state, checkpoint)
    del state
    print(f"deterministic checkpoint written in {time.perf_counter() - t:.1f} s")

    options = {"image_size": size, "p_value": 0}
    if args.no_amp:
        options["amp"] = False
    if args.exact:
        options["exact_preprocessing"] = True
    backend, _ = load_backend("biomedparse-v1", device, str(checkpoint))
    naive_model = build_biomedparse_v1(checkpoint=checkpoint, device=device)  # as built: fp32, reference layouts
    tokenizer = backend.tokenizer

    def sync():
        if gpu:
            torch.cuda.synchronize()

    def engine(prompts, cold):
        if cold:
            backend.cache.clear()
        sync()
        with PeakMemory(device) as mem:
            t0 = time.perf_counter()
            out = segment(volume, "biomedparse-v1", prompts, device=device, weights=str(checkpoint),
                          options=options, keep_probabilities=True).probabilities
            sync()
            seconds = time.perf_counter() - t0
        return out, seconds, mem.peak

    def naive(prompts):
        sync()
        with PeakMemory(device) as mem:
            t0 = time.perf_counter()
            out = naive_segment(naive_model, tokenizer, volume, prompts, size, device)
            sync()
            seconds = time.perf_counter() - t0
        return out, seconds, mem.peak

    # warm-up on one slice each (allocator, kernels), not timed
    warm = Volume(volume.array[:1], volume.ijk_to_ras, meta=volume.meta)
    segment(warm, "biomedparse-v1", FIRST, device=device, weights=str(checkpoint), options=options)
    naive_segment(naive_model, tokenizer, warm, FIRST, size, device)

    rows = []
    scenarios = [("1 prompt", FIRST, True), ("3 prompts", THREE, True), ("re-prompt (1 new)", REPROMPT, False)]
    results = {}
    for name, prompts, cold in scenarios:
        naive_s = engine_s = float("inf")
        naive_mem = engine_mem = 0
        for _ in range(max(1, args.repeat)):  # alternate the two ways; keep the fastest run of each
            naive_out, seconds, peak = naive(prompts)
            naive_s, naive_mem = min(naive_s, seconds), max(naive_mem, peak)
            engine_out, seconds, peak = engine(prompts, cold)
            engine_s, engine_mem = min(engine_s, seconds), max(engine_mem, peak)
        results[name] = (naive_out, engine_out)
        rows.append((name, naive_s, naive_mem, engine_s, engine_mem, backend.last_run))
        print(f"{name:18s} naive {n_slices / naive_s:7.3f} slices/s ({naive_s:7.2f} s, peak +{naive_mem / 1e9:.2f} GB)"
              f"   engine {n_slices / engine_s:7.3f} slices/s ({engine_s:7.2f} s, peak +{engine_mem / 1e9:.2f} GB,"
              f" encoded {backend.last_run['encoded_slices']} slices, batch {backend.last_run['batch_size']},"
              f" cache {backend.last_run['cache']})   speedup {naive_s / engine_s:.2f}x")

    naive_one, engine_one = results["1 prompt"]
    diff = float(np.abs(naive_one[FIRST[0]] - engine_one[FIRST[0]]).max())
    print(f"one prompt, engine vs naive probabilities: max |diff| {diff:.2e}"
          f" ({'exact preprocessing' if backend.last_run['exact_preprocessing'] else 'device preprocessing'})")
    first_s, reprompt_s = rows[0][3], rows[2][3]
    print(f"engine re-prompt vs its first prompt: {first_s / reprompt_s:.1f}x faster "
          f"({first_s:.2f} s -> {reprompt_s:.2f} s)")
    naive_total = sum(r[1] for r in rows)
    engine_total = sum(r[3] for r in rows)
    print(f"totals: naive {naive_total:.2f} s, engine {engine_total:.2f} s")
    print(f"speedup_vs_naive: {naive_total / engine_total:.2f}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
