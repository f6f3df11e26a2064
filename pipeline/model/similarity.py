"""Unit vectors and cosines along one dimension, written out: for ``(B, C, h, w)`` maps they are
several times faster on the CPU than ``F.normalize`` / ``F.cosine_similarity`` over ``dim=1``
(measured 0.25 vs 1.7 ms for 16 × 192 × 16 × 16), and every guidance map is a few of them.
A zero vector stays zero (its norm is clamped to ``EPS``), as in ``F.cosine_similarity``."""

from __future__ import annotations

import torch

EPS = 1e-6


def unit(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x`` divided by its L2 norm along ``dim`` (clamped to ``EPS``)."""
    return x * x.square().sum(dim, keepdim=True).clamp(min=EPS**2).rsqrt()


def cosine(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
    """Cosine similarity of broadcastable ``a`` and ``b`` along ``dim`` (which is removed)."""
    return (unit(a, dim) * unit(b, dim)).sum(dim)
