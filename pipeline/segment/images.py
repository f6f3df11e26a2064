"""Users' images as ``lfss-segment`` reads them: upright and 8-bit RGB, whatever the file holds.

Every image file the segmenter reads (queries, supports, support masks, and the pictures its
overlays are drawn on) goes through :func:`read_image`, so the masks, the overlays and the sizes
in ``summary.json`` are all in the orientation a browser shows the file in:

* **EXIF orientation** is applied (:func:`PIL.ImageOps.exif_transpose`): a phone photo stored
  sideways with an orientation tag is segmented upright. The dataset readers of the stages
  (:mod:`pipeline.core.images`) deliberately do not do this: the reference code reads PASCAL and
  COCO JPEGs as stored, and their masks are in the stored orientation (docs/segment.md).
* **Every mode Pillow opens** becomes 8-bit RGB (:func:`to_rgb`): 16-bit grayscale is scaled to
  8 bits (Pillow's own conversion clips it, so a 16-bit photo turned all white); a palette image,
  CMYK, YCbCr, LAB, HSV and 1-bit images take Pillow's conversion; transparency (an alpha channel
  or a palette's or a PNG's transparent colour) is composited onto white, as the gallery page
  shows the picture.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

#: The background transparent pixels are composited onto (the gallery page's).
BACKGROUND = 255.0


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` of any mode as 8-bit RGB, its pixels scaled, not clipped.

    * ``I;16``, ``I;16B``, ``I;16L``, ``I;16N`` (16-bit grayscale): ``round(v / 257)``, so 0..65535
      maps onto 0..255 (white stays white, a dark 16-bit photo stays dark).
    * ``I`` (32-bit integers) and ``F`` (32-bit floats) have no white level of their own: the
      smallest of the ranges [0, 1] (floats only), [0, 255], [0, 65535] that holds every value is
      taken as black..white; values outside all three (negative ones, say) are stretched from
      their minimum to their maximum. NaN counts as 0.
    * With transparency (``RGBA``, ``LA``, ``PA``, a ``P``/``L``/``RGB`` image with a transparent
      colour): composited onto white, ``round((c * a + 255 * (255 - a)) / 255)``.
    * Any other mode (``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``): Pillow's
      conversion (an embedded ICC profile is not applied).
    """
    mode = image.mode
    if mode.startswith("I;16"):
        return _gray(np.asarray(image).astype(np.float64) / 257.0)
    if mode in ("I", "F"):
        return _gray(_white_level(np.nan_to_num(np.asarray(image, dtype=np.float64)), mode == "F"))
    if "A" in mode or "a" in mode or "transparency" in image.info:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float64)
        alpha = rgba[..., 3:]
        out = (rgba[..., :3] * alpha + BACKGROUND * (255.0 - alpha)) / 255.0
        return Image.fromarray(np.rint(out).astype(np.uint8), "RGB")
    return image if mode == "RGB" else image.convert("RGB")


def _white_level(values: np.ndarray, floats: bool) -> np.ndarray:
    """``values`` of an ``I`` or ``F`` image on a 0..255 scale (:func:`to_rgb`)."""
    if values.size == 0:
        return values
    lo, hi = float(values.min()), float(values.max())
    if lo >= 0:
        for top in ((1.0,) if floats else ()) + (255.0, 65535.0):
            if hi <= top:
                return values * (255.0 / top)
    if hi == lo:
        return np.zeros_like(values)
    return (values - lo) * (255.0 / (hi - lo))


def _gray(values: np.ndarray) -> Image.Image:
    """An RGB image of the 0..255 grey levels ``values`` ``(H, W)`` (rounded, clipped)."""
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L").convert("RGB")


#: What decoding a damaged or hostile file may raise (each becomes one line).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, struct.error, Image.DecompressionBombError)


def upright(image: Image.Image) -> Image.Image:
    """``image`` as a browser shows it: its EXIF orientation applied (unchanged without one)."""
    return ImageOps.exif_transpose(image)


def read_image(path: str | Path) -> Image.Image:
    """The image file ``path`` decoded in full, upright (:func:`upright`) and 8-bit RGB
    (:func:`to_rgb`); a ``(H, W)`` picture of ``size == (W, H)`` as shown. An unreadable file
    raises the decoder's error (:data:`DECODE_ERRORS`)."""
    with Image.open(path) as image:
        image.load()
        return to_rgb(upright(image))


def stored_orientation(path: str | Path) -> int:
    """The EXIF orientation tag of ``path`` (1..8; 1 when there is none or it cannot be read)."""
    try:
        with Image.open(path) as image:
            return int(image.getexif().get(0x0112, 1) or 1)
    except (*DECODE_ERRORS, TypeError):
        return 1
