"""The unit of work of the pseudo_masks stage: a range of one manifest's episodes.

Per shard every (image, class) pair's initial mask and background similarity are computed once,
then the episodes are refined in batches (:func:`pipeline.pseudomasks.refine.refine_masks`), each
batch reading its images' features from ``data/features.zarr`` and writing its masks to their
rows of ``data/pseudo_masks.zarr`` (one task per Zarr shard: parallel writers never share one).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import zarr

from pipeline.clip.dense import labels_from_scores
from pipeline.core.interrupt import check_stop
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

    def on_device(self, stored: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Stored float16 values as float32 on the device: moved as stored, widened there (exact)."""
        return torch.as_tensor(stored).to(self.device).float()

    def labels(self, ids: list[str]) -> torch.Tensor:
        """``(I, S, S)`` MaskCLIP label maps (class ids) from the stored scores, on the device (the
        upsampling to ``S`` is most of the stage's per-pixel work), each distinct image's once."""
        distinct = sorted(set(ids))
        scores = self.on_device(self.priors.maskclip_scores(distinct))
        maps = torch.cat([labels_from_scores(scores[i: i + self.batch_size], (self.size, self.size)) + 1
                          for i in range(0, len(distinct), self.batch_size)])
        row = {image: j for j, image in enumerate(distinct)}
        return maps if distinct == ids else maps[[row[image] for image in ids]]

    def initial(self, labels: torch.Tensor, images: list[str], classes: list[int]) -> torch.Tensor:
        """``(P, S, S)`` bool initial masks of the pairs ``(images[j], classes[j])``, on the device."""
        vtp = None
        if self.vtp_threshold is not None:  # one read for every pair
            vtp = self.on_device(self.priors.vtp_of(images, classes, refined=False))
        return initial_masks(labels, torch.tensor(classes, device=labels.device), vtp,
                             vtp_threshold=self.vtp_threshold)


def pack_masks(masks: torch.Tensor) -> np.ndarray:
    """``(P, S, S)`` bool -> ``(P, ⌈S²/8⌉)`` uint8, eight pixels a byte."""
    return np.packbits(masks.cpu().numpy().reshape(len(masks), -1), axis=1)


def unpack_masks(packed: np.ndarray, size: int) -> torch.Tensor:
    """The inverse of :func:`pack_masks`: ``(P, S, S)`` bool."""
    bits = np.unpackbits(packed, axis=1, count=size * size)
    return torch.from_numpy(bits.view(bool).reshape(len(packed), size, size))


def refine_shard(root: zarr.Group, manifest: str, episodes: pd.DataFrame, refiner: Refiner) -> None:
    """Fill the rows of ``episodes`` (consecutive rows of one manifest), batch by batch.

    Every (image, class) pair's initial mask (its MaskCLIP label map: most of the stage's work)
    and background similarity are computed once per shard and kept, ``S²`` bits and ``(h, w)``
    floats a pair (a pair recurs in many episodes: 5-shot test episodes reuse a few hundred
    images thousands of times); features (read float16 as stored, widened exactly to float32) and
    refined masks live for one batch, whose masks are written as it finishes. So a shard's
    memory grows with its episodes by at most :func:`pipeline.pseudomasks.store.kept_bytes`."""
    def features(pairs: list[tuple[str, int]]) -> torch.Tensor:
        return refiner.on_device(refiner.features.read([image for image, _ in pairs]))

    def initial(pairs: list[tuple[str, int]]) -> torch.Tensor:
        images, classes = map(list, zip(*pairs, strict=True))
        return refiner.initial(refiner.labels(images), images, classes)

    shot = len(episodes["supports"].iloc[0])
    classes = episodes["class_id"].astype(int).to_numpy()
    s_pairs = [(s, c) for ss, c in zip(episodes["supports"], classes, strict=True) for s in ss]
    q_pairs = list(zip(episodes["query"], classes, strict=True))
    pairs = sorted(set(s_pairs) | set(q_pairs))
    slot = {p: j for j, p in enumerate(pairs)}
    background, kept = [], []
    for j in range(0, len(pairs), refiner.batch_size):
        check_stop()
        part = pairs[j: j + refiner.batch_size]
        feats, masks = features(part), initial(part)
        kept.append(pack_masks(masks))
        grids = mask_to_grid(masks.to(refiner.device), feats.shape[-2:])
        background.append(background_similarity(feats, grids, refiner.temperature))
    background, kept = torch.cat(background), np.concatenate(kept)
    arrays = {name: root[f"{manifest}/{name}"] for name in ARRAYS}
    first = int(episodes["episode"].iloc[0])
    for start in range(0, len(episodes), refiner.batch_size):
        check_stop()
        stop = min(start + refiner.batch_size, len(episodes))
        s_part, q_part = s_pairs[start * shot: stop * shot], q_pairs[start: stop]
        n = len(s_part)  # supports first, then queries: one read for both
        rows = [slot[p] for p in s_part + q_part]
        init = unpack_masks(kept[rows], refiner.size).to(refiner.device)
        feats, known = features(s_part + q_part), background[rows]
        s_init = init[:n].view(stop - start, shot, *init.shape[1:])
        s_ref, q_ref = refine_masks(feats[:n].view(stop - start, shot, *feats.shape[1:]), s_init,
                                    feats[n:], init[n:], alpha=refiner.alpha,
                                    temperature=refiner.temperature, background=known)
        done = {"support_initial": s_init, "support_refined": s_ref, "query_initial": init[n:],
                "query_refined": q_ref}
        for name, masks in done.items():
            arrays[name][first + start: first + stop] = masks.cpu().numpy()
