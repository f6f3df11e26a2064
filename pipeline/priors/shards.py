"""The two units of work of the priors stage, each writing whole Zarr shards.

* :func:`extract_image_shard`: a range of image rows — load, forward once, write MaskCLIP
  scores and labels, VVP token features, and VTP / PIR of every pair slot.
* :func:`vvp_episode_shard`: a range of one manifest's episodes — VVP from the cached token
  features and the support masks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import zarr

from pipeline.clip.loader import ClipBundle
from pipeline.images import load_normalized
from pipeline.priors.extract import extract_priors
from pipeline.priors.vtp import PromptBank
from pipeline.priors.vvp import mask_to_grid, vvp


@dataclass
class Extractor:
    """A loaded CLIP with its prompt embeddings and the extraction options."""

    bundle: ClipBundle
    bank: PromptBank
    class_text: torch.Tensor  # (C, E) MaskCLIP class embeddings
    image_size: int
    prompt_set: str = "target"
    pir_blocks: int = 8
    pir_threshold: float = 0.4
    batch_size: int = 64
    autocast: bool = False

    @property
    def device(self) -> torch.device:
        return next(self.bundle.model.parameters()).device

    def load_images(self, paths: Sequence[str]) -> torch.Tensor:
        """``(B, 3, S, S)`` normalised images (bicubic resize to the CLIP input side)."""
        return load_normalized(paths, self.image_size, self.bundle.mean, self.bundle.std, self.device)

    def autocast_context(self):
        if not self.autocast:
            return nullcontext()
        kind = self.device.type
        return torch.autocast(kind, dtype=torch.float16 if kind == "cuda" else torch.bfloat16)

    def priors(self, images: torch.Tensor, pair_classes: Sequence[Sequence[int]],
               image_labels: Sequence[Sequence[int]]):
        """:func:`extract_priors` for images whose pairs are ``pair_classes[i]``."""
        pair_image = torch.tensor([i for i, cs in enumerate(pair_classes) for _ in cs], dtype=torch.long)
        flat = [c for cs in pair_classes for c in cs]
        with self.autocast_context():
            return extract_priors(
                self.bundle.model, images, pair_image.to(self.device), flat, image_labels, self.bank,
                self.class_text, prompt_set=self.prompt_set, pir_blocks=self.pir_blocks,
                pir_threshold=self.pir_threshold)


def extract_image_shard(
    root: zarr.Group, rows: range, paths: Sequence[str], pair_classes: Sequence[Sequence[int]],
    image_labels: Sequence[Sequence[int]], ex: Extractor,
) -> None:
    """Fill image rows ``rows`` (``paths`` etc. are given for these rows only)."""
    n = len(rows)
    names = ("images/maskclip_scores", "images/maskclip_labels", "images/tokens_0", "images/tokens_1",
             "pairs/class_id", "pairs/vtp", "pairs/pir")
    out = {name: np.zeros((n, *root[name].shape[1:]), root[name].dtype) for name in names}
    for start in range(0, n, ex.batch_size):
        part = slice(start, min(start + ex.batch_size, n))
        got = ex.priors(ex.load_images(paths[part]), pair_classes[part], image_labels[part])
        out["images/maskclip_scores"][part] = got.maskclip_scores.cpu().numpy()
        out["images/maskclip_labels"][part] = got.maskclip_labels.cpu().numpy()
        out["images/tokens_0"][part] = got.tokens[0].float().cpu().numpy()
        out["images/tokens_1"][part] = got.tokens[1].float().cpu().numpy()
        p = 0
        for i, classes in enumerate(pair_classes[part], start=start):
            for slot, c in enumerate(classes):
                out["pairs/class_id"][i, slot] = c
                out["pairs/vtp"][i, slot] = got.vtp[p].cpu().numpy()
                out["pairs/pir"][i, slot] = got.pir[p].cpu().numpy()
                p += 1
    for name, values in out.items():
        root[name][rows.start: rows.stop] = values


def vvp_episode_shard(
    root: zarr.Group, manifest: str, episodes: pd.DataFrame, support_mask: Callable[[str, int], np.ndarray],
    mean_over_shots: bool,
) -> None:
    """Fill the VVP rows of ``episodes`` (consecutive rows of one manifest).

    ``support_mask(image_id, class_id)`` gives the ``(H, W)`` binary mask of a support.
    """
    grid = tuple(root.attrs["grid"])
    rows = {image: i for i, image in enumerate(root.attrs["image_ids"])}
    needed = sorted({rows[i] for i in episodes["query"]}
                    | {rows[s] for ss in episodes["supports"] for s in ss})
    local = {r: j for j, r in enumerate(needed)}
    tokens = [torch.from_numpy(root[f"images/tokens_{b}"].oindex[needed, :, :].astype(np.float32))
              for b in (0, 1)]
    grids: dict[tuple[str, int], torch.Tensor] = {}
    maps = []
    for row in episodes.itertuples():
        for s in row.supports:
            if (s, row.class_id) not in grids:
                mask = torch.from_numpy(np.asarray(support_mask(s, int(row.class_id)), np.float32))
                grids[s, row.class_id] = mask_to_grid(mask, grid).flatten()
        q = local[rows[row.query]]
        sup = [local[rows[s]] for s in row.supports]
        masks = torch.stack([grids[s, row.class_id] for s in row.supports])[None]
        per_block = [vvp(t[q][None], t[sup][None], masks, grid)[0] for t in tokens]  # 2 x (K, h, w)
        episode = torch.stack(per_block, dim=1)  # (K, 2, h, w)
        maps.append(episode.mean(0, keepdim=True) if mean_over_shots else episode)
    start = int(episodes["episode"].iloc[0])
    root[f"episodes/{manifest}/vvp"][start: start + len(maps)] = torch.stack(maps).numpy().astype(np.float16)
