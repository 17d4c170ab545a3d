"""BiomedCLIP through BiomedSeg: image throughput, recognising a volume, checks after it.

Weights: the deterministic name-keyed ones (shared/parity/detweights.py), written as the authors'
``open_clip_pytorch_model.bin`` with a small vocabulary, so the figures are about speed and memory,
not accuracy. Steps:
  1. images/s of the image tower at batch 1 and at batches 2..--max-batch (224x224 inputs);
  2. recognising a synthetic 300-slice CT (512x512 slices) from its sampled slices through the
     engine (windowing, preprocessing, embeddings, the recognition vocabulary's texts), cold;
  3. a prompt check on the same volume afterwards (embeddings and texts cached).
Prints one ``name: value`` per line; ``images_per_s`` is the best batch's throughput.
Usage: python bench/biomedclip.py [--device cpu|cuda] [--slices 300] [--size 512] [--max-batch 16]
"""
from __future__ import annotations

import argparse
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from common import load_detweights  # noqa: E402  (also puts the engine on sys.path)

WORDS = ["this", "is", "a", "photo", "of", "ct", "scan", "an", "mri", "x", "-", "ray", "image", "the", "chest",
         "liver", "lung", "heart", "brain", "abdomen", "slice", "axial", "coronal", "sagittal"]


def write_weights(folder: Path) -> Path:
    import torch

    from biomedseg.models.biomedclip.network import BiomedCLIPNet

    net = BiomedCLIPNet()
    load_detweights().fill_module(net)
    torch.save(net.state_dict(), folder / "open_clip_pytorch_model.bin")
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    return folder


def synthetic_ct(n_slices: int, size: int):
    from biomedseg.volume import Volume

    rng = np.random.default_rng(0)
    j, i = np.indices((size, size))
    body = ((j - size / 2) ** 2 + (i - size / 2) ** 2) < (0.45 * size) ** 2
    base = np.where(body, 40, -1000).astype(np.int16)
    array = np.repeat(base[None], n_slices, axis=0) + rng.integers(-20, 20, (n_slices, size, size)).astype(np.int16)
    return Volume(array, np.diag([0.7, 0.7, 1.5, 1.0]), name="synthetic CT")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--max-batch", type=int, default=16)
    args = parser.parse_args()
    import torch

    from biomedseg.engine import segment
    from biomedseg.models.biomedclip.network import load_checkpoint
    from biomedseg.prompts import TextPrompt

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, device {args.device}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_weights(Path(tmp))
        net = load_checkpoint(folder / "open_clip_pytorch_model.bin").to(args.device)
        best = (0.0, 1)
        batch = 1
        while batch <= args.max_batch:
            pixels = torch.randn(batch, 3, 224, 224, device=args.device)
            with torch.inference_mode():
                net.encode_image(pixels)  # warm-up
                t0 = time.perf_counter()
                repeats = max(1, 8 // batch)
                for _ in range(repeats):
                    net.encode_image(pixels)
                rate = batch * repeats / (time.perf_counter() - t0)
            print(f"images_per_s_batch_{batch}: {rate:.2f}")
            best = max(best, (rate, batch))
            batch *= 2
        del net
        volume = synthetic_ct(args.slices, args.size)
        t0 = time.perf_counter()
        result = segment(volume, "biomedclip", [], device=args.device, weights=str(folder))
        print(f"recognise_s ({args.slices} slices of {args.size}x{args.size}, {len(result.report['slices'])} "
              f"sampled, cold): {time.perf_counter() - t0:.2f}")
        print(f"recognised: {result.report['recognized']}")
        t0 = time.perf_counter()
        check = segment(volume, "biomedclip", [TextPrompt("liver")], device=args.device, weights=str(folder),
                        options={"task": "check", "alternatives": ["lung", "heart", "brain"]})
        print(f"check_after_recognise_s: {time.perf_counter() - t0:.2f} "
              f"(slices embedded again: {check.report['slices_embedded']})")
    print(f"peak_rss_mb: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}")
    print(f"best_batch: {best[1]}")
    print(f"images_per_s: {best[0]:.2f}")


if __name__ == "__main__":
    main()
