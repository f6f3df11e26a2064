"""Softmax-GradCAM with text prompts (PI-CLIP's VTP core), batched over (image, class) pairs.

Activations ``A``: the last block's LN1 output, patch tokens (ViT), or layer4 (ResNet). The
image embedding is the mean of the patch tokens after the last block, ``ln_post`` and the
projection (ViT; not the CLS token) or the attention pool's output (ResNet). Each pair has a
prompt set of K embeddings and a target index; the score is the softmax probability of the
target over the set (``logit_scale`` times cosine). Channels are weighted by the spatial mean
of the score's gradient, summed, ReLU'd and min-max normalised.

Batching: the trunk runs once per image without gradients; only the last block (or the
attention pool) runs per pair, on a copy of ``A`` that is a leaf, and one backward gives
every pair's gradient (pairs do not interact).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.modified_resnet import AttentionPool2d, ModifiedResNet

from pipeline.clip.dense import interpolate_positions, trunk


def attention_pool(pool: AttentionPool2d, feats: torch.Tensor) -> torch.Tensor:
    """open_clip's attention pool for any feature size: ``(B, C, h, w) -> (B, E)``."""
    x = feats.flatten(2).permute(2, 0, 1)  # (hw, B, C)
    x = torch.cat([x.mean(0, keepdim=True), x])
    x = x + interpolate_positions(pool.positional_embedding, feats.shape[-2:])[:, None].to(x.dtype)
    out, _ = F.multi_head_attention_forward(
        query=x[:1], key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=pool.num_heads,
        q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight,
        v_proj_weight=pool.v_proj.weight, in_proj_weight=None,
        in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
        bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
        out_proj_weight=pool.c_proj.weight, out_proj_bias=pool.c_proj.bias,
        use_separate_proj_weight=True, training=False, need_weights=False)
    return out[0]


def _cam(activations: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """``(P, N, D)`` activations and gradients -> ``(P, N)`` min-max normalised CAM."""
    cam = F.relu((activations * grads.mean(1, keepdim=True)).sum(-1))
    low, high = cam.min(1, keepdim=True).values, cam.max(1, keepdim=True).values
    return (cam - low) / (high - low).clamp(min=1e-12)


def softmax_gradcam(
    visual: torch.nn.Module, images: torch.Tensor, image_index: torch.Tensor,
    prompts: torch.Tensor, target: torch.Tensor, logit_scale: float,
    prompt_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """GradCAM maps of P (image, prompt set) pairs.

    Args:
        images: ``(B, 3, H, W)`` normalised images, each forwarded once.
        image_index: ``(P,)`` the image of each pair.
        prompts: ``(P, K, E)`` unit-norm prompt embeddings of each pair's set.
        target: ``(P,)`` index into K of the class whose probability is explained.
        logit_scale: ``model.logit_scale.exp()`` (100 for OpenAI CLIP).
        prompt_mask: ``(P, K)`` bool, False for padding prompts (sets of unequal size).

    Returns:
        ``(P, h, w)`` maps in [0, 1] on the token / feature grid.
    """
    with torch.no_grad():
        x, grid = trunk(visual, images)
    return gradcam_from_trunk(visual, x, grid, image_index, prompts, target, logit_scale, prompt_mask)


def gradcam_from_trunk(
    visual: torch.nn.Module, x: torch.Tensor, grid: tuple[int, int], image_index: torch.Tensor,
    prompts: torch.Tensor, target: torch.Tensor, logit_scale: float,
    prompt_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`softmax_gradcam` from the trunk's output ``x`` (see :func:`pipeline.clip.dense.trunk`)."""
    resnet = isinstance(visual, ModifiedResNet)
    with torch.enable_grad():
        if resnet:  # A = layer4 features of each pair's image
            acts = x[image_index].detach().requires_grad_()
            embedding = attention_pool(visual.attnpool, acts)
        else:  # A = LN1 output of the last block; the block runs per pair from there
            block, x = visual.transformer.resblocks[-1], x[image_index].detach()
            acts = block.ln_1(x).detach().requires_grad_()
            y = x + block.ls_1(block.attn(acts, acts, acts, need_weights=False)[0])
            y = y + block.ls_2(block.mlp(block.ln_2(y)))
            embedding = (visual.ln_post(y[:, 1:]) @ visual.proj).mean(1)
        logits = logit_scale * torch.einsum("pe,pke->pk", F.normalize(embedding, dim=-1),
                                            prompts.to(embedding.dtype))
        if prompt_mask is not None:
            logits = logits.masked_fill(~prompt_mask, float("-inf"))
        score = logits.float().softmax(-1).gather(1, target.view(-1, 1)).sum()
        (grads,) = torch.autograd.grad(score, acts)
    acts, grads = acts.detach().float(), grads.float()
    if resnet:
        return _cam(acts.flatten(2).transpose(1, 2), grads.flatten(2).transpose(1, 2)).view(-1, *grid)
    return _cam(acts[:, 1:], grads[:, 1:]).view(-1, *grid)
