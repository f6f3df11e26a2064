"""The unit of work of the pseudo_masks stage: a range of one manifest's episodes.

Per shard every (image, class) pair's initial mask and background similarity are computed once,
then the episodes are refined in batches (:func:`pipeline.pseudomasks.refine.refine_masks`), each
batch reading its images' features from ``data/features.zarr``, and the masks are written to their
rows of ``data/pseudo_masks.zarr`` (whole Zarr shards: parallel writers never share one).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import zarr

from pipeline.clip.dense import labels_from_scores
from pipeline.core.tensors import mask_to_grid
from pipeline.features.store import FeatureStore
from pipeline.priors.store import PriorStore
from pipeline.pseudomasks.refine import background_similarity, initial_masks, refine_masks
from pipeline.pseudomasks.store import ARRAYS


@dataclass
class Refiner:
    """What a shard needs: the backbone, the priors, and the options."""

    features: FeatureStore  # the frozen backbone's features (data/features.zarr)
    priors: PriorStore
    size: int
    alpha: float
    temperature: float | None  # None: Eq. 4's dot-product attention
    vtp_threshold: float | None
    batch_size: int
    device: str

    def labels(self, ids: list[str]) -> torch.Tensor:
        """``(I, S, S)`` MaskCLIP label maps (class ids) from the stored scores."""
        scores = torch.from_numpy(self.priors.maskclip_scores(ids).astype(np.float32))
        return torch.cat([labels_from_scores(scores[i: i + self.batch_size], (self.size, self.size)) + 1
                          for i in range(0, len(ids), self.batch_size)])

    def initial(self, labels: torch.Tensor, images: list[str], classes: list[int]) -> torch.Tensor:
        vtp = None
        if self.vtp_threshold is not None:
            maps = [self.priors.vtp(i, c) for i, c in zip(images, classes, strict=True)]
            vtp = torch.from_numpy(np.stack(maps))
        return initial_masks(labels, torch.tensor(classes), vtp, vtp_threshold=self.vtp_threshold)


def refine_shard(root: zarr.Group, manifest: str, episodes: pd.DataFrame, refiner: Refiner) -> None:
    """Fill the rows of ``episodes`` (consecutive rows of one manifest).

    Features are read batch by batch (float16 as stored, widened exactly to float32), never for
    the whole shard at once: the shard's working memory is its batches' and its masks', however
    many distinct images its episodes use."""
    def features(images: list[str]) -> torch.Tensor:
        return refiner.features.read(images).to(refiner.device).float()

    # every (image, class) pair once: its initial mask and its background similarity
    shot = len(episodes["supports"].iloc[0])
    classes = episodes["class_id"].astype(int).to_numpy()
    s_pairs = [(s, c) for ss, c in zip(episodes["supports"], classes, strict=True) for s in ss]
    q_pairs = list(zip(episodes["query"], classes, strict=True))
    pairs = sorted(set(s_pairs) | set(q_pairs))
    slot = {p: j for j, p in enumerate(pairs)}
    init, background = [], []
    for j in range(0, len(pairs), refiner.batch_size):
        images, pair_classes = map(list, zip(*pairs[j: j + refiner.batch_size], strict=True))
        feats = features(images)
        init.append(refiner.initial(refiner.labels(images), images, pair_classes))
        background.append(background_similarity(feats, mask_to_grid(init[-1], feats.shape[-2:]),
                                                refiner.temperature))
    init, background = torch.cat(init), torch.cat(background)
    out = {name: [] for name in ARRAYS}
    for start in range(0, len(episodes), refiner.batch_size):
        stop = min(start + refiner.batch_size, len(episodes))
        s_slots = torch.tensor([slot[p] for p in s_pairs[start * shot: stop * shot]])
        q_slots = torch.tensor([slot[p] for p in q_pairs[start: stop]])
        s_init, q_init = init[s_slots].view(stop - start, shot, *init.shape[1:]), init[q_slots]
        s_feats = features([i for i, _ in s_pairs[start * shot: stop * shot]])
        q_feats = features([i for i, _ in q_pairs[start: stop]])
        known = torch.cat([background[s_slots], background[q_slots]])
        s_ref, q_ref = refine_masks(s_feats.view(stop - start, shot, *s_feats.shape[1:]), s_init, q_feats,
                                    q_init, alpha=refiner.alpha, temperature=refiner.temperature,
                                    background=known)
        out["support_initial"].append(s_init)
        out["support_refined"].append(s_ref)
        out["query_initial"].append(q_init)
        out["query_refined"].append(q_ref)
    first = int(episodes["episode"].iloc[0])
    for name, parts in out.items():
        root[f"{manifest}/{name}"][first: first + len(episodes)] = torch.cat(parts).cpu().numpy()
