"""A PNG a person can glance at: segment outlines over three orthogonal slices.

Slices go through the centre of the segments (or of the image), are shown in the usual
radiological orientation (the same ``SliceOrientation`` the slice-wise models use) and
stretched to the true physical aspect ratio.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from .io.atomic import atomic_write
from .segments import Segment
from .volume import Volume

PANEL_HEIGHT = 320


def _window(image: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(image, (1, 99))
    if hi <= lo:
        hi = lo + 1
    return (np.clip((image - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def _outline(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def render_preview(path: str | os.PathLike, volume: Volume, segments: list[Segment], title: str = "",
                   overwrite: bool = False) -> Path:
    gray = volume.grayscale().astype(np.float32)
    union = np.zeros(volume.shape, bool)
    for s in segments:
        union |= s.mask
    centre = (np.array(ndimage.center_of_mass(union)) if union.any() else (np.array(volume.shape) - 1) / 2)
    centre = np.round(centre).astype(int)
    spacing_kji = volume.spacing[::-1]
    panels = []
    for plane in ("axial", "coronal", "sagittal"):
        orient = volume.slice_orientation(plane)
        n = volume.shape[orient.slice_axis]
        index = orient.display_slice_index(int(centre[orient.slice_axis]), n)
        rgb = np.repeat(_window(orient.to_display(gray)[index])[..., None], 3, axis=-1)
        for s in segments:
            edge = _outline(orient.to_display(s.mask)[index])
            rgb[edge] = (np.array(s.color) * 255).astype(np.uint8)
        rows, cols = rgb.shape[:2]
        height_mm = rows * spacing_kji[orient.row_axis]
        width_mm = cols * spacing_kji[orient.col_axis]
        width = max(1, int(round(PANEL_HEIGHT * width_mm / height_mm)))
        panels.append((plane, Image.fromarray(rgb).resize((width, PANEL_HEIGHT), Image.NEAREST)))
    legend_h = 22 + 16 * max(1, len(segments))
    canvas = Image.new("RGB", (sum(p.width for _, p in panels) + 10 * (len(panels) + 1), PANEL_HEIGHT + legend_h + 30))
    draw = ImageDraw.Draw(canvas)
    x = 10
    for plane, img in panels:
        canvas.paste(img, (x, 30))
        draw.text((x, 10), plane, fill=(255, 255, 255))
        x += img.width + 10
    y = PANEL_HEIGHT + 40
    draw.text((10, y), title or volume.name, fill=(200, 200, 200))
    for s in segments:
        y += 16
        color = tuple(int(c * 255) for c in s.color)
        draw.rectangle((10, y + 2, 20, y + 12), fill=color)
        draw.text((26, y), f"{s.name}: {int(s.mask.sum())} voxels, "
                           f"{s.mask.sum() * float(np.prod(volume.spacing)) / 1000:.1f} ml", fill=(255, 255, 255))
    return atomic_write(Path(path), lambda tmp: canvas.save(tmp, format="PNG"), overwrite)
