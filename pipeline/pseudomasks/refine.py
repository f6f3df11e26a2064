"""Language-guided pseudo-masks (LFSS VLMD, Eqs. 2-5): MaskCLIP distillation and the
self-supported refiner, batched over episodes.

* Initial mask of class c: the MaskCLIP label map equals c (optionally also VTP above a
  threshold).
* Refiner: with backbone features F and initial masks M (at the feature grid, as the fraction
  of each cell inside the mask), foreground prototypes by masked average pooling of the
  supports and of the query, mixed as ``P_m = α P_s + (1 − α) P_q``; background prototypes per
  image and position, ``softmax(F_b Fᵀ) F_b`` with ``F_b = F ⊙ (1 − M)``; every pixel goes to
  the foreground where its cosine with ``P_m`` beats its cosine with its background prototype
  (cosine maps upsampled bilinearly to the mask size first).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.core.tensors import cosine, mask_to_grid, masked_average_pooling, unit


def initial_masks(
    labels: torch.Tensor, classes: torch.Tensor, vtp: torch.Tensor | None, *, vtp_threshold: float | None
) -> torch.Tensor:
    """``(B, H, W)`` MaskCLIP label maps (class ids) and ``(B,)`` classes -> ``(B, H, W)`` bool;
    with ``vtp`` ``(B, h, w)`` and a ``vtp_threshold``, also require VTP (upsampled bilinearly)
    >= ``vtp_threshold``."""
    masks = labels == classes.view(-1, 1, 1)
    if vtp is not None and vtp_threshold is not None:
        up = F.interpolate(vtp[:, None].float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
        masks &= up[:, 0] >= vtp_threshold
    return masks


def background_prototypes(
    feats: torch.Tensor, masks: torch.Tensor, temperature: float | None
) -> torch.Tensor:
    """Eq. 4: ``softmax(F_b Fᵀ) F_b`` per image and position, ``F_b = F ⊙ (1 − M)``.

    ``(B, C, h, w)``, ``(B, h, w)`` -> ``(B, C, h, w)``. With ``temperature`` the logits are
    cosines divided by it instead of dot products: with unnormalised features (ViT tokens) a
    few large-norm positions win every softmax, and a background position that attends to a
    masked one gets a zero prototype and flips to foreground.
    """
    f = feats.flatten(2).transpose(1, 2)  # (B, N, C)
    keep = 1 - masks.float().flatten(1)[..., None]  # (B, N, 1)
    f_b = f * keep
    if temperature is None:
        logits = f_b @ f.transpose(1, 2)
    else:
        units = unit(feats, 1).flatten(2).transpose(1, 2)
        logits = (units * (keep > 0)) @ units.transpose(1, 2) / temperature  # scaling keeps a direction
    attention = logits.softmax(-1)  # (B, N, N)
    return (attention @ f_b).transpose(1, 2).reshape(feats.shape)


def background_similarity(
    feats: torch.Tensor, grids: torch.Tensor, temperature: float | None
) -> torch.Tensor:
    """``(P, C, h, w)`` features and ``(P, h, w)`` mask grids -> ``(P, h, w)`` cosine of each cell with
    its background prototype. It depends on the image and its own mask only, so an (image, class)
    pair shared by many episodes needs it once."""
    return cosine(feats, background_prototypes(feats, grids, temperature), dim=1)


def refine_masks(
    support_feats: torch.Tensor, support_masks: torch.Tensor, query_feats: torch.Tensor,
    query_masks: torch.Tensor, *, alpha: float, temperature: float | None,
    background: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-supported refinement of B episodes with K shots.

    Args:
        support_feats: ``(B, K, C, h, w)``; support_masks: ``(B, K, H, W)`` initial masks.
        query_feats: ``(B, C, h, w)``; query_masks: ``(B, H, W)``.
        alpha: weight of the support prototype in ``P_m`` (Eq. 3).
        temperature: cosine attention for the background prototypes (None: Eq. 4's dot product).
        background: ``(B*K + B, h, w)`` :func:`background_similarity` of the supports then the
            queries, when already computed; else computed here.

    Returns:
        refined support masks ``(B, K, H, W)`` and query masks ``(B, H, W)``, bool.
    """
    b, k, c, h, w = support_feats.shape
    size = query_masks.shape[-2:]
    s_grid = mask_to_grid(support_masks, (h, w))  # (B, K, h, w)
    q_grid = mask_to_grid(query_masks, (h, w))
    s_flat = support_feats.transpose(1, 2).reshape(b, c, k * h, w)  # all shots' pixels together
    p_s = masked_average_pooling(s_flat, s_grid.reshape(b, k * h, w))
    p_m = alpha * p_s + (1 - alpha) * masked_average_pooling(query_feats, q_grid)  # (B, C)
    feats = torch.cat([support_feats.reshape(b * k, c, h, w), query_feats])
    prototypes = torch.cat([p_m.repeat_interleave(k, 0), p_m])[..., None, None]
    fg = cosine(feats, prototypes, dim=1)
    if background is None:
        grids = torch.cat([s_grid.reshape(b * k, h, w), q_grid])
        background = background_similarity(feats, grids, temperature)
    # bilinear upsampling is linear: comparing the upsampled maps = the sign of the upsampled difference
    up = F.interpolate((fg - background)[:, None], size=size, mode="bilinear", align_corners=False)
    refined = up[:, 0] > 0
    return refined[: b * k].view(b, k, *size), refined[b * k:]
