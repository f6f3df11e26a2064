"""Priors of a batch of images, each forwarded once (DESIGN §5 "Priors").

One forward per image serves MaskCLIP, every GradCAM of the image's (image, class) pairs (only
the last block runs again, per pair, with one backward for all), the PIR affinity and the VVP
token features. VVP itself is per episode, from the cached features (:mod:`pipeline.priors.vvp`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.clip.dense import scores_from_trunk
from pipeline.clip.gradcam import gradcam_from_trunk
from pipeline.priors.forward import image_features
from pipeline.priors.pir import high_order_affinity, refine
from pipeline.priors.vtp import PromptBank, PromptSet, prompt_sets


@dataclass
class ImagePriors:
    """Priors of B images and P (image, class) pairs on the ``(h, w)`` token grid.

    Attributes:
        vtp, pir: ``(P, h, w)`` raw and refined VTP, in [0, 1].
        maskclip_scores: ``(B, C, h, w)`` cosine with each class's MaskCLIP text embedding.
        maskclip_labels: ``(B, L, L)`` uint8 class ids 1..C, argmax of the scores upsampled
            bilinearly to ``label_size``.
        tokens: two ``(B, N, D_j)`` VVP feature maps.
    """

    vtp: torch.Tensor
    pir: torch.Tensor
    maskclip_scores: torch.Tensor
    maskclip_labels: torch.Tensor
    tokens: tuple[torch.Tensor, torch.Tensor]


@torch.no_grad()  # GradCAM enables gradients for its own part
def extract_priors(
    model, images: torch.Tensor, pair_image: torch.Tensor, pair_class: Sequence[int],
    image_labels: Sequence[Sequence[int]], bank: PromptBank, class_text: torch.Tensor, *,
    prompt_set: PromptSet = "target", pir_blocks: int = 8, pir_threshold: float = 0.4,
    label_size: int = 128,
) -> ImagePriors:
    """Priors of ``(B, 3, S, S)`` normalised images.

    Args:
        pair_image: ``(P,)`` the image (0..B-1) of each pair; pair_class: its class id.
        image_labels: per image, the class ids present (the ``image_labels`` prompt set).
        class_text: ``(C, E)`` MaskCLIP class embeddings (85 templates).
    """
    visual = model.visual
    feats = image_features(visual, images, pir_blocks)
    scores = scores_from_trunk(visual, feats.trunk, feats.grid, class_text)
    up = F.interpolate(scores, size=(label_size, label_size), mode="bilinear", align_corners=False)
    labels = (up.argmax(1) + 1).to(torch.uint8)
    prompts, target, mask = prompt_sets(bank, pair_class, [image_labels[i] for i in pair_image.tolist()],
                                        prompt_set)
    vtp = gradcam_from_trunk(visual, feats.trunk, feats.grid, pair_image, prompts.to(images.device),
                             target.to(images.device), model.logit_scale.exp().item(), mask.to(images.device))
    pir = refine(high_order_affinity(feats.affinity)[pair_image], vtp, pir_threshold)
    return ImagePriors(vtp, pir, scores, labels, feats.tokens)
