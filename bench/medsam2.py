"""MedSAM2 through BiomedSeg's engine: embedding, click, propagation and memory figures.

Input: slicerio's bundled CTChest4 (a real chest CT, 128 x 128 x 34, int32 HU), the lung window,
and a box around the right lung taken from slicerio's bundled segmentation on its largest slice
(the parity fixture's recipe). Weights: the deterministic name-keyed ones
(shared/parity/detweights.py) saved as a ``{'model': state_dict}`` checkpoint and loaded through
the backend's real loader, so the figures are about speed and memory, not quality.

Steps, in one worker-free engine session (``biomedseg.engine.segment`` with a session id):
  1. the box on the key slice, propagated over ``--slices`` slices (embeds every slice once);
  2. clicks on slices that are already embedded: an exclude click that recomputes its
     neighbourhood (a correction), timed whole;
  3. the same object propagated again over cached features (propagation per slice);
  4. the click itself, ``ObjectVideo.add_prompt`` on an embedded frame: prompt encoder, mask
     decoder and the memory it needs, no image encoder (the interactive figure).
Prints one ``name: value`` per line; ``click_latency_s`` is step 4's median.
Usage: python bench/medsam2.py [--device auto|cpu|cuda] [--slices N] [--clicks K] [--threads T]
"""
from __future__ import annotations

import argparse
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from common import load_detweights  # noqa: E402  (also puts the engine on sys.path)


def chest_ct(n_slices: int):
    """(volume, right-lung mask) of CTChest4, the middle ``n_slices`` slices around the lung's largest one."""
    import slicerio

    from biomedseg.io import read_volume
    from biomedseg.io.segmentation_reader import find_segment, read_segments

    volume = read_volume(slicerio.get_testdata_file("CTChest4.nrrd"))
    segments, _ = read_segments(slicerio.get_testdata_file("Segmentation.seg.nrrd"), volume)
    lung = find_segment(segments, "right lung", "Segmentation.seg.nrrd").mask
    axis = volume.slice_orientation("axial").slice_axis
    areas = lung.sum(axis=tuple(a for a in range(3) if a != axis))
    key = int(np.argmax(areas))
    lo = max(0, min(key - n_slices // 2, volume.shape[axis] - n_slices))
    index = [slice(None)] * 3
    index[axis] = slice(lo, lo + n_slices)
    part = type(volume)(np.ascontiguousarray(volume.array[tuple(index)]), _shifted(volume, axis, lo), name="CTChest4")
    return part, np.ascontiguousarray(lung[tuple(index)]), key - lo, axis


def _shifted(volume, axis: int, first: int) -> np.ndarray:
    """ijk_to_ras of the sub-volume that starts at slice ``first`` along array axis ``axis``."""
    m = volume.ijk_to_ras.copy()
    ijk = np.zeros(3)
    ijk[2 - axis] = first
    m[:3, 3] = volume.ijk_to_ras[:3, :3] @ ijk + volume.ijk_to_ras[:3, 3]
    return m


def write_checkpoint(folder: Path) -> Path:
    import torch

    from biomedseg.models.medsam2.network import MedSAM2Net

    net = MedSAM2Net()
    load_detweights().fill_module(net)
    path = folder / "MedSAM2_detweights.pt"
    torch.save({"model": net.state_dict()}, path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--clicks", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--write-checkpoint", metavar="FOLDER", help="only write the deterministic-weights checkpoint")
    args = parser.parse_args()
    if args.write_checkpoint:
        print(write_checkpoint(Path(args.write_checkpoint)))
        return
    import torch

    from biomedseg.engine import segment
    from biomedseg.engine.loading import warm_backend
    from biomedseg.engine.sessions import SESSIONS
    from biomedseg.prompts import BoxPrompt, PointPrompt

    if args.threads:
        torch.set_num_threads(args.threads)
    volume, lung, key, axis = chest_ct(args.slices)
    ras = volume.ras_of_voxels()
    on_key = np.zeros(volume.shape, bool)
    index = [slice(None)] * 3
    index[axis] = key
    on_key[tuple(index)] = lung[tuple(index)]
    points = ras[on_key]
    box = BoxPrompt(tuple(points.min(axis=0)), tuple(points.max(axis=0)), "axial", "right lung")
    options = {"window": "lung"}
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, device {args.device}")
    print(f"volume: CTChest4 {volume.shape} (k, j, i), {args.slices} slices of {volume.shape[1]}x{volume.shape[2]}"
          f" resized to 512x512")
    with tempfile.TemporaryDirectory() as tmp:
        weights = str(write_checkpoint(Path(tmp)))
        started = time.perf_counter()
        first = segment(volume, "medsam2", [box], device=args.device, weights=weights, options=options,
                        session="bench", keep_largest=False)
        first_s = time.perf_counter() - started
        report = first.report["targets"]["right lung"]
        encoded = report["slices_encoded"]
        backend = warm_backend("medsam2", first.device, weights)
        cache = backend.features.describe()
        print(f"first_box_s: {first_s:.3f}")
        print(f"slices_encoded: {encoded}")
        # embedding alone: encode the same slices again, cache bypassed
        store_video = SESSIONS.sessions["bench"].backend_session.targets["right lung"].video
        store = store_video.store
        t0 = time.perf_counter()
        with torch.inference_mode():
            for i in range(min(3, args.slices)):
                backend.encode(store.get_frame(i).unsqueeze(0))
        embed_s = (time.perf_counter() - t0) / min(3, args.slices)
        print(f"embedding_s_per_slice: {embed_s:.3f}")
        # propagation alone: the same object propagated again over features already cached
        lo, hi = store_video.range
        t0 = time.perf_counter()
        with torch.inference_mode():
            tracked = store_video.propagate(lo, hi)
        propagated = len([f for f in tracked if f not in store_video.conditioning_frames])
        print(f"propagation_s_per_slice: {(time.perf_counter() - t0) / max(1, propagated):.4f}")
        print(f"cached_embedding_bytes_per_slice: {cache['bytes_per_slice']}")
        # corrections: exclude clicks on embedded slices away from the key slice
        mask = first.segments[0].mask if first.segments else np.ones(volume.shape, bool)
        idx = np.indices(volume.shape)
        click_prompts, corrections = [box], []
        for n in range(args.clicks):
            s = (key + 1 + n) % args.slices
            where = np.argwhere(mask & (idx[axis] == s))
            if not len(where):
                continue
            click_prompts.append(PointPrompt(tuple(ras[tuple(where[len(where) // 2])]), False, "axial", "right lung"))
            t0 = time.perf_counter()
            result = segment(None, "medsam2", list(click_prompts), device=args.device, weights=weights,
                             options=options, session="bench", keep_largest=False)
            corrections.append((time.perf_counter() - t0, result.report["targets"]["right lung"]["recomputed_frames"],
                                result.report["targets"]["right lung"]["slices_encoded"]))
        if corrections:
            print(f"correction_s_median: {statistics.median(c[0] for c in corrections):.3f}")
            print(f"correction_frames_recomputed: {[c[1] for c in corrections]}")
            print(f"correction_slices_encoded: {sum(c[2] for c in corrections)}")
        # the click alone: prompt encoder + mask decoder (+ memory) on an embedded frame
        latencies = []
        with torch.inference_mode():
            for n in range(args.clicks):
                frame = (key + 2 + n) % args.slices
                x, y = volume.shape[2] / 2, volume.shape[1] / 2
                t0 = time.perf_counter()
                store_video.add_prompt(frame, points=np.array([[x, y]], np.float32), labels=np.array([1], np.int32))
                latencies.append(time.perf_counter() - t0)
        click = statistics.median(latencies)
        print(f"first_click_s (box, embedding and propagation included): {first_s:.3f}")
        print(f"click_to_first_click_ratio: {click / first_s:.4f}")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"peak_rss_mb: {peak:.0f}")
        print(f"click_latency_s: {click:.4f}")


if __name__ == "__main__":
    main()
