"""The unit of work of the pseudo_masks stage: a range of one manifest's episodes.

Per shard the features of its unique images are read from ``data/features.zarr``, every
(image, class) pair's initial mask and background similarity are computed once, then the
episodes are refined in batches (:func:`pipeline.pseudomasks.refine.refine_masks`) and written
to their rows of ``data/pseudo_masks.zarr`` (whole Zarr shards: parallel writers never share one).
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
    """Fill the rows of ``episodes`` (consecutive rows of one manifest)."""
    ids = sorted(set(episodes["query"]) | {s for ss in episodes["supports"] for s in ss})
    local = {image: j for j, image in enumerate(ids)}
    # float16 as stored (half the memory); each batch is widened to float32 (exactly) as it is used
    feats, labels = refiner.features.read(ids).to(refiner.device), refiner.labels(ids)
    # every (image, class) pair once: its initial mask and its background similarity
    shot = len(episodes["supports"].iloc[0])
    classes = episodes["class_id"].astype(int).to_numpy()
    s_pairs = [(s, c) for ss, c in zip(episodes["supports"], classes, strict=True) for s in ss]
    q_pairs = list(zip(episodes["query"], classes, strict=True))
    pairs = sorted(set(s_pairs) | set(q_pairs))
    slot = {p: j for j, p in enumerate(pairs)}
    rows = torch.tensor([local[i] for i, _ in pairs])
    chunks = [slice(j, j + refiner.batch_size) for j in range(0, len(pairs), refiner.batch_size)]
    init = torch.cat([refiner.initial(labels[rows[part]], *map(list, zip(*pairs[part], strict=True)))
                      for part in chunks])
    grid = feats.shape[-2:]
    background = torch.cat([background_similarity(feats[rows[part]].float(), mask_to_grid(init[part], grid),
                                                  refiner.temperature) for part in chunks])
    out = {name: [] for name in ARRAYS}
    for start in range(0, len(episodes), refiner.batch_size):
        stop = min(start + refiner.batch_size, len(episodes))
        s_slots = torch.tensor([slot[p] for p in s_pairs[start * shot: stop * shot]])
        q_slots = torch.tensor([slot[p] for p in q_pairs[start: stop]])
        s_init, q_init = init[s_slots].view(stop - start, shot, *init.shape[1:]), init[q_slots]
        s_feats = feats[rows[s_slots]].float().view(stop - start, shot, *feats.shape[1:])
        q_feats = feats[rows[q_slots]].float()
        known = torch.cat([background[s_slots], background[q_slots]])
        s_ref, q_ref = refine_masks(s_feats, s_init, q_feats, q_init, alpha=refiner.alpha,
                                    temperature=refiner.temperature, background=known)
        out["support_initial"].append(s_init)
        out["support_refined"].append(s_ref)
        out["query_initial"].append(q_init)
        out["query_refined"].append(q_ref)
    first = int(episodes["episode"].iloc[0])
    for name, parts in out.items():
        root[f"{manifest}/{name}"][first: first + len(episodes)] = torch.cat(parts).cpu().numpy()
