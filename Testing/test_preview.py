"""The preview PNG a person reads: one panel at the input's aspect (and in colour) for 2D images,
three panels at physical aspect for 3D, a CT window for CT, outlines that show on white, areas for
2D legends, and a sane size whatever the spacing. Assertions are on the PNG's pixels."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from biomedseg import preview
from biomedseg.io.readers import read_volume
from biomedseg.preview import MAX_SIDE, legend_line, render_preview
from biomedseg.segments import Segment
from biomedseg.volume import LPS_TO_RAS, Volume
from geometry_cases import affine

#: The readers' geometry for a 2D image file: LPS identity, here with a chosen pixel size.
def photo(array, spacing=(1.0, 1.0), channels_last=False, name="photo") -> Volume:
    m = LPS_TO_RAS @ affine(np.eye(3), (spacing[1], spacing[0], 1.0))  # spacing given as (row, col)
    return Volume(array, m, name=name, channels_last=channels_last)


def disk(shape, centre, radius):
    j, i = np.indices(shape)
    return (j - centre[0]) ** 2 + (i - centre[1]) ** 2 < radius ** 2


def render(tmp_path, volume, segments, **kwargs) -> np.ndarray:
    path = render_preview(tmp_path / "p.png", volume, segments, **kwargs)
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def runs(line: np.ndarray) -> list[tuple[int, int]]:
    """(start, length) of each run of True in a 1D array."""
    padded = np.concatenate([[False], line, [False]]).astype(int)
    edges = np.flatnonzero(np.diff(padded))
    return [(int(a), int(b - a)) for a, b in zip(edges[::2], edges[1::2])]


def image_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return rows[0], cols[0], rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1


def test_2d_colour_image_is_one_panel_at_its_aspect_in_colour(tmp_path):
    rows, cols = 300, 500
    j, i = np.indices((rows, cols))
    rgb = np.stack([np.full((rows, cols), 200), 60 + i * 100 // cols, np.full((rows, cols), 40)], -1)
    path = tmp_path / "tile.png"
    Image.fromarray(rgb.astype(np.uint8)).save(path)
    volume = read_volume(path)  # the reader's own 2D representation: (1, rows, cols, 3)
    assert volume.shape == (1, rows, cols) and volume.channels_last
    seg = Segment("nucleus", disk((rows, cols), (150, 250), 60)[None], (0.1, 0.2, 1.0))
    png = render(tmp_path, volume, [seg])
    assert max(png.shape[:2]) < 1600  # the old renderer made this 153,274 px wide
    tile = (png[..., 0] > 150) & (png[..., 2] < 100)  # the photo's own colours, not text or outline
    top, left, h, w = image_box(tile)
    assert abs(h - w * rows / cols) <= 2
    assert tile[top:top + h, left:left + w].mean() > 0.97  # one panel: no gaps between panels
    panel = png[top:top + h, left:left + w]
    assert np.median(panel[..., 0] - panel[..., 2]) > 100  # colour kept: red well above blue


def test_2d_grey_image_is_one_grey_panel_at_physical_aspect(tmp_path):
    rows, cols = 100, 100
    grey = (40 + np.indices((rows, cols))[1] * 2).astype(np.uint16)[None]
    volume = photo(grey, spacing=(2.0, 1.0))  # 200 mm tall, 100 mm wide
    seg = Segment("spot", disk((rows, cols), (50, 50), 20)[None], (1.0, 0.3, 0.3))
    png = render(tmp_path, volume, [seg], window=(0, 255))
    body = png[..., 0] > 20
    top, left, h, w = image_box(body[:-60])  # above the legend
    assert abs(h - 2 * w) <= 2
    panel = png[top:top + h, left:left + w]
    outline = (np.abs(panel[..., 0] - panel[..., 1]) > 10)
    grey_pixels = panel[~outline]
    assert np.all(grey_pixels[:, 0] == grey_pixels[:, 1]) and np.all(grey_pixels[:, 1] == grey_pixels[:, 2])
    assert outline.any()


def test_anisotropic_3d_volume_gets_three_panels_at_physical_aspect(tmp_path):
    rng = np.random.default_rng(0)
    array = rng.integers(100, 200, size=(20, 64, 48)).astype(np.int16)  # (k, j, i)
    volume = Volume(array, affine(np.eye(3), (1.0, 1.5, 4.0)), name="aniso")  # i, j, k spacing
    mask = np.zeros(array.shape, bool)
    mask[8:12, 28:36, 20:28] = True
    png = render(tmp_path, volume, [Segment("box", mask, (1.0, 0.0, 0.0))], window=(0, 255))
    shown = png.max(axis=-1) > 30
    middle = preview.MARGIN + preview.FONT_SIZE + 6 + preview.PANEL_HEIGHT // 4  # above the outlines
    widths = [n for _, n in runs(shown[middle]) if n > 20]
    # axial 48 x 96 mm, coronal 48 x 80 mm, sagittal 96 x 80 mm; all 320 px tall
    expected = [320 * 48 / 96, 320 * 48 / 80, 320 * 96 / 80]
    assert len(widths) == 3 and all(abs(w - e) <= 2 for w, e in zip(widths, expected)), widths
    start = runs(shown[middle])[0][0]
    heights = [n for _, n in runs(shown[:, start + 5]) if n > 100]
    assert abs(heights[0] - preview.PANEL_HEIGHT) <= 1


def ct_phantom() -> Volume:
    """CT with -3024 padding outside the scanned circle, air, fat ring and 40 HU soft tissue."""
    k, j, i = np.indices((6, 96, 96))
    r2 = (j - 48) ** 2 + (i - 48) ** 2
    array = np.full(k.shape, -3024, np.int16)
    array[r2 < 46 ** 2] = -1000
    array[r2 < 36 ** 2] = -100
    array[r2 < 30 ** 2] = 40
    array[(r2 < 4 ** 2)] = 1200  # a bone-bright spot at the centre
    return Volume(array, affine(np.eye(3), (0.8, 0.8, 3.0)), name="ct")


def test_ct_gets_the_soft_tissue_window_not_percentiles(tmp_path):
    volume = ct_phantom()
    tissue = np.zeros(volume.shape, bool)
    tissue[:, 20:76, 20:76] = True
    tissue &= volume.array == 40
    png = render(tmp_path, volume, [Segment("tissue", tissue, (0.0, 1.0, 0.0))])
    assert preview.display_window(volume)[:2] == preview.CT_SOFT_TISSUE
    # axial panel: 320 px for 96 voxels; the tissue between the centre spot and the outline
    top, left, scale = preview.MARGIN + preview.FONT_SIZE + 6, preview.MARGIN, 320 / 96
    y, x = int(top + 48 * scale), int(left + (48 + 15) * scale)
    soft = png[y - 3:y + 3, x - 3:x + 3, 0]
    assert np.all(np.abs(soft - 128) <= 3)  # 40 HU is the middle of W400/L40
    fat = png[y, int(left + (48 + 33) * scale), 0]
    assert 25 <= fat <= 50 and soft.mean() - fat > 70  # -100 HU fat is clearly darker than tissue
    # an explicit window (the site's) wins; a non-CT modality gets percentiles of the body
    assert preview.display_window(volume, window=(-1350, 150))[:2] == (-1350.0, 150.0)
    lo, hi, _ = preview.display_window(volume, modality="MRI")
    assert lo > -3024  # the padding is not part of the body


def test_percentiles_ignore_padding_for_mri_like_images(tmp_path):
    array = np.zeros((10, 40, 40), np.float32)
    array[:, 10:30, 10:30] = np.linspace(100, 200, 20)[None, None, :]
    lo, hi, _ = preview.display_window(Volume(array, np.eye(4)), modality="MRI")
    assert 100 <= lo < 105 and 195 < hi <= 200


def test_outlines_show_on_white(tmp_path):
    white = np.full((1, 200, 200), 255, np.uint8)
    seg = Segment("pale", disk((200, 200), (100, 100), 50)[None], (241 / 255, 214 / 255, 145 / 255))
    png = render(tmp_path, photo(white), [seg], window=(0, 255))
    top, left, h, w = image_box((png[:-60] == 255).all(axis=-1))  # the white panel, above the legend
    panel = png[top:top + h, left:left + w]
    assert abs(h - w) <= 1 and (panel == 255).all(axis=-1).mean() > 0.9
    line = np.abs(panel - [241, 214, 145]).max(axis=-1) <= 2
    dark = panel.max(axis=-1) < 60
    assert line.sum() > 2 * np.pi * 128  # the coloured line all round (a disk of 128 px radius on screen)
    assert dark.sum() > 2 * np.pi * 128  # and a dark halo all round it
    rows = np.flatnonzero(dark[h // 2])  # along the middle row: dark, line, ..., line, dark
    assert line[h // 2, rows[0] + 1: rows[0] + 3].all()


def test_legend_uses_area_for_2d_and_volume_for_3d():
    mask2 = np.zeros((1, 20, 20), bool)
    mask2[0, :10, :10] = True
    line2 = legend_line(Segment("disc", mask2), photo(np.zeros((1, 20, 20)), spacing=(0.5, 0.5)))
    assert line2 == "disc: 100 pixels, 25.0 mm\u00b2" and "mL" not in line2
    mask3 = np.ones((10, 10, 10), bool)
    line3 = legend_line(Segment("cube", mask3), Volume(np.zeros((10, 10, 10)), affine(np.eye(3), (2, 2, 2))))
    assert line3 == "cube: 1,000 voxels, 8.0 mL"


def test_photo_pixel_size_is_flagged(tmp_path):
    volume = photo(np.zeros((1, 8, 8), np.uint8))
    volume.meta["image_kind"] = "2d"
    assert "1 mm assumed" in preview.pixel_size_note(volume)


@pytest.mark.parametrize("shape,spacing", [((1, 388, 400), (0.001, 1.0, 1.0)),  # i, j, k
                                           ((1, 388, 400), (1.0, 1.0, 0.001)),
                                           ((1, 388, 400), (1.0, 0.001, 1.0)),
                                           ((2, 388, 400), (1.0, 1.0, 0.001)),
                                           ((3, 388, 400), (1.0, 1.0, 500.0))])
def test_size_is_capped_whatever_the_spacing(tmp_path, shape, spacing):
    array = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    mask = np.zeros(shape, bool)
    mask[:, 100:200, 100:200] = True
    png = render(tmp_path, Volume(array, affine(np.eye(3), spacing)), [Segment("s", mask, (1, 0, 0))])
    assert max(png.shape[:2]) <= MAX_SIDE and min(png.shape[:2]) >= 100


def test_many_segments_keep_the_height_capped(tmp_path):
    masks = np.zeros((150, 4, 32, 32), bool)
    for n in range(150):
        masks[n, :, n % 32, :] = True
    segs = [Segment(f"label {n}", masks[n]) for n in range(150)]  # no colours: the palette's
    png = render(tmp_path, Volume(np.zeros((4, 32, 32), np.int16), np.eye(4)), segs)
    assert max(png.shape[:2]) <= MAX_SIDE


def test_colin27_preview(tmp_path, colin_path):
    volume = read_volume(colin_path)
    png = render(tmp_path, volume, [Segment("bright", volume.array > np.percentile(volume.array, 80))])
    assert png.shape[0] < 500 and png.shape[1] <= MAX_SIDE
    assert png[..., 0].std() > 30  # a readable image, not a flat one
