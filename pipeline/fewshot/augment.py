"""Views of an image as affine maps, applied alike to the image, its label and its stored
per-image priors: the papers' training augmentation, and the letterboxed input of the PFENet /
PI-CLIP evaluation protocol (:func:`letterbox_views`).

PFENet / HSNet / PI-CLIP train on random scale (0.9-1.1 on PASCAL, 0.8-1.25 on COCO), rotation
(±10°), horizontal flip and a 473-px crop. Here an image enters the backbone squashed to
``S × S`` (as the stored features do), so a view is an affine map of the image plane: zoom by the
scale, rotate about the centre, flip, then shift so that the ``S × S`` window (the crop) stays
inside the zoomed image. It is drawn in the image's own pixel geometry (a rotation stays a
rotation of a non-square image) and applied in normalised coordinates ``[-1, 1]²``, which
every map of the image shares whatever its resolution: the normalised image, the label
(nearest, outside = 255 ignore), and the priors on the CLIP grid (VTP, PIR, MaskCLIP scores, the
VVP tokens as ``D`` channels). So priors are computed once per image and still follow the view.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pipeline.core.metrics import IGNORE


def random_views(
    generator: torch.Generator, sizes: list[tuple[int, int]], scale: tuple[float, float], rotate: float,
    flip: bool = True,
) -> torch.Tensor:
    """``(B, 2, 3)`` affine maps (``F.affine_grid``'s: output -> input, normalised coordinates),
    one random view per image of ``sizes`` ``(H, W)``."""
    thetas = []
    for height, width in sizes:
        s = float(torch.empty(()).uniform_(*scale, generator=generator))
        angle = math.radians(float(torch.empty(()).uniform_(-rotate, rotate, generator=generator)))
        mirror = -1.0 if flip and bool(torch.rand((), generator=generator) < 0.5) else 1.0
        # output pixel offset from the centre (u, v) -> input offset: R(-angle) (u, v) / s, in pixels;
        # normalised x = 2 u / W, y = 2 v / H, so the map in normalised coordinates is D R D^-1 / s
        cos, sin = math.cos(angle), math.sin(angle)
        linear = torch.tensor([[cos * mirror, -sin * height / width],
                               [sin * width / height * mirror, cos]]) / s
        # the window may move by what the zoom leaves over on each side (none when zoomed out)
        slack = max(0.0, 1 - 1 / s)
        shift = (torch.rand(2, generator=generator) * 2 - 1) * slack
        thetas.append(torch.cat([linear, shift[:, None]], 1))
    return torch.stack(thetas)


def letterbox_views(sizes: list[tuple[int, int]]) -> torch.Tensor:
    """``(B, 2, 3)`` views that show each image of ``sizes`` ``(H, W)`` with its own aspect ratio,
    its longer side filling the square canvas and the image at the top left (the rest: padding),
    as PFENet's and PI-CLIP's test transform does."""
    thetas = []
    for height, width in sizes:
        across, down = width / max(height, width), height / max(height, width)  # image share of the canvas
        thetas.append(torch.tensor([[1 / across, 0.0, 1 / across - 1], [0.0, 1 / down, 1 / down - 1]]))
    return torch.stack(thetas)


def warp(
    maps: torch.Tensor, theta: torch.Tensor, size: tuple[int, int], mode: str = "bilinear"
) -> torch.Tensor:
    """``(B, C, h, w)`` maps seen through the views ``theta`` ``(B, 2, 3)`` at ``size``; outside
    the image: 0 (for a normalised image: the mean colour, as the papers pad)."""
    grid = F.affine_grid(theta.to(maps.dtype), [maps.shape[0], maps.shape[1], *size], align_corners=False)
    return F.grid_sample(maps, grid, mode=mode, padding_mode="zeros", align_corners=False)


def warp_labels(labels: list[torch.Tensor], theta: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Label maps ``(H_i, W_i)`` (each its own size) seen through ``theta`` -> ``(B, *size)``
    uint8, nearest; outside the image: ``IGNORE``."""
    out = []
    for label, view in zip(labels, theta, strict=True):
        plane = torch.stack([label.float(), torch.ones_like(label, dtype=torch.float32)])[None]
        seen = warp(plane, view[None], size, mode="nearest")[0]
        out.append(torch.where(seen[1] > 0.5, seen[0], float(IGNORE)).to(torch.uint8))
    return torch.stack(out)
