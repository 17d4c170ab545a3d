"""Render the README's two preview figures: previews of the renderer on real images, not model results.

(a) 3D: the Colin27 T1 MRI (apt-get install mricron-data) with its BET brain mask (ch2bet > 0,
    morphologically closed by 3 voxels).
(b) 2D: the fundus photograph shipped in scikit-image (``skimage/data/retina.jpg``, Häggström 2014,
    CC0) with the brightest part of the photo (a luminance threshold, which finds the optic disc
    and not much else) as the segment.

    python scripts/render_previews.py [OUT_DIR]     (default Resources/Screenshots)
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "BiomedSeg"))

from biomedseg.io.readers import read_volume  # noqa: E402
from biomedseg.preview import render_preview  # noqa: E402
from biomedseg.segments import Segment  # noqa: E402

COLIN = Path("/usr/share/mricron/templates/ch2.nii.gz")
COLIN_BET = Path("/usr/share/mricron/templates/ch2bet.nii.gz")


def fundus_path() -> Path:
    import skimage

    return Path(skimage.__file__).parent / "data" / "retina.jpg"


def bright_region(rgb: np.ndarray) -> np.ndarray:
    """Pixels brighter than the 99.5th luminance percentile of the photo, smoothed, largest piece."""
    luma = rgb[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    luma = ndimage.gaussian_filter(luma, 4)
    mask = luma > np.percentile(luma, 99.5)
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = ndimage.sum(mask, labels, range(1, n + 1))
        mask = labels == 1 + int(np.argmax(sizes))
    return ndimage.binary_fill_holes(mask)


def main(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    ch2 = read_volume(COLIN)
    # ch2bet > 0 is ragged along the midline fissure (the sagittal panel cuts right through it):
    # a closing of 3 voxels smooths it, and the segment's name says so.
    brain = np.pad(read_volume(COLIN_BET).array > 0, 4)
    brain = ndimage.binary_closing(brain, ndimage.generate_binary_structure(3, 1), iterations=3)[4:-4, 4:-4, 4:-4]
    p3 = render_preview(out_dir / "preview_3d.png", ch2,
                        [Segment("brain (ch2bet > 0, closed 3 voxels)", brain, (0.95, 0.84, 0.57))],
                        title="Colin27 T1 (ch2) with its BET brain mask - renderer preview, not a model result",
                        overwrite=True)
    fundus = read_volume(fundus_path())
    region = bright_region(fundus.array[0])[None]
    p2 = render_preview(out_dir / "preview_2d.png", fundus,
                        [Segment("bright region (threshold)", region, (0.2, 0.9, 1.0))],
                        title="fundus photo (scikit-image retina.jpg) - renderer preview, not a model result",
                        overwrite=True)
    from PIL import Image

    for p in (p3, p2):  # the renderer's pixels, only recompressed (a palette would band the fundus)
        image = Image.open(p)
        image.load()
        image.save(p, optimize=True)
        print(p, image.size, f"{p.stat().st_size // 1024} KiB")
    print(f"{time.perf_counter() - t:.1f} s")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "Resources" / "Screenshots")
