"""Pseudo-masks of a batch of episodes, computed where the batch is (the training step).

Under ``train.sampling: epoch`` every epoch draws fresh episodes, so their pseudo-masks cannot
be stored ahead: they are computed from the batch's backbone features and the stored MaskCLIP
scores with the same maths as the ``pseudo_masks`` stage (:mod:`pipeline.pseudomasks.refine`),
and give the same masks for the same episode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.clip.dense import labels_from_scores
from pipeline.core.params import Params
from pipeline.core.tensors import mask_to_grid
from pipeline.pseudomasks.refine import initial_masks, refine_masks


@dataclass(frozen=True)
class MaskInputs:
    """What the pseudo-masks of B K-shot episodes are made from (besides the features).

    Attributes:
        query_scores: ``(B, C, hp, wp)``, support_scores: ``(B, K, C, hp, wp)`` MaskCLIP scores.
        classes: ``(B,)`` class ids (1..C).
        query_vtp: ``(B, hp, wp)``, support_vtp: ``(B, K, hp, wp)`` raw VTP, or None (no VTP
            threshold).
    """

    query_scores: torch.Tensor
    support_scores: torch.Tensor
    classes: torch.Tensor
    query_vtp: torch.Tensor | None = None
    support_vtp: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> MaskInputs:
        return MaskInputs(*(None if v is None else v.to(device, non_blocking=True)
                            for v in vars(self).values()))


@dataclass(frozen=True)
class OnlineRefiner:
    """The ``pseudo_masks`` params as a function of a batch."""

    size: int  # masks are made at size x size (backbone.image_size), as the stored ones
    alpha: float
    temperature: float | None  # None: Eq. 4's dot-product attention
    vtp_threshold: float | None
    refined: bool  # False: the initial masks (model.pseudo_masks: initial)

    @classmethod
    def from_params(cls, params: Params) -> OnlineRefiner:
        cfg = params.pseudo_masks
        temperature = cfg.temperature if cfg.attention == "cosine" else None
        return cls(params.backbone.image_size, cfg.alpha, temperature, cfg.vtp_threshold,
                   params.model.pseudo_masks == "refined")

    def initial(self, scores: torch.Tensor, classes: torch.Tensor, vtp: torch.Tensor | None) -> torch.Tensor:
        """``(P, C, hp, wp)`` scores, ``(P,)`` classes -> ``(P, S, S)`` bool initial masks."""
        labels = labels_from_scores(scores.float(), (self.size, self.size)) + 1
        return initial_masks(labels, classes, vtp, vtp_threshold=self.vtp_threshold)

    def __call__(
        self, query_feats: torch.Tensor, support_feats: torch.Tensor, x: MaskInputs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, C, h, w)`` query and ``(B, K, C, h, w)`` support features -> the query ``(B, h, w)``
        and support ``(B, K, h, w)`` pseudo-masks at the feature grid (fraction of each cell)."""
        b, k = support_feats.shape[:2]
        s_init = self.initial(x.support_scores.flatten(0, 1), x.classes.repeat_interleave(k),
                              None if x.support_vtp is None else x.support_vtp.flatten(0, 1))
        q_init = self.initial(x.query_scores, x.classes, x.query_vtp)
        s_init = s_init.view(b, k, *s_init.shape[1:])
        if self.refined:
            s_init, q_init = refine_masks(support_feats.float(), s_init, query_feats.float(), q_init,
                                          alpha=self.alpha, temperature=self.temperature)
        grid = query_feats.shape[-2:]
        # rounded to float16 as the stored masks are (data/pseudo_masks.zarr -> EpisodeTable)
        return mask_to_grid(q_init, grid).half().float(), mask_to_grid(s_init, grid).half().float()
