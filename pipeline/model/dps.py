"""Distributed prototype supervision (LFSS Eqs. 6-12), batched over episodes.

1. :func:`place_seeds` — ``N_sp`` seeds inside the support mask, each the mask cell farthest
   (Euclidean) from the background, the image border and the earlier seeds (Eq. 6).
2. :func:`rectify_seeds` — each seed moves to the cell of its ``n × n`` window whose feature is
   most similar (cosine) to the query prototype (Eqs. 7-8).
3. :func:`cluster` — soft clustering of the foreground features with their coordinates
   appended: ``C = exp(-Q)``, ``Q = sqrt(d_f² + (d_s / r)²)`` (Eqs. 9-11).
4. :func:`association_map` — the sum over prototypes of their cosine with a feature map (Eq. 12).

Features are compared as unit vectors (``d_f`` in [0, 2]) and coordinates in units of the grid
side (``d_s`` in [0, √2]), so ``r`` alone sets how much space matters.
"""

from __future__ import annotations

import torch

from pipeline.core.tensors import EPS, cosine, unit


def grid_coords(h: int, w: int, device: torch.device | None = None) -> torch.Tensor:
    """``(h*w, 2)`` (y, x) cell coordinates, row-major."""
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return torch.stack([ys.flatten(), xs.flatten()], -1).float()


def seed_region(masks: torch.Tensor) -> torch.Tensor:
    """``(B, h, w)`` soft masks -> bool cells where seeds may go: ``mask >= 0.5``, or the
    strongest cell of a mask that never reaches 0.5 (a small object still gets seeds)."""
    peak = masks.flatten(1).amax(1).view(-1, 1, 1)
    return (masks >= 0.5) | ((masks >= peak) & (peak > 0))


def place_seeds(region: torch.Tensor, count: int) -> torch.Tensor:
    """Eq. 6 by repeated distance transform.

    Args:
        region: ``(B, h, w)`` bool, where seeds may go.
        count: ``N_sp``.

    Returns:
        ``(B, count)`` flat cell indices. Each seed is the region cell with the largest distance
        to the nearest blocked point (cells outside the region, cells just outside the image,
        earlier seeds); ties go to the first cell. Once every cell is taken seeds repeat. An
        empty region gives cell 0 (callers mask such episodes out).
    """
    b, h, w = region.shape
    coords = grid_coords(h, w, region.device)
    pairwise = torch.cdist(coords, coords)  # (N, N)
    border = torch.minimum(
        torch.minimum(coords[:, 0] + 1, h - coords[:, 0]), torch.minimum(coords[:, 1] + 1, w - coords[:, 1])
    )  # to the nearest outside cell
    inside = region.flatten(1)
    to_outside = pairwise.expand(b, -1, -1).masked_fill(inside[:, None, :], float("inf")).amin(-1)
    distance = torch.minimum(to_outside, border).masked_fill(~inside, -1.0)  # (B, N)
    seeds = []
    for _ in range(count):
        seed = distance.argmax(-1)
        seeds.append(seed)
        distance = torch.minimum(distance, pairwise[seed])  # the seed is blocked from now on
    return torch.stack(seeds, 1)


def rectify_seeds(
    feats: torch.Tensor, seeds: torch.Tensor, prototype: torch.Tensor, *, window: int
) -> torch.Tensor:
    """Eqs. 7-8: move each seed to the cell of its ``window × window`` neighbourhood (inside the
    image) whose feature has the largest cosine with ``prototype``.

    ``(B, C, h, w)`` features, ``(B, n)`` seeds, ``(B, C)`` prototype -> ``(B, n)`` seeds.
    """
    b, _, h, w = feats.shape
    similarity = cosine(feats, prototype[..., None, None], dim=1).flatten(1)  # (B, N)
    half = window // 2
    offsets = torch.arange(-half, half + 1, device=feats.device)
    dy, dx = torch.meshgrid(offsets, offsets, indexing="ij")
    ys = (seeds // w)[..., None] + dy.flatten()  # (B, n, window²)
    xs = (seeds % w)[..., None] + dx.flatten()
    inside = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
    cells = ys.clamp(0, h - 1) * w + xs.clamp(0, w - 1)
    scores = similarity.gather(1, cells.flatten(1)).view_as(cells).masked_fill(~inside, -float("inf"))
    return cells.gather(2, scores.argmax(-1, keepdim=True))[..., 0]


def cluster(
    feats: torch.Tensor, weights: torch.Tensor, seeds: torch.Tensor, *, r: float, iterations: int
) -> torch.Tensor:
    """Eqs. 9-11: soft clustering of the foreground cells around the seeds.

    Args:
        feats: ``(B, C, h, w)``; weights: ``(B, h, w)`` foreground weight of each cell in [0, 1];
        seeds: ``(B, n)`` flat cell indices; r: the spatial temperature.

    Returns:
        ``(B, n, C)`` prototypes (centroids of the unit features).
    """
    b, c, h, w = feats.shape
    units = unit(feats, 1).flatten(2).transpose(1, 2)  # (B, N, C)
    coords = (grid_coords(h, w, feats.device) / max(h, w)).expand(b, -1, -1)  # (B, N, 2)
    centre_f = units.gather(1, seeds[..., None].expand(-1, -1, c))  # (B, n, C)
    centre_s = coords.gather(1, seeds[..., None].expand(-1, -1, 2))
    weight = weights.flatten(1)[..., None]  # (B, N, 1)
    units_sq, coords_sq = units.square().sum(-1, keepdim=True), coords.square().sum(-1, keepdim=True)

    def squared_distance(
        x, x_sq, centres
    ):  # ‖x − c‖² = ‖x‖² + ‖c‖² − 2 x·c, without (B, N, n, C) temporaries
        return (x_sq + centres.square().sum(-1)[:, None] - 2 * x @ centres.transpose(1, 2)).clamp(min=0)

    for _ in range(iterations):
        q = (
            squared_distance(units, units_sq, centre_f) + squared_distance(coords, coords_sq, centre_s) / r**2
        ).sqrt()
        assign = torch.exp(-q) * weight  # (B, N, n): foreground cells only
        total = assign.sum(1).clamp(min=EPS)[..., None]  # (B, n, 1)
        centre_f = assign.transpose(1, 2) @ units / total
        centre_s = assign.transpose(1, 2) @ coords / total
    return centre_f


def association_map(prototypes: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """Eq. 12: ``(B, n, C)`` prototypes, ``(B, C, h, w)`` features -> ``(B, 1, h, w)`` sum of cosines."""
    return torch.einsum("bnc,bchw->bhw", unit(prototypes, -1), unit(feats, 1))[:, None]


def dps_prototypes(
    support: torch.Tensor,
    support_mask: torch.Tensor,
    query_prototype: torch.Tensor,
    *,
    count: int,
    window: int,
    r: float,
    iterations: int,
) -> torch.Tensor:
    """Part-aware prototypes of the supports: seeds, rectification, clustering.

    ``(B, C, h, w)`` support features, ``(B, h, w)`` soft mask, ``(B, C)`` query prototype ->
    ``(B, count, C)``; zero for an empty mask.
    """
    region = seed_region(support_mask)
    seeds = rectify_seeds(support, place_seeds(region, count), query_prototype, window=window)
    prototypes = cluster(support, support_mask, seeds, r=r, iterations=iterations)
    return prototypes * region.flatten(1).any(1).view(-1, 1, 1)
