"""Prompt templates and template-averaged text embeddings (docs/design.md#conventions).

MaskCLIP averages over 85 templates: the 80 CLIP ImageNet templates and 5 scene templates.
Each template's embedding is L2-normalised, the mean over templates normalised again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

SCENE_TEMPLATES = (
    "there is a {} in the scene.",
    "there is the {} in the scene.",
    "this is a {} in the scene.",
    "this is the {} in the scene.",
    "this is one {} in the scene.",
)
MASKCLIP_TEMPLATES: tuple[str, ...] = tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES) + SCENE_TEMPLATES

@torch.no_grad()
def text_embeddings(
    model, tokenizer, names: Sequence[str], templates: Sequence[str] = MASKCLIP_TEMPLATES,
    cache_dir: Path | None = None, weights_sha: str | None = None,
) -> torch.Tensor:
    """``(C, D)`` unit-norm embeddings, one per name, averaged over ``templates``.

    With ``cache_dir`` and ``weights_sha``, results are cached on disk under a hash of
    (weights sha, names, templates).
    """
    cache = None
    if cache_dir is not None and weights_sha is not None:
        key = json.dumps([weights_sha, list(names), list(templates)]).encode()
        cache = Path(cache_dir) / f"text-{hashlib.sha256(key).hexdigest()[:20]}.pt"
        if cache.exists():
            return torch.load(cache, weights_only=True)
    device = next(model.parameters()).device
    rows = []
    for name in names:
        tokens = tokenizer([t.format(name) for t in templates]).to(device)
        per_template = torch.nn.functional.normalize(model.encode_text(tokens).float(), dim=-1)
        rows.append(torch.nn.functional.normalize(per_template.mean(0), dim=-1))
    embeddings = torch.stack(rows).cpu()
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(embeddings, cache)
    return embeddings
