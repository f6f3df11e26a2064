"""How well a CLIP aligns the synthetic shape names with images and pixels.

* zero-shot top-1 with "a photo of a {shape}." on held-out single-object images (a seed
  stream no benchmark or corpus image uses);
* MaskCLIP dense labels on benchmark val images: mean IoU over the 20 shapes on the
  ground-truth foreground pixels (the label map has no background class), with the same
  measure for uniformly random labels as its chance level.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.clip.dense import labels_from_scores, maskclip_scores
from pipeline.clip.loader import ClipBundle
from pipeline.clip.prompts import text_embeddings
from pipeline.datasets.shapes import SHAPE_NAMES
from pipeline.datasets.synthetic import IGNORE, render_scene, scene_rng
from pipeline.tinyclip.train import Phase1Heads, image_embeddings, image_outputs, normalize

ZERO_SHOT_TEMPLATE = "a photo of a {}."


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 ``(B, 3, H, W)`` -> uint8 at ``size`` (bilinear, antialiased)."""
    if images.shape[-1] == size:
        return images
    out = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True)
    return out.round().clamp(0, 255).to(torch.uint8)


def heldout_images(n: int = 500, seed: int = 0, size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n, 3, size, size)`` uint8 single-object images and their ``(n,)`` class ids (1..20)."""
    scenes = [render_scene(scene_rng(seed, "heldout", i), size, 1, 1) for i in range(n)]
    images = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2)
    return images, torch.tensor([s.objects[0].class_id for s in scenes])


@torch.no_grad()
def zero_shot_accuracy(bundle: ClipBundle, images: torch.Tensor, truth: torch.Tensor) -> float:
    """Top-1 of "a photo of a {shape}." over the 20 shapes on uint8 ``images``."""
    text = text_embeddings(bundle.model, bundle.tokenizer(), SHAPE_NAMES, [ZERO_SHOT_TEMPLATE])
    pred = (image_embeddings(bundle, _resize(images, bundle.image_size)) @ text.T).argmax(1) + 1
    return float((pred == truth).float().mean())


@torch.no_grad()
def head_accuracy(bundle: ClipBundle, heads: Phase1Heads, images: torch.Tensor, truth: torch.Tensor) -> float:
    """Top-1 of phase 1's shape head (no text involved): what the image tower alone knows."""
    visual = bundle.model.visual
    pooled = image_outputs(visual, normalize(_resize(images, bundle.image_size), bundle))[0]
    return float(((heads.shapes(pooled).argmax(1) + 1) == truth).float().mean())


def foreground_miou(pred: np.ndarray, label: np.ndarray, num_classes: int = 20) -> float:
    """Mean IoU over classes 1..C on pixels whose label is a class (not 0, not 255)."""
    keep = (label > 0) & (label != IGNORE)
    p, t = pred[keep].astype(np.int64), label[keep].astype(np.int64)
    confusion = np.bincount(t * (num_classes + 1) + p, minlength=(num_classes + 1) ** 2)
    confusion = confusion.reshape(num_classes + 1, num_classes + 1)[1:, 1:]
    inter = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - inter
    present = confusion.sum(1) > 0
    return float(np.mean(inter[present] / np.maximum(union[present], 1)))


@torch.no_grad()
def dense_miou(
    bundle: ClipBundle, images: Sequence[torch.Tensor], labels: Sequence[np.ndarray], seed: int = 0
) -> dict[str, float]:
    """MaskCLIP mIoU on uint8 ``(3, H, W)`` images against their ``(H, W)`` labels (each image at
    its own size: resized to the CLIP input, labels upsampled back to the image), and chance."""
    text = text_embeddings(bundle.model, bundle.tokenizer(), SHAPE_NAMES)
    preds = []
    for i in range(0, len(images), 64):
        resized = [_resize(x[None], bundle.image_size)[0] for x in images[i: i + 64]]
        batch = normalize(torch.stack(resized), bundle)
        scores = maskclip_scores(bundle.model.visual, batch, text)
        preds += [labels_from_scores(scores[j: j + 1], label.shape)[0].numpy() + 1
                  for j, label in enumerate(labels[i: i + 64])]
    pred, truth = np.concatenate([p.ravel() for p in preds]), np.concatenate([t.ravel() for t in labels])
    chance = np.random.default_rng(seed).integers(1, 21, size=truth.shape)
    return {"miou": foreground_miou(pred, truth), "chance": foreground_miou(chance, truth)}
