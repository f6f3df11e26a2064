"""Training the tiny CLIP on the synthetic caption corpus (never on benchmark images).

Phase 1 trains the image tower supervised: multi-label BCE over the 20 shapes on the pooled
embedding plus a per-patch cross-entropy (background + 20 shapes) from the corpus masks.
Phase 2 locks it and aligns the text tower to it (LiT): contrastive loss between captions and
the frozen image embeddings; half of the captions lose their colour words ("a photo of a star
and a ring."), so that prompts which name only the shape, like the zero-shot and MaskCLIP
templates, land near the images too. Deterministic by seed; a checkpoint every ``checkpoint_every``
steps lets an interrupted run resume where it stopped.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from PIL import Image
from torch import nn
from tqdm import tqdm

from pipeline.clip.dense import resnet_features, resnet_value_path, vit_tokens
from pipeline.clip.gradcam import attention_pool
from pipeline.clip.loader import ClipBundle
from pipeline.core.dtype import autocast, resolve
from pipeline.core.params import TinyClipParams
from pipeline.datasets.shapes import SHAPE_NAMES
from pipeline.datasets.synthetic import IGNORE, caption

NUM_SHAPES = 20


@dataclass
class Corpus:
    """The caption corpus decoded at the training size.

    Attributes:
        images: ``(N, 3, S, S)`` uint8.
        patch_labels: ``(N, S/p, S/p)`` int64, 0 background, 1..20, 255 mostly-ignore patches.
        multi_hot: ``(N, 20)`` float, shapes present.
        captions: N strings.
        names, colours: per image, the objects' shape names and colour words in caption order.
    """

    images: torch.Tensor
    patch_labels: torch.Tensor
    multi_hot: torch.Tensor
    captions: list[str]
    names: list[list[str]]
    colours: list[list[str]]


def patch_majority(label: np.ndarray, patch: int) -> np.ndarray:
    """``(S, S)`` label map -> ``(S/p, S/p)`` majority label per patch (255 if mostly ignore)."""
    s = label.shape[0] // patch
    onehot = np.zeros((NUM_SHAPES + 2, s * patch, s * patch), np.float32)
    lut = np.where(np.arange(256) == IGNORE, NUM_SHAPES + 1, np.arange(256))
    np.put_along_axis(onehot, lut[label][None].astype(np.int64), 1.0, axis=0)
    counts = onehot.reshape(NUM_SHAPES + 2, s, patch, s, patch).sum((2, 4))
    best = counts.argmax(0)
    return np.where(best == NUM_SHAPES + 1, IGNORE, best).astype(np.int64)


def load_corpus(folder: Path, size: int, patch: int) -> Corpus:
    table = pq.read_table(folder).to_pandas()
    images, labels, multi_hot = [], [], np.zeros((len(table), NUM_SHAPES), np.float32)
    for i, row in enumerate(table.itertuples()):
        image = Image.open(io.BytesIO(row.image)).convert("RGB").resize((size, size), Image.BILINEAR)
        mask = Image.open(io.BytesIO(row.mask)).resize((size, size), Image.NEAREST)
        images.append(np.asarray(image).transpose(2, 0, 1))
        labels.append(patch_majority(np.asarray(mask), patch))
        multi_hot[i, np.asarray(row.class_ids, np.int64) - 1] = 1
    names = [[SHAPE_NAMES[c - 1] for c in ids] for ids in table["class_ids"]]
    return Corpus(torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(labels)),
                  torch.from_numpy(multi_hot), list(table["caption"]), names,
                  [list(c) for c in table["colours"]])


def normalize(images: torch.Tensor, bundle: ClipBundle) -> torch.Tensor:
    """uint8 ``(B, 3, H, W)`` -> float normalised with the bundle's mean and std."""
    mean = torch.tensor(bundle.mean).view(1, 3, 1, 1)
    std = torch.tensor(bundle.std).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def image_outputs(visual: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled embedding ``(B, E)`` and per-patch embeddings ``(B, N, E)``.

    ViT: the projected patch tokens (their mean is the embedding). ModifiedResNet: the
    attention pool's output and the MaskCLIP value path per layer4 position.
    """
    if isinstance(visual, ModifiedResNet):
        feats = resnet_features(visual, images)
        patches = resnet_value_path(visual.attnpool, feats).flatten(2).transpose(1, 2)
        return attention_pool(visual.attnpool, feats), patches
    x, _ = vit_tokens(visual, images)
    x = visual.transformer.resblocks[-1](x)
    tokens = visual.ln_post(x[:, 1:]) @ visual.proj
    return tokens.mean(1), tokens


class Phase1Heads(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.shapes = nn.Linear(dim, NUM_SHAPES)
        self.patches = nn.Linear(dim, NUM_SHAPES + 1)


def dihedral(
    images: torch.Tensor, labels: torch.Tensor, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random flip and quarter turn per sample, the same for ``(B, 3, H, W)`` images and their
    ``(B, h, w)`` patch labels (the shape classes do not change under rotation)."""
    flips, turns = rng.random(len(images)) < 0.5, rng.integers(0, 4, len(images))
    images, labels = images.clone(), labels.clone()
    for i in range(len(images)):
        image, label = (images[i].flip(-1), labels[i].flip(-1)) if flips[i] else (images[i], labels[i])
        images[i] = torch.rot90(image, int(turns[i]), dims=(-2, -1))
        labels[i] = torch.rot90(label, int(turns[i]), dims=(-2, -1))
    return images, labels


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _checkpoint(path: Path, **state) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def train_phase1(
    bundle: ClipBundle, corpus: Corpus, cfg: TinyClipParams, ckpt: Path
) -> tuple[list[float], Phase1Heads]:
    """Supervised image tower; returns the loss per step and the heads (resumes from ``ckpt``)."""
    visual = bundle.model.visual
    heads = Phase1Heads(bundle.model_cfg["embed_dim"])
    params = list(visual.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.phase1_lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, cfg.phase1_steps, cfg.warmup))
    start, losses = 0, []
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        visual.load_state_dict(state["visual"])
        heads.load_state_dict(state["heads"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start, losses = state["step"], state["losses"]
    n = len(corpus.captions)
    visual.train()
    bar = tqdm(range(start, cfg.phase1_steps), initial=start, total=cfg.phase1_steps,
               desc="tiny CLIP phase 1")
    for step in bar:
        epoch, offset = divmod(step * cfg.batch_size, n)
        idx = torch.from_numpy(_epoch_order(cfg.seed, epoch, n)[offset: offset + cfg.batch_size])
        images, labels = dihedral(normalize(corpus.images[idx], bundle), corpus.patch_labels[idx],
                                  np.random.default_rng([cfg.seed, 2, step]))
        with autocast(resolve(cfg.dtype, "cpu"), "cpu"):
            pooled, tokens = image_outputs(visual, images)
            loss = F.binary_cross_entropy_with_logits(heads.shapes(pooled).float(), corpus.multi_hot[idx])
            loss = loss + F.cross_entropy(heads.patches(tokens).float().transpose(1, 2), labels.flatten(1),
                                          ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.phase1_steps:
            _checkpoint(ckpt, visual=visual.state_dict(), heads=heads.state_dict(), opt=opt.state_dict(),
                        sched=sched.state_dict(), step=step + 1, losses=losses)
    visual.eval()
    return losses, heads.eval()


def _epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """A fresh, seeded permutation of the corpus each epoch."""
    return np.random.default_rng([seed, 1, epoch]).permutation(n)


@torch.no_grad()
def image_embeddings(bundle: ClipBundle, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """``(N, E)`` unit-norm embeddings of uint8 images with the (frozen) image tower.

    Through :func:`image_outputs`, so any image size works (position embeddings are
    interpolated); at the native size it equals open_clip's ``encode_image`` (average pooling).
    """
    visual = bundle.model.visual
    out = [F.normalize(image_outputs(visual, normalize(images[i: i + batch], bundle))[0].float(), dim=-1)
           for i in range(0, len(images), batch)]
    return torch.cat(out)


def train_phase2(bundle: ClipBundle, corpus: Corpus, cfg: TinyClipParams) -> list[float]:
    """LiT: the text tower learns to match the locked image tower's embeddings."""
    model = bundle.model
    model.visual.eval()
    targets = image_embeddings(bundle, corpus.images)
    tokenizer = bundle.tokenizer()
    text_params = [p for name, p in model.named_parameters() if not name.startswith("visual.")]
    opt = torch.optim.AdamW(text_params, lr=cfg.phase2_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, cfg.phase2_steps, cfg.warmup))
    losses, n = [], len(corpus.captions)
    batch = min(4 * cfg.batch_size, n)  # contrastive batches: more negatives than phase 1
    bar = tqdm(range(cfg.phase2_steps), desc="tiny CLIP phase 2")
    for step in bar:
        rng = np.random.default_rng([cfg.seed, 3, step])
        idx = rng.choice(n, batch, replace=False)
        plain = rng.random(batch) < 0.5
        tokens = tokenizer([caption(corpus.names[i], None if bare else corpus.colours[i])
                            for i, bare in zip(idx, plain, strict=True)])
        with autocast(resolve(cfg.dtype, "cpu"), "cpu"):
            text = F.normalize(model.encode_text(tokens).float(), dim=-1)
        logits = model.logit_scale.exp() * text @ targets[idx].T
        labels = torch.arange(batch)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    model.eval()
    return losses
