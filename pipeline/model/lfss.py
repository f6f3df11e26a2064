"""The LFSS model (Eqs. 6-19 with PI-CLIP priors): guidance maps from a support, then the decoder.

Decoder input (Eq. 18, extended with PI-CLIP's priors)::

    F_q ⊕ P (DPS association map, or the global-prototype cosine when DPS is off)
        ⊕ RCM ⊕ FCM ⊕ VTP (PIR-refined or raw) ⊕ VVP (two blocks)

Every map but ``F_q`` and ``P`` is switchable by :class:`~pipeline.core.params.ModelParams`. The
model is 1-shot; :func:`predict` runs it per shot and averages the probabilities (K-shot), and
with circle inference first predicts each support from itself, then the query from that
predicted support mask — as it was trained (:mod:`pipeline.fewshot.train`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.params import ModelParams
from pipeline.core.tensors import cosine, masked_average_pooling
from pipeline.model.ccm import attended_prototype, correlation_maps
from pipeline.model.decoder import Decoder
from pipeline.model.dps import association_map, dps_prototypes
from pipeline.priors.vvp import vvp


@dataclass
class Episodes:
    """A batch of 1-shot episodes, ready for the model (feature grid ``h × w``, prior grid ``hp × wp``).

    Attributes:
        query, support: ``(B, C, h, w)`` backbone features.
        query_mask, support_mask: ``(B, h, w)`` masks at the feature grid (fraction of each cell);
            None in a training batch whose pseudo-masks the training step has still to make.
        query_vtp, support_vtp: ``(B, hp, wp)`` VTP of each image for the episode's class.
        query_tokens, support_tokens: ``(B, 2, hp*wp, D)`` CLIP tokens of two blocks (for VVP).
    """

    query: torch.Tensor
    query_mask: torch.Tensor
    support: torch.Tensor
    support_mask: torch.Tensor
    query_vtp: torch.Tensor
    support_vtp: torch.Tensor
    query_tokens: torch.Tensor
    support_tokens: torch.Tensor

    def support_as_query(self) -> Episodes:
        """The support segmented from itself (circle training's first step)."""
        return replace(
            self,
            query=self.support,
            query_mask=self.support_mask,
            query_vtp=self.support_vtp,
            query_tokens=self.support_tokens,
        )

    def to(self, device: torch.device | str) -> Episodes:
        return Episodes(**{k: None if v is None else v.to(device, non_blocking=True).float()
                           for k, v in vars(self).items()})


def guide_channels(cfg: ModelParams) -> int:
    return 1 + cfg.rcm + cfg.ccm + cfg.vtp + 2 * cfg.vvp


class LFSS(nn.Module):
    """``Episodes`` -> ``(B, h, w)`` foreground logits at the feature grid."""

    def __init__(self, feat_channels: int, cfg: ModelParams) -> None:
        super().__init__()
        self.cfg = cfg
        self.decoder = Decoder(feat_channels, guide_channels(cfg), hidden=cfg.hidden, dropout=cfg.dropout)

    def guides(self, x: Episodes) -> torch.Tensor:
        """``(B, guide_channels, h, w)`` guidance maps."""
        cfg, size = self.cfg, x.query.shape[-2:]
        support_prototype = masked_average_pooling(x.support, x.support_mask)
        if cfg.dps:
            query_prototype = masked_average_pooling(x.query, x.query_mask)
            empty = x.query_mask.flatten(1).sum(1, keepdim=True) == 0
            query_prototype = torch.where(empty, support_prototype, query_prototype)
            prototypes = dps_prototypes(
                x.support,
                x.support_mask,
                query_prototype,
                count=cfg.seeds,
                window=cfg.window,
                r=cfg.spatial_r,
                iterations=cfg.cluster_iterations,
            )
            maps = [association_map(prototypes, x.query)]
        else:
            maps = [cosine(x.query, support_prototype[..., None, None], dim=1)[:, None]]
        if cfg.rcm or cfg.ccm:
            attended = attended_prototype(
                x.query, x.query_mask, x.support, x.support_mask, temperature=cfg.ccm_temperature
            )
            rcm_fcm = correlation_maps(x.query, x.query_mask, attended)  # (B, 2, h, w): RCM, FCM
            maps.append(rcm_fcm[:, [i for i, on in enumerate((cfg.rcm, cfg.ccm)) if on]])
        priors = []
        if cfg.vtp:
            priors.append(x.query_vtp[:, None])
        if cfg.vvp:
            side = math.isqrt(x.query_tokens.shape[2])
            grid = (side, side)
            mask = F.adaptive_avg_pool2d(x.support_mask[:, None], grid).flatten(1)[:, None]  # (B, 1, Np)
            priors += [
                vvp(x.query_tokens[:, b], x.support_tokens[:, b, None], mask, grid)
                for b in range(x.query_tokens.shape[1])
            ]
        maps += [F.interpolate(p, size=size, mode="bilinear", align_corners=False) for p in priors]
        return torch.cat(maps, 1)

    def forward(self, x: Episodes) -> torch.Tensor:
        return self.decoder(x.query, self.guides(x))


def circle(model: nn.Module, x: Episodes) -> tuple[torch.Tensor, torch.Tensor]:
    """Circle prediction: ``(support logits, query logits)``, each ``(B, h, w)``.

    The support is segmented from itself with its input mask; its predicted probabilities
    (detached) then serve as the support mask of the query.
    """
    support_logits = model(x.support_as_query())
    predicted = torch.sigmoid(support_logits.detach().float())
    return support_logits, model(replace(x, support_mask=predicted))


@torch.no_grad()
def predict(model: nn.Module, shots: list[Episodes], *, circle_inference: bool) -> torch.Tensor:
    """K-shot foreground probabilities ``(B, h, w)``: the mean over shots of the 1-shot
    prediction from each support."""
    probs = [torch.sigmoid((circle(model, x)[1] if circle_inference else model(x)).float()) for x in shots]
    return torch.stack(probs).mean(0)
