"""Complementary correlation matching (LFSS Eqs. 13-17), batched over episodes.

``A = softmax(cos(F_q ⊙ M_q, F_s ⊙ M_s) / τ)`` over support cells (Eq. 13; τ = 1 is the
paper's). Each support cell's weight is its attention averaged over the masked query cells (all
query cells when the query mask is empty); the attended prototype ``P_a`` pools the masked
support features with these weights (Eq. 14). RCM is the cosine of ``P_a`` with the masked
query features (Eq. 15), FCM with all of them (Eq. 16).
"""

from __future__ import annotations

import torch

from pipeline.core.tensors import EPS, cosine, unit


def attended_prototype(
    query: torch.Tensor,
    query_mask: torch.Tensor,
    support: torch.Tensor,
    support_mask: torch.Tensor,
    *,
    temperature: float,
) -> torch.Tensor:
    """Eqs. 13-14. ``(B, C, h, w)`` features and ``(B, h, w)`` masks in [0, 1] -> ``(B, C)``."""
    q = unit(query * query_mask[:, None], 1).flatten(2).transpose(1, 2)  # (B, Nq, C)
    masked = support * support_mask[:, None]
    s = unit(masked, 1).flatten(2)  # (B, C, Ns)
    attention = (q @ s / temperature).softmax(-1)  # (B, Nq, Ns)
    rows = query_mask.flatten(1)
    rows = torch.where(rows.sum(1, keepdim=True) > 0, rows, torch.ones_like(rows))
    weights = torch.einsum("bq,bqs->bs", rows, attention) / rows.sum(1, keepdim=True)  # (B, Ns)
    return torch.einsum("bs,bcs->bc", weights, masked.flatten(2)) / support_mask.flatten(1).sum(
        1, keepdim=True
    ).clamp(min=EPS)


def correlation_maps(query: torch.Tensor, query_mask: torch.Tensor, prototype: torch.Tensor) -> torch.Tensor:
    """Eqs. 15-17: ``(B, C, h, w)``, ``(B, h, w)``, ``(B, C)`` -> ``(B, 2, h, w)`` [RCM, FCM]."""
    p = prototype[..., None, None]
    fcm = cosine(query, p, dim=1)
    rcm = fcm * (query_mask > 0)  # masking scales a feature, so its cosine survives where the mask is > 0
    return torch.stack([rcm, fcm], 1)
