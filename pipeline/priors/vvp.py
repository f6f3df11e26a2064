"""Visual-visual prior (VVP): how much each query position looks like the masked support.

Support token features are multiplied by the support mask at the token grid; every query
position takes its maximum cosine similarity over the support positions; each map is then
min-max normalised (as FSS priors are). One map per block and shot, or the shots' mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.core.tensors import minmax


def vvp(query: torch.Tensor, support: torch.Tensor, support_mask: torch.Tensor,
        grid: tuple[int, int]) -> torch.Tensor:
    """VVP maps.

    Args:
        query: ``(B, N, D)`` query token features.
        support: ``(B, K, N, D)`` support token features (K shots).
        support_mask: ``(B, K, N)`` support masks at the token grid, in [0, 1].
        grid: ``(h, w)`` with ``h * w = N``.

    Returns:
        ``(B, K, h, w)`` in [0, 1]; a shot whose mask is empty gives 0 everywhere.
    """
    q = F.normalize(query.float(), dim=-1)
    s = F.normalize(support.float() * support_mask[..., None].float(), dim=-1)  # zero stays zero
    best = torch.einsum("bnd,bkmd->bknm", q, s).amax(-1)
    return minmax(best.view(*best.shape[:2], *grid))
