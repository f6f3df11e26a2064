"""Softmax-GradCAM with text prompts (PI-CLIP's VTP core), batched over (image, class) pairs.

Activations ``A``: the last block's LN1 output, patch tokens (ViT), or layer4 (ResNet). The
image embedding is the mean of the patch tokens after the last block, ``ln_post`` and the
projection (ViT; not the CLS token) or the attention pool's output (ResNet). Each pair has a
prompt set of K embeddings and a target index; the score is the softmax probability of the
target over the set (``logit_scale`` times cosine). Channels are weighted by the spatial mean
of the score's gradient, summed, ReLU'd and scaled to [0, 1]: min-max (``scale="minmax"``) or as
PI-CLIP's code does (``"pi-clip"``: pytorch_grad_cam's ``scale_cam_image`` twice, once for the
target layer and once after averaging its one layer, :func:`pipeline.core.tensors.scale_cam`).

Batching: the trunk runs once per image without gradients; only the last block (or the
attention pool) runs per pair, on a copy of ``A`` that is a leaf, and one backward gives
every pair's gradient (pairs do not interact).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.modified_resnet import AttentionPool2d, ModifiedResNet

from pipeline.clip.dense import interpolate_positions, trunk
from pipeline.core.tensors import CamScale, scale_cam


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


def _cam(activations: torch.Tensor, grads: torch.Tensor, scale: CamScale = "minmax") -> torch.Tensor:
    """``(P, N, D)`` activations and gradients -> ``(P, N)`` CAM scaled to [0, 1] (``scale``)."""
    cam = F.relu((activations * grads.mean(1, keepdim=True)).sum(-1))
    if scale == "pi-clip":  # BaseCAM scales per target layer, then the mean of its (one) layer again
        return scale_cam(scale_cam(cam[..., None]).clamp(min=0))[..., 0]  # (P, N, 1): one map per pair
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
    prompt_mask: torch.Tensor | None = None, scale: CamScale = "minmax",
) -> torch.Tensor:
    """:func:`softmax_gradcam` from the trunk's output ``x`` (see :func:`pipeline.clip.dense.trunk`):
    the head (last block or attention pool) runs again for every pair."""
    with torch.enable_grad():
        acts, embedding = head_with_grad(visual, x[image_index].detach())
        rows = torch.arange(len(image_index), device=x.device)
        return gradcam_from_head(acts, embedding, rows, grid, prompts, target, logit_scale, prompt_mask,
                                 scale)


def vit_head(
    visual: torch.nn.Module, x: torch.Tensor, need_weights: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The last ViT block from its LN1 output ``A`` (a new leaf that requires grad).

    ``(B, T, D)`` tokens entering the block -> ``A``, the block's output ``(B, T, D)`` and, with
    ``need_weights``, its head-averaged attention ``(B, T, T)``. Call under ``torch.enable_grad()``.
    """
    return attention_block(visual.transformer.resblocks[-1], x, need_weights, grad_leaf=True)


def attention_block(
    block: torch.nn.Module, x: torch.Tensor, need_weights: bool = False, grad_leaf: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """An open_clip residual attention block, written out: its LN1 output ``A`` (with
    ``grad_leaf`` a new leaf that requires grad), its output ``(B, T, D)`` and, with
    ``need_weights``, its head-averaged attention ``(B, T, T)``."""
    acts = block.ln_1(x)
    if grad_leaf:
        acts = acts.detach().requires_grad_()
    out, weights = block.attn(acts, acts, acts, need_weights=need_weights, average_attn_weights=True)
    y = x + block.ls_1(out)
    return acts, y + block.ls_2(block.mlp(block.ln_2(y))), weights


def vit_embedding(visual: torch.nn.Module, y: torch.Tensor) -> torch.Tensor:
    """``(B, 1 + N, D)`` last-block output -> ``(B, E)``: mean of the projected patch tokens."""
    return (visual.ln_post(y[:, 1:]) @ visual.proj).mean(1)


def head_with_grad(visual: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The GradCAM activations ``A`` (a leaf that requires grad) and the image embedding computed
    from them: ViT: ``A`` = LN1 output of the last block ``(B, 1 + N, D)``; ResNet: ``A`` =
    layer4 ``(B, C, h, w)``, embedding = attention pool. Call under ``torch.enable_grad()``."""
    if isinstance(visual, ModifiedResNet):
        acts = x.detach().requires_grad_()
        return acts, attention_pool(visual.attnpool, acts)
    acts, y, _ = vit_head(visual, x)
    return acts, vit_embedding(visual, y)


def gradcam_from_head(
    acts: torch.Tensor, embedding: torch.Tensor, rows: torch.Tensor, grid: tuple[int, int],
    prompts: torch.Tensor, target: torch.Tensor, logit_scale: float, prompt_mask: torch.Tensor | None = None,
    scale: CamScale = "minmax",
) -> torch.Tensor:
    """GradCAM of P pairs, pair p explaining ``embedding[rows[p]]`` by ``acts[rows[p]]``, from one
    backward. ``rows`` must be distinct (rows of ``acts`` do not interact, so each row's gradient
    is its own pair's). ``scale``: how each map is scaled to [0, 1] (module docstring)."""
    logits = logit_scale * torch.einsum("pe,pke->pk", F.normalize(embedding[rows], dim=-1),
                                        prompts.to(embedding.dtype))
    if prompt_mask is not None:
        logits = logits.masked_fill(~prompt_mask, float("-inf"))
    score = logits.float().softmax(-1).gather(1, target.view(-1, 1)).sum()
    (grads,) = torch.autograd.grad(score, acts)
    acts, grads = acts.detach()[rows].float(), grads[rows].float()
    if acts.dim() == 4:  # ResNet (P, C, h, w)
        return _cam(acts.flatten(2).transpose(1, 2), grads.flatten(2).transpose(1, 2), scale).view(-1, *grid)
    return _cam(acts[:, 1:], grads[:, 1:], scale).view(-1, *grid)
