"""The offline default on a real T1: deepbet on Colin27 against the BET mask shipped beside it.

Colin27 (`ch2.nii.gz`) and its brain-extracted version (`ch2bet.nii.gz`) come with Debian's
mricron-data. Prints the time of an in-process run (model loading included, then warm) and
the Dice overlap of our brain mask with ``ch2bet > 0``.
Usage: python bench/deepbet.py [--device cpu]
"""
from __future__ import annotations

import argparse
import platform
import time

import common  # noqa: F401  (puts the engine on sys.path)

from biomedseg.engine import segment
from biomedseg.io import read_volume

TEMPLATES = "/usr/share/mricron/templates"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    import torch

    print(f"machine: {platform.machine()}, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    volume = read_volume(f"{TEMPLATES}/ch2.nii.gz")
    reference = read_volume(f"{TEMPLATES}/ch2bet.nii.gz").array > 0
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        result = segment(volume, "deepbet", ["brain"], device=args.device)
        times.append(time.perf_counter() - t0)
    mask = result.segments[0].mask
    dice = 2 * (mask & reference).sum() / (mask.sum() + reference.sum())
    print(f"volume {volume.shape} (k, j, i), device {result.device}")
    print(f"first run (loads the model): {times[0]:.2f} s, warm run: {times[1]:.2f} s")
    print(f"dice_vs_ch2bet: {dice:.3f}")


if __name__ == "__main__":
    main()
