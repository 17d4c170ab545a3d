"""A PNG a person can glance at: segment outlines over the image.

3D volumes get three orthogonal slices through the centre of the segments (or of the image),
shown in the usual radiological orientation (the same ``SliceOrientation`` the slice-wise
models use) and stretched to the true physical aspect ratio. A one-slice input (a fundus photo,
a pathology tile, an X-ray) gets one panel at its own aspect, in colour when it is colour.

Outlines are drawn at display resolution as a coloured line with a halo of the opposite
brightness (dark around light colours, light around dark ones), so they show on white tissue
and on black background alike. The PNG never exceeds ``MAX_SIDE`` pixels a side, whatever
the spacing; an aspect ratio beyond ``MAX_ASPECT`` is clamped and the panel says so.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from .errors import InputError
from .imaging_guess import guess_modality
from .io.atomic import atomic_write
from .segments import PALETTE, Segment, segment_size
from .volume import SliceOrientation, Volume, strided_sample

#: Height of each of the three panels of a 3D preview (pixels).
PANEL_HEIGHT = 320
#: Widest a 3D panel may be: three of them and the margins stay under MAX_SIDE.
PANEL_MAX_WIDTH = 620
#: Longer side of a 2D panel: small images are enlarged to the first, large ones shrunk to the second.
PANEL_2D_LONG = (512, 1024)
#: No side of the PNG is longer than this.
MAX_SIDE = 2000
#: Panels more elongated than this (width/height or height/width) are clamped and marked "not to scale".
MAX_ASPECT = 12.0
#: The CT soft-tissue window, W400/L40 in HU (the same numbers as ``runtime.windows``): organs, muscle,
#: fat and most lesions have distinct greys in it. Percentiles of a CT span air (or -3024 padding) to
#: bone, which squeezes all soft tissue into a few grey levels.
CT_SOFT_TISSUE = (-160.0, 240.0)
#: Percentiles of the body (padding excluded) for images that are not CT.
PERCENTILES = (1.0, 99.0)

MARGIN = 10
FONT_SIZE = 14
LEGEND_COLUMN = 340


def _font(size: int = FONT_SIZE):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


def is_2d(volume: Volume) -> bool:
    """A one-slice image (along any axis): shown as one panel."""
    return min(volume.shape) == 1


def display_window(volume: Volume, window: tuple[float, float] | None = None,
                   modality: str | None = None) -> tuple[float, float, str]:
    """(lower, upper, rule): the grey values shown black and white.

    ``window`` (image units, e.g. HU) wins: pass the window the run used (the site's CT window).
    Without one, CT (``modality``, else ``guess_modality``) gets the soft-tissue window
    ``CT_SOFT_TISSUE`` (W400/L40, -160..240 HU): per-image percentiles of a CT run from air or
    -3024 padding to bone and leave soft tissue washed out. 8-bit colour is shown as stored.
    Anything else gets the 1-99 percentiles of the body: voxels equal to the image minimum
    (background, padding) are left out, so a mostly empty field of view does not set the window.
    """
    if window is not None:
        lo, hi = (float(v) for v in window)
        if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
            raise InputError(f"The preview window [{lo}, {hi}] needs finite edges with lower < upper.")
        return lo, hi, f"window [{lo:g}, {hi:g}]"
    if volume.channels_last and volume.array.dtype == np.uint8:
        return 0.0, 255.0, "8-bit colour as stored"
    name = modality if modality is not None else guess_modality(volume)[0]
    if str(name).strip().upper() == "CT":
        lo, hi = CT_SOFT_TISSUE
        return lo, hi, f"CT soft-tissue window [{lo:g}, {hi:g}] HU"
    values = _colour_values(volume.array) if volume.channels_last else volume.array
    flat = strided_sample(values).astype(np.float32)
    body = flat[flat > flat.min()] if flat.size else flat
    if body.size < max(16, flat.size // 100):  # (almost) a constant image: the minimum is the image
        body = flat
    lo, hi = (float(v) for v in np.percentile(body, PERCENTILES))
    if not hi > lo:  # one value: mid-grey
        lo, hi = lo - 0.5, lo + 0.5
    return lo, hi, f"{PERCENTILES[0]:g}-{PERCENTILES[1]:g} percentiles of the body [{lo:.4g}, {hi:.4g}]"


def _colour_values(array: np.ndarray) -> np.ndarray:
    """The channels that carry grey or colour: RGB without alpha, grey without alpha."""
    n = array.shape[-1]
    return array[..., :3] if n >= 3 else array[..., :1]


def _to_uint8(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    scaled = (np.asarray(values, dtype=np.float32) - lo) / (hi - lo)
    return (np.clip(scaled, 0, 1) * 255 + 0.5).astype(np.uint8)


def _rgb255(segment: Segment, index: int) -> tuple[int, int, int]:
    if segment.color is None:
        return tuple(PALETTE[index % len(PALETTE)])
    return tuple(int(round(float(c) * 255)) for c in segment.color[:3])


def _halo(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """Dark around light colours, light around dark ones."""
    luma = (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]) / 255
    return (0, 0, 0) if luma >= 0.4 else (255, 255, 255)


def _in_plane_spacing(volume: Volume, orient: SliceOrientation) -> tuple[float, float]:
    """(row, column) pixel size in mm of the display plane."""
    spacing_kji = volume.spacing[::-1]
    return float(spacing_kji[orient.row_axis]), float(spacing_kji[orient.col_axis])


def _orientation_2d(volume: Volume) -> SliceOrientation:
    """The display plane of a one-slice image: the patient plane whose normal is its thin axis."""
    thin = int(np.argmin(volume.shape))
    for plane in ("axial", "coronal", "sagittal"):
        orient = volume.slice_orientation(plane)
        if orient.slice_axis == thin:
            return orient
    rows, cols = [a for a in range(3) if a != thin]  # oblique: as stored
    return SliceOrientation("image", thin, rows, cols, False, False, False)


def pixel_size_note(volume: Volume) -> str:
    """For a photo (PNG/JPEG/TIFF/BMP) the pixel size is a guess: say where it came from."""
    if volume.meta.get("image_kind") != "2d":
        return ""
    if np.allclose(volume.spacing, 1.0):
        return "pixel size unknown: 1 mm assumed"
    row_mm, col_mm = _in_plane_spacing(volume, _orientation_2d(volume))
    size = f"{row_mm:.3g} mm" if np.isclose(row_mm, col_mm) else f"{row_mm:.3g} x {col_mm:.3g} mm"
    return f"pixel size {size} from the file's dpi tag"


def legend_line(segment: Segment, volume: Volume) -> str:
    """One legend entry: voxels and mL for a 3D volume, pixels and mm² of the plane for a 2D image."""
    size = segment_size(volume, int(np.count_nonzero(segment.mask)))
    if "area_mm2" in size:
        return f"{segment.name}: {size['voxels']:,} pixels, {size['area_mm2']:,.1f} mm\u00b2"
    return f"{segment.name}: {size['voxels']:,} voxels, {size['volume_ml']:,.1f} mL"


def _panel_size(rows: int, cols: int, row_mm: float, col_mm: float, two_d: bool) -> tuple[int, int, bool]:
    """(width, height, clamped) of a panel showing rows x cols pixels of the given size."""
    aspect = (cols * col_mm) / (rows * row_mm)
    clamped = not (1 / MAX_ASPECT <= aspect <= MAX_ASPECT)
    aspect = min(max(aspect, 1 / MAX_ASPECT), MAX_ASPECT)
    if two_d:
        finest = min(row_mm, col_mm)
        native_long = max(rows * row_mm, cols * col_mm) / finest
        long = int(min(max(native_long, PANEL_2D_LONG[0]), PANEL_2D_LONG[1]))
        width, height = (long, long / aspect) if aspect >= 1 else (long * aspect, long)
    else:
        width, height = PANEL_HEIGHT * aspect, PANEL_HEIGHT
        if width > PANEL_MAX_WIDTH:
            width, height = PANEL_MAX_WIDTH, PANEL_MAX_WIDTH / aspect
    return max(1, int(round(width))), max(1, int(round(height))), clamped


def _resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A boolean slice at display size: smooth edges when enlarged, nothing lost when shrunk."""
    small = np.asarray(Image.fromarray(mask.astype(np.float32)).resize(size, Image.BILINEAR))
    out = small >= 0.5
    if not out.any() and mask.any():  # thinner than half a display pixel: still show it
        out = small > 0
    return out


def _draw_outlines(rgb: np.ndarray, masks: list[np.ndarray], colours: list[tuple[int, int, int]]) -> None:
    """A coloured line straddling each mask's border, over a halo of the opposite brightness.
    All halos go down first, so no halo covers another segment's line."""
    thick = 2 if max(rgb.shape[:2]) >= 700 else 1
    lines = []
    for mask in masks:
        inner = mask & ~ndimage.binary_erosion(mask, border_value=0)
        outer = ndimage.binary_dilation(mask) & ~mask
        line = inner | outer
        if thick > 1:
            line = ndimage.binary_dilation(line, iterations=thick - 1)
        lines.append(line)
    square = np.ones((3, 3), bool)
    for line, colour in zip(lines, colours):
        halo = ndimage.binary_dilation(line, structure=square, iterations=thick) & ~line
        rgb[halo] = _halo(colour)
    for line, colour in zip(lines, colours):
        rgb[line] = colour


def _panel(volume: Volume, orient: SliceOrientation, index: int, segments: list[Segment],
           lo: float, hi: float, two_d: bool) -> tuple[Image.Image, bool]:
    image = orient.to_display(volume.array)[index]
    row_mm, col_mm = _in_plane_spacing(volume, orient)
    width, height, clamped = _panel_size(image.shape[0], image.shape[1], row_mm, col_mm, two_d)
    if volume.channels_last and volume.array.shape[-1] >= 3:
        shown = Image.fromarray(_to_uint8(image[..., :3], lo, hi), "RGB")
    else:
        grey = image[..., 0] if volume.channels_last else image
        shown = Image.fromarray(_to_uint8(grey, lo, hi), "L")
    rgb = np.array(shown.resize((width, height), Image.BILINEAR).convert("RGB"))
    masks = [_resize_mask(orient.to_display(s.mask)[index], (width, height)) for s in segments]
    _draw_outlines(rgb, masks, [_rgb255(s, i) for i, s in enumerate(segments)])
    return Image.fromarray(rgb), clamped


def _text(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, font, small, fill) -> None:
    """Draw text; a superscript two is drawn as a small raised 2 (the default font has no glyph for it)."""
    x, y = xy
    for i, part in enumerate(text.split("\u00b2")):
        if i:
            draw.text((x, y - 1), "2", fill=fill, font=small)
            x += draw.textlength("2", font=small)
        draw.text((x, y), part, fill=fill, font=font)
        x += draw.textlength(part, font=font)


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: float, max_lines: int = 3) -> list[str]:
    """Greedy word wrap into at most ``max_lines`` lines; the last is cut with an ellipsis if need be."""
    lines: list[str] = []
    for word in text.split(" "):
        if lines and draw.textlength(lines[-1] + " " + word, font=font) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[:max_lines - 1] + [" ".join(lines[max_lines - 1:])]
    return [_fit(draw, line, font, width) for line in lines]


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: float) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "\u2026", font=font) > width:
        text = text[:-1]
    return text + "\u2026"


def render_preview(path: str | os.PathLike, volume: Volume, segments: list[Segment], title: str = "",
                   overwrite: bool = False, *, window: tuple[float, float] | None = None,
                   modality: str | None = None) -> Path:
    """Write a PNG of ``segments`` outlined on ``volume``; returns the path written.

    ``window`` (lower, upper in image units) is the grey range shown, e.g. the CT window the run
    used; ``modality`` ("CT", "MRI", ...) says what the image is when no window is given (guessed
    from the image otherwise). See ``display_window`` for the rules.
    """
    lo, hi, _ = display_window(volume, window, modality)
    two_d = is_2d(volume)
    union = np.zeros(volume.shape, bool)
    for s in segments:
        union |= np.asarray(s.mask, bool)
    centre = (np.array(ndimage.center_of_mass(union)) if union.any() else (np.array(volume.shape) - 1) / 2)
    centre = np.round(centre).astype(int)
    orients = [_orientation_2d(volume)] if two_d else [volume.slice_orientation(p)
                                                      for p in ("axial", "coronal", "sagittal")]
    panels = []
    for orient in orients:
        n = volume.shape[orient.slice_axis]
        index = orient.display_slice_index(int(centre[orient.slice_axis]), n)
        img, clamped = _panel(volume, orient, index, segments, lo, hi, two_d)
        panels.append((orient.plane + (" (not to scale)" if clamped else ""), img))

    # Text grows with a large 2D panel, so it stays legible when the PNG is shown shrunk.
    size = FONT_SIZE if not two_d else max(FONT_SIZE, max(panels[0][1].size) // 56)
    font, small = _font(size), _font(max(8, size * 2 // 3))
    line, column = size + 6, LEGEND_COLUMN * size // FONT_SIZE
    top = MARGIN if two_d else MARGIN + line
    panels_bottom = top + max(img.height for _, img in panels)
    width = max(sum(img.width for _, img in panels) + MARGIN * (len(panels) + 1), 2 * column + 2 * MARGIN)
    heading = title or volume.name
    if two_d and panels[0][0].endswith("(not to scale)"):
        heading += " (not to scale)"
    note = pixel_size_note(volume) if two_d else ""
    if note:
        heading += f" ({note})"
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    heading_lines = _wrap(measure, heading, font, width - 2 * MARGIN)
    # Legend below the panels and the heading, in columns, never taller than the PNG may be.
    legend_top = panels_bottom + MARGIN + line * (len(heading_lines) - 1)
    max_rows = max(1, (MAX_SIDE - legend_top - line - MARGIN) // line)
    n_cols = max(1, (width - 2 * MARGIN) // column)
    entries = [(_rgb255(s, i), legend_line(s, volume)) for i, s in enumerate(segments)]
    if len(entries) > n_cols * max_rows:
        hidden = len(entries) - (n_cols * max_rows - 1)
        entries = entries[:n_cols * max_rows - 1] + [(None, f"... and {hidden} more segments")]
    rows = min(max_rows, max(min(len(entries), 8), math.ceil(len(entries) / n_cols)))
    col_width = (width - 2 * MARGIN) if len(entries) <= rows else column
    height = legend_top + line * (1 + max(1, rows)) + MARGIN

    canvas = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(canvas)
    x = MARGIN
    for label, img in panels:
        canvas.paste(img, (x, top))
        if not two_d:
            draw.text((x, MARGIN // 2), _fit(draw, label, font, img.width), fill=(255, 255, 255), font=font)
        x += img.width + MARGIN
    for n, text in enumerate(heading_lines):
        _text(draw, (MARGIN, legend_top - line * (len(heading_lines) - 1 - n)), text, font, small, (200, 200, 200))
    box = size * 3 // 4
    for i, (colour, text) in enumerate(entries):
        cx = MARGIN + (i // rows) * col_width
        cy = legend_top + line * (1 + i % rows)
        if colour is not None:
            draw.rectangle((cx, cy + (line - box) // 2, cx + box, cy + (line - box) // 2 + box), fill=colour,
                           outline=_halo(colour))
        _text(draw, (cx + box + 7, cy), _fit(draw, text, font, col_width - box - 12), font, small, (255, 255, 255))
    return atomic_write(Path(path), lambda tmp: canvas.save(tmp, format="PNG"), overwrite)
