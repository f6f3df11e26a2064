"""Prior information refinement (PIR): VTP propagated by a high-order attention matrix.

With Ā the ``(N, N)`` affinity (CLS dropped): ``T = row_norm(col_norm(Ā))``,
``T_h = max(T, T Tᵀ)``, ``T* = T_h T_h``; only the columns inside the bounding boxes of the
connected regions of the thresholded VTP are kept (8-connected, as PI-CLIP's ``cv2.findContours``
on the thresholded CAM), and the refined VTP is ``T* vec(VTP)``, scaled to [0, 1].

The boxes (``priors.box``): ``exact`` — regions of ``VTP >= threshold * max``, each box whole;
``pi-clip`` — as PI-CLIP's ``scoremap2bbox``: the map copied to uint8 (``floor(255 x)``), regions of
``u8 > floor(threshold * max(u8))``, and each box's exclusive end clipped to ``W - 1`` / ``H - 1``
(a box reaching the last column or row loses it). The scaling (``priors.cam_scale``): ``minmax`` or
``pi-clip`` (:func:`pipeline.core.tensors.scale_cam`).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from pipeline.core.tensors import CamScale, scale_maps

EPS = 1e-12  # smallest column / row sum divided by
BoxRule = Literal["pi-clip", "exact"]


def high_order_affinity(affinity: torch.Tensor) -> torch.Tensor:
    """``(B, N, N)`` non-negative affinity -> ``(B, N, N)`` ``T*``."""
    t = affinity.float()
    t = t / t.sum(1, keepdim=True).clamp(min=EPS)  # columns sum to 1
    t = t / t.sum(2, keepdim=True).clamp(min=EPS)  # then rows
    t_h = torch.maximum(t, t @ t.transpose(1, 2))
    return t_h @ t_h


def above_threshold(maps: torch.Tensor, threshold: float, rule: BoxRule = "exact") -> torch.Tensor:
    """``(P, h, w)`` bool: ``exact``: ``map >= threshold * max``; ``pi-clip``: on the uint8 copy
    ``u8 = floor(255 map)``, ``u8 > floor(threshold * max(u8))`` (strict, integer threshold)."""
    p = maps.shape[0]
    if rule == "exact":
        return maps >= threshold * maps.flatten(1).amax(1).view(p, 1, 1)
    u8 = (maps.float() * 255).to(torch.uint8).long()  # truncation, as numpy's astype(uint8)
    cut = (threshold * u8.flatten(1).amax(1).double()).floor().long()  # int(threshold * max), in float64
    return u8 > cut.view(p, 1, 1)


def box_mask(maps: torch.Tensor, threshold: float, rule: BoxRule = "exact") -> torch.Tensor:
    """``(P, h, w)`` maps -> ``(P, h, w)`` bool: the union of the bounding boxes of the
    connected regions (8-connected: diagonal neighbours join) of :func:`above_threshold`; under
    ``rule="pi-clip"`` each box's exclusive end is clipped to ``w - 1`` / ``h - 1`` (PI-CLIP's
    ``scoremap2bbox``).

    Vectorised over maps, on their device: regions by label propagation (every cell of a region
    ends with the region's largest flat index), boxes by scatter min/max, their union by a 2-D
    prefix sum of box corners.
    """
    p, h, w = maps.shape
    on = above_threshold(maps, threshold, rule)
    label = torch.where(on, torch.arange(1, h * w + 1, device=maps.device).view(1, h, w), 0)
    while True:
        pad = F.pad(label, (1, 1, 1, 1))
        neighbours = [pad[:, 1 + dy : h + 1 + dy, 1 + dx : w + 1 + dx]
                      for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
        spread = torch.stack([label, *neighbours])
        grown = torch.where(on, spread.amax(0), 0)
        if torch.equal(grown, label):
            break
        label = grown
    flat = label.flatten(1)  # (P, N), 0 = outside every region
    rows = torch.arange(h, device=maps.device).repeat_interleave(w).expand(p, -1)
    cols = torch.arange(w, device=maps.device).repeat(h).expand(p, -1)

    def reduce(values: torch.Tensor, how: str, start: int) -> torch.Tensor:
        init = torch.full((p, h * w + 1), start, device=maps.device, dtype=torch.long)
        return init.scatter_reduce(1, flat, values, how)

    top, bottom = reduce(rows, "amin", h), reduce(rows, "amax", -1) + 1
    left, right = reduce(cols, "amin", w), reduce(cols, "amax", -1) + 1
    if rule == "pi-clip":  # x1 = min(x + w, W - 1): the box ends before the last column / row
        bottom, right = bottom.clamp(max=h - 1), right.clamp(max=w - 1)
    present = (bottom > 0).float()
    present[:, 0] = 0  # label 0 is the outside
    corners = torch.zeros(p, (h + 1) * (w + 1), device=maps.device)
    for r, c, sign in ((top, left, 1), (top, right, -1), (bottom, left, -1), (bottom, right, 1)):
        corners.scatter_add_(1, r * (w + 1) + c, sign * present)
    return corners.view(p, h + 1, w + 1).cumsum(1).cumsum(2)[:, :h, :w] > 0.5


def refine(t_star: torch.Tensor, vtp: torch.Tensor, *, threshold: float, box: BoxRule = "exact",
           scale: CamScale = "minmax") -> torch.Tensor:
    """Refined VTP.

    Args:
        t_star: ``(P, N, N)`` each pair's image's :func:`high_order_affinity`.
        vtp: ``(P, h, w)`` with ``h * w = N``.
        box: :func:`box_mask`'s rule; scale: :func:`pipeline.core.tensors.scale_maps`'s.

    Returns:
        ``(P, h, w)`` in [0, 1].
    """
    kept = vtp.float() * box_mask(vtp, threshold, box)
    return scale_maps((t_star @ kept.flatten(1)[..., None]).view_as(vtp), scale)
