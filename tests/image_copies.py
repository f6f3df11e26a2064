"""Converted copies of an 8-bit RGB picture as users' files come: 16-bit and float grayscale,
palette (with and without a transparent colour), CMYK, alpha, EXIF-rotated. Each copy comes with
the 8-bit RGB picture it must read as, upright, worked out here with numpy (not with Pillow's
conversion, which is what is under test).

A test module imports these (``from tests.image_copies import ...``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

#: Per EXIF orientation 1..8, the stored ``(H', W', ...)`` array of an upright ``(H, W, ...)`` one
#: (from the tag's definition: where the stored 0th row and 0th column are shown).
STORED: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    1: lambda d: d,
    2: lambda d: d[:, ::-1],  # 0th row top, 0th column right
    3: lambda d: d[::-1, ::-1],  # bottom, right
    4: lambda d: d[::-1],  # bottom, left
    5: lambda d: d.swapaxes(0, 1),  # left, top
    6: lambda d: np.rot90(d, 1),  # right, top: a phone held upright, its sensor turned
    7: lambda d: d[::-1, ::-1].swapaxes(0, 1),  # right, bottom
    8: lambda d: np.rot90(d, -1),  # left, bottom
}
#: The inverse: the upright array of a stored one.
UPRIGHT: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    1: lambda s: s,
    2: lambda s: s[:, ::-1],
    3: lambda s: s[::-1, ::-1],
    4: lambda s: s[::-1],
    5: lambda s: s.swapaxes(0, 1),
    6: lambda s: np.rot90(s, -1),
    7: lambda s: s.swapaxes(0, 1)[::-1, ::-1],
    8: lambda s: np.rot90(s, 1),
}


def gray_rgb(gray: np.ndarray) -> np.ndarray:
    """``(H, W)`` uint8 grey levels as ``(H, W, 3)`` RGB."""
    return np.repeat(gray[..., None], 3, axis=2)


def on_white(color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``(H, W, C)`` colours with ``(H, W)`` alpha composited onto white, as uint8:
    ``round((c * a + 255 * (255 - a)) / 255)``."""
    a = alpha.astype(np.float64)[..., None]
    return np.rint((color.astype(np.float64) * a + 255.0 * (255.0 - a)) / 255.0).astype(np.uint8)


def alpha_ramp(h: int, w: int) -> np.ndarray:
    """``(H, W)`` uint8 alpha: transparent left quarter, opaque right half, a ramp between."""
    x = np.linspace(-1.0, 3.0, w)
    return np.broadcast_to(np.clip(np.rint(x * 255), 0, 255).astype(np.uint8), (h, w)).copy()


def exif(orientation: int) -> Image.Exif:
    tags = Image.Exif()
    tags[0x0112] = orientation
    return tags


def gray_copies(gray: np.ndarray, folder: Path) -> dict[str, tuple[Path, np.ndarray]]:
    """16-bit and float copies of the 8-bit grey picture ``gray`` ``(H, W)``, each with the RGB it
    must read as (the grey levels themselves: every copy spans its full range at the same
    levels)."""
    folder.mkdir(parents=True, exist_ok=True)
    want = gray_rgb(gray)
    wide = gray.astype(np.uint32) * 257  # 0..255 -> 0..65535
    made = {
        "I;16.png": Image.fromarray(wide.astype(np.uint16)),
        "I;16B.tif": Image.fromarray(wide.astype(">u2")),
        "I.tif": Image.fromarray(wide.astype(np.int32)),
        "F.tif": Image.fromarray((gray / np.float32(255)).astype(np.float32)),
    }
    out = {}
    for name, image in made.items():
        path = folder / name
        image.save(path)
        assert Image.open(path).mode == name.split(".")[0], (name, Image.open(path).mode)
        out[name] = (path, want)
    return out


def color_copies(rgb: np.ndarray, folder: Path) -> dict[str, tuple[Path, np.ndarray]]:
    """Palette (with and without a transparent colour), CMYK, RGBA, LA and EXIF-rotated copies of
    the 8-bit RGB picture ``rgb`` ``(H, W, 3)``, each with the RGB it must read as."""
    folder.mkdir(parents=True, exist_ok=True)
    h, w = rgb.shape[:2]
    out: dict[str, tuple[Path, np.ndarray]] = {}

    def save(name: str, image: Image.Image, want: np.ndarray, mode: str, **kwargs) -> None:
        path = folder / name
        image.save(path, **kwargs)
        assert Image.open(path).mode == mode, (name, Image.open(path).mode)
        out[name] = (path, want)

    palette_image = Image.fromarray(rgb).quantize(64)
    index = np.asarray(palette_image)
    palette = np.asarray(palette_image.getpalette()[: 3 * 256], np.uint8).reshape(-1, 3)
    colors = palette[index]
    save("P.png", palette_image, colors, "P")
    clear = int(index[h // 2, w // 2])  # a colour of the middle: it goes white
    transparent = palette_image.copy()
    transparent.info["transparency"] = clear
    save("P-transparent.png", transparent, np.where((index == clear)[..., None], np.uint8(255), colors), "P",
         transparency=clear)
    cmyk = np.concatenate([255 - rgb, np.zeros((h, w, 1), np.uint8)], axis=2)
    save("CMYK.tif", Image.fromarray(cmyk, "CMYK"), rgb, "CMYK")
    alpha = alpha_ramp(h, w)
    save("RGBA.png", Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), on_white(rgb, alpha), "RGBA")
    save("RGBA-opaque.png", Image.fromarray(np.dstack([rgb, np.full((h, w), 255, np.uint8)]), "RGBA"),
         rgb, "RGBA")
    gray = np.asarray(Image.fromarray(rgb).convert("L"))
    save("LA.png", Image.fromarray(np.dstack([gray, alpha]), "LA"), on_white(gray_rgb(gray), alpha), "LA")
    for orientation in (3, 6, 8):
        save(f"exif{orientation}.png", Image.fromarray(np.ascontiguousarray(STORED[orientation](rgb))), rgb,
             "RGB", exif=exif(orientation))
    # a phone photo: a JPEG stored sideways; it must read as its decoded pixels turned upright
    path = folder / "exif6.jpg"
    Image.fromarray(np.ascontiguousarray(STORED[6](rgb))).save(path, quality=95, exif=exif(6))
    out["exif6.jpg"] = (path, np.ascontiguousarray(UPRIGHT[6](np.asarray(Image.open(path)))))
    return out
