"""Prior information refinement (PIR): VTP propagated by a high-order attention matrix.

With Ā the ``(N, N)`` affinity (CLS dropped): ``T = row_norm(col_norm(Ā))``,
``T_h = max(T, T Tᵀ)``, ``T* = T_h T_h``; only the columns inside the bounding boxes of the
connected regions of ``VTP >= threshold * max`` are kept, and the refined VTP is
``T* vec(VTP)``, min-max normalised.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

EPS = 1e-12


def high_order_affinity(affinity: torch.Tensor) -> torch.Tensor:
    """``(B, N, N)`` non-negative affinity -> ``(B, N, N)`` ``T*``."""
    t = affinity.float()
    t = t / t.sum(1, keepdim=True).clamp(min=EPS)  # columns sum to 1
    t = t / t.sum(2, keepdim=True).clamp(min=EPS)  # then rows
    t_h = torch.maximum(t, t @ t.transpose(1, 2))
    return t_h @ t_h


def box_mask(maps: torch.Tensor, threshold: float) -> torch.Tensor:
    """``(P, h, w)`` maps -> ``(P, h, w)`` bool: the union of the bounding boxes of the
    connected regions (4-connected) where a map is at least ``threshold`` times its max."""
    values = maps.detach().float().cpu().numpy()
    out = np.zeros(values.shape, bool)
    for p, m in enumerate(values):
        regions, _ = ndimage.label(m >= threshold * m.max())
        for box in ndimage.find_objects(regions):
            out[p][box] = True
    return torch.from_numpy(out).to(maps.device)


def minmax(maps: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each ``(..., h, w)`` map to [0, 1] (a constant map becomes 0)."""
    flat = maps.flatten(-2)
    low, high = flat.amin(-1, keepdim=True), flat.amax(-1, keepdim=True)
    return ((flat - low) / (high - low).clamp(min=EPS)).view_as(maps)


def refine(t_star: torch.Tensor, vtp: torch.Tensor, threshold: float = 0.4) -> torch.Tensor:
    """Refined VTP.

    Args:
        t_star: ``(P, N, N)`` each pair's image's :func:`high_order_affinity`.
        vtp: ``(P, h, w)`` with ``h * w = N``.

    Returns:
        ``(P, h, w)`` in [0, 1].
    """
    kept = vtp.float() * box_mask(vtp, threshold)
    return minmax((t_star @ kept.flatten(1)[..., None]).view_as(vtp))
