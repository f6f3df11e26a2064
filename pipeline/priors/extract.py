"""Priors of a batch of images, each forwarded once (docs/method.md#priors).

One forward per image serves MaskCLIP, every GradCAM of the image's (image, class) pairs (only
the last block runs again, per pair, with one backward for all), the PIR affinity and the VVP
token features. VVP itself is per episode, from the cached features (:mod:`pipeline.priors.vvp`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.clip.dense import labels_from_scores, scores_from_trunk
from pipeline.clip.gradcam import gradcam_from_head, gradcam_from_trunk
from pipeline.core.tensors import CamScale
from pipeline.priors.forward import image_features
from pipeline.priors.pir import BoxRule, high_order_affinity, refine
from pipeline.priors.vtp import PromptBank, PromptSet, prompt_sets


@dataclass
class ImagePriors:
    """Priors of B images and P (image, class) pairs on the ``(h, w)`` token grid.

    Attributes:
        vtp, pir: ``(P, h, w)`` raw and refined VTP, in [0, 1].
        maskclip_scores: ``(B, C, h, w)`` cosine with each class's MaskCLIP text embedding.
        maskclip_labels: ``(B, h, w)`` uint8 class ids 1..C, the argmax of the scores (at any
            pixel size: :func:`pipeline.clip.dense.labels_from_scores` of the scores).
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
    prompt_set: PromptSet, pir_blocks: int, pir_threshold: float, cam_scale: CamScale, box: BoxRule,
) -> ImagePriors:
    """Priors of ``(B, 3, S, S)`` normalised images.

    Args:
        pair_image: ``(P,)`` the image (0..B-1) of each pair; pair_class: its class id.
        image_labels: per image, the class ids present (the ``image_labels`` prompt set).
        class_text: ``(C, E)`` MaskCLIP class embeddings (85 templates).
        cam_scale, box: how VTP and PIR maps are scaled and PIR's boxes drawn (``priors.cam_scale``,
            ``priors.box``: docs/method.md#reference-conventions).
    """
    visual = model.visual
    feats = image_features(visual, images, attention_blocks=pir_blocks)
    scores = scores_from_trunk(visual, feats.trunk, feats.grid, class_text)
    present = torch.zeros(len(images), len(class_text), dtype=torch.bool)
    for i, classes in enumerate(image_labels):
        present[i, torch.as_tensor(list(classes), dtype=torch.long) - 1] = True
    classes = torch.as_tensor(list(pair_class), device=images.device)
    prompts, target, mask = prompt_sets(bank, classes, present.to(images.device)[pair_image], prompt_set)
    scale = model.logit_scale.exp().item()
    # each image's first pair: one backward through the forward above; further pairs of an
    # image re-run only the head (last block / attention pool), batched
    first = torch.zeros(len(pair_image), dtype=torch.bool)
    first[np.unique(pair_image.cpu().numpy(), return_index=True)[1]] = True
    first = first.to(images.device)
    vtp = torch.empty(len(pair_image), *feats.grid, device=images.device)
    with torch.enable_grad():
        vtp[first] = gradcam_from_head(feats.acts, feats.embedding, pair_image[first], feats.grid,
                                       prompts[first], target[first], scale, mask[first], cam_scale)
    if (~first).any():
        vtp[~first] = gradcam_from_trunk(visual, feats.trunk, feats.grid, pair_image[~first], prompts[~first],
                                         target[~first], scale, mask[~first], cam_scale)
    pir = refine(high_order_affinity(feats.affinity)[pair_image], vtp, threshold=pir_threshold, box=box,
                 scale=cam_scale)
    return ImagePriors(vtp, pir, scores, labels_from_scores(scores).to(torch.uint8) + 1, feats.tokens)
