"""One pass through a CLIP image tower that keeps everything the priors read.

From a single forward per image: the trunk output that the MaskCLIP head and GradCAM start
from, the affinity PIR refines with (ViT: head-averaged self-attention of the last blocks;
ModifiedResNet, which has no attention: cosine affinity of layer4 features), and the two token
feature maps VVP compares (ViT: outputs of the last two blocks, before ``ln_post``;
ModifiedResNet: layer3 pooled to the layer4 grid, and layer4).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet

from pipeline.clip.dense import vit_embed
from pipeline.clip.gradcam import attention_block, head_with_grad, vit_embedding, vit_head


@dataclass
class ImageFeatures:
    """What one forward of B images leaves for the priors (N = h*w positions).

    Attributes:
        trunk: ViT tokens entering the last block ``(B, 1 + N, D)`` or ResNet layer4
            ``(B, C, h, w)``: the input of :func:`pipeline.clip.dense.dense_from_trunk` and
            :func:`pipeline.clip.gradcam.gradcam_from_trunk`.
        grid: ``(h, w)``.
        affinity: ``(B, N, N)`` non-negative, the base matrix of PIR.
        tokens: two ``(B, N, D_j)`` feature maps for VVP, earlier block first.
        acts, embedding: GradCAM's activations (a leaf) and the ``(B, E)`` image embedding still
            attached to them, so one backward gives a GradCAM per image
            (:func:`pipeline.clip.gradcam.gradcam_from_head`) without running the head again.
    """

    trunk: torch.Tensor
    grid: tuple[int, int]
    affinity: torch.Tensor
    tokens: tuple[torch.Tensor, torch.Tensor]
    acts: torch.Tensor
    embedding: torch.Tensor


def block_with_attention(block: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An open_clip residual attention block that also returns its head-averaged attention.

    ``(B, T, D) -> (B, T, D), (B, T, T)``; the output equals ``block(x)``.
    """
    _, y, weights = attention_block(block, x, need_weights=True)
    return y, weights


@torch.no_grad()
def image_features(visual: torch.nn.Module, images: torch.Tensor, *, attention_blocks: int) -> ImageFeatures:
    """Run ``(B, 3, H, W)`` normalised images once; ``attention_blocks``: how many of the last
    blocks' attention maps PIR averages (all blocks if the tower has fewer)."""
    if isinstance(visual, ModifiedResNet):
        l3 = visual.layer3(visual.layer2(visual.layer1(visual.stem(images))))
        l4 = visual.layer4(l3)
        grid = (l4.shape[-2], l4.shape[-1])
        flat = l4.flatten(2).transpose(1, 2)
        unit = F.normalize(flat.float(), dim=-1)
        pooled = F.adaptive_avg_pool2d(l3, grid).flatten(2).transpose(1, 2)
        with torch.enable_grad():
            acts, embedding = head_with_grad(visual, l4)
        return ImageFeatures(l4, grid, (unit @ unit.transpose(1, 2)).clamp(min=0), (pooled, flat),
                             acts, embedding)
    x, grid = vit_embed(visual, images)
    blocks = visual.transformer.resblocks
    first = len(blocks) - min(attention_blocks, len(blocks))
    attention = torch.zeros(x.shape[0], x.shape[1], x.shape[1], device=x.device)
    for i, block in enumerate(blocks[:-1]):
        if i >= first:
            x, weights = block_with_attention(block, x)
            attention += weights.float()
        else:
            x = block(x)
    with torch.enable_grad():
        acts, out, weights = vit_head(visual, x, need_weights=True)
        embedding = vit_embedding(visual, out)
    attention = (attention + weights.detach().float()) / (len(blocks) - first)
    return ImageFeatures(x, grid, attention[:, 1:, 1:], (x[:, 1:], out.detach()[:, 1:]), acts, embedding)
