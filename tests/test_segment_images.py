"""Users' images as ``lfss-segment`` reads them (:mod:`pipeline.segment.images`): any mode Pillow
opens becomes the 8-bit RGB picture it shows (16-bit scaled, not clipped; transparency on white),
upright by its EXIF orientation. Each converted copy is compared with the picture worked out with
numpy (``tests/image_copies.py``); the segmenter's masks on such copies: ``tests/test_segment.py``."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.segment.images import read_image, to_rgb
from tests.image_copies import STORED, UPRIGHT, color_copies, exif, gray_copies, gray_rgb


def picture(h: int = 24, w: int = 40, seed: int = 0) -> np.ndarray:
    """An ``(H, W, 3)`` uint8 picture with every grey level 0..255 among its pixels (when it has 256)."""
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    n = min(256, h * w)
    rgb.reshape(-1, 3)[:n] = np.arange(256, dtype=np.uint8)[:n, None]
    return rgb


@pytest.mark.parametrize("orientation", range(1, 9))
def test_the_orientation_tables_are_inverses(orientation):
    d = picture(5, 7)
    stored = STORED[orientation](d)
    assert stored.shape[:2] == ((7, 5) if orientation > 4 else (5, 7))
    assert np.array_equal(UPRIGHT[orientation](stored), d)


def test_16_bit_and_float_grey_is_scaled_not_clipped(tmp_path):
    gray = picture()[..., 0]
    for name, (path, want) in gray_copies(gray, tmp_path).items():
        got = np.asarray(read_image(path))
        assert got.dtype == np.uint8 and np.array_equal(got, want), name
        clipped = np.asarray(Image.open(path).convert("RGB"))  # Pillow's own conversion
        assert not np.array_equal(clipped, want), name


def test_a_dark_16_bit_picture_stays_dark_and_odd_ranges_are_stretched():
    dark = Image.fromarray(np.array([[0, 1000, 2000, 65535]], np.uint16))
    assert np.asarray(to_rgb(dark))[0, :, 0].tolist() == [0, 4, 8, 255]  # round(v / 257)
    ints = Image.fromarray(np.array([[0, 100, 255]], np.int32))  # within 0..255: as it is
    assert np.asarray(to_rgb(ints))[0, :, 0].tolist() == [0, 100, 255]
    floats = Image.fromarray(np.array([[0, 0.5, 1]], np.float32))  # within 0..1: times 255
    assert np.asarray(to_rgb(floats))[0, :, 0].tolist() == [0, 128, 255]
    signed = Image.fromarray(np.array([[-10, 0, 10]], np.float32))  # outside: min..max
    assert np.asarray(to_rgb(signed))[0, :, 0].tolist() == [0, 128, 255]
    flat = Image.fromarray(np.full((2, 2), -5, np.int32))
    assert np.asarray(to_rgb(flat)).max() == 0
    nan = Image.fromarray(np.array([[np.nan, 1.0]], np.float32))
    assert np.asarray(to_rgb(nan))[0, :, 0].tolist() == [0, 255]


def test_palette_cmyk_and_alpha_read_as_shown(tmp_path):
    rgb = picture()
    copies = color_copies(rgb, tmp_path)
    for name, (path, want) in copies.items():
        got = np.asarray(read_image(path))
        assert got.dtype == np.uint8 and got.shape == want.shape and np.array_equal(got, want), name
    # what the alpha or transparent colour hid is not shown (Pillow's own conversion shows it)
    for name in ("RGBA.png", "LA.png", "P-transparent.png"):
        path, want = copies[name]
        assert not np.array_equal(np.asarray(Image.open(path).convert("RGB")), want), name


def test_every_exif_orientation_reads_upright(tmp_path):
    rgb = picture(6, 10)
    for orientation in range(1, 9):
        path = tmp_path / f"o{orientation}.png"
        Image.fromarray(np.ascontiguousarray(STORED[orientation](rgb))).save(path, exif=exif(orientation))
        assert np.array_equal(np.asarray(read_image(path)), rgb), orientation


def test_exif_orientation_and_modes_combine(tmp_path):
    """A 16-bit picture and a transparent one, each stored sideways: scaled or composited, upright."""
    gray = picture(6, 10)[..., 0]
    wide = Image.fromarray(np.ascontiguousarray(STORED[6](gray)).astype(np.uint16) * 257)
    wide.save(tmp_path / "wide.png", exif=exif(6))
    assert np.array_equal(np.asarray(read_image(tmp_path / "wide.png")), gray_rgb(gray))
    palette = Image.fromarray(np.ascontiguousarray(STORED[8](gray))).convert("P")
    palette.save(tmp_path / "p.png", transparency=int(gray[0, 0]), exif=exif(8))
    want = np.where((gray == gray[0, 0])[..., None], np.uint8(255), gray_rgb(gray))
    assert np.array_equal(np.asarray(read_image(tmp_path / "p.png")), want)
