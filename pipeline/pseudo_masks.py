"""``data/pseudo_masks.zarr``: language-guided pseudo-masks of every episode, and their mIoU.

::

    <manifest>/support_initial   (E, K, S, S) bool   MaskCLIP label == class (∧ VTP >= threshold)
    <manifest>/support_refined   (E, K, S, S) bool   after the self-supported refiner
    <manifest>/query_initial     (E, S, S)    bool
    <manifest>/query_refined     (E, S, S)    bool

S is ``backbone.image_size``; episode e of ``test/fold0/shot1_seed0`` is row e. Work is split
into shards of episodes (one Zarr shard each): per shard the features of the unique images are
read from ``data/features.zarr``, every (image, class) pair's initial mask and background similarity
are computed once, then the episodes are refined in batches (:func:`pipeline.masks.refine_masks`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import zarr
from PIL import Image

from pipeline.clip.dense import labels_from_scores
from pipeline.features import FeatureStore
from pipeline.masks import background_similarity, initial_masks, refine_masks
from pipeline.metrics import FewShotMeter, binary_target
from pipeline.priors.store import PriorStore
from pipeline.priors.vvp import mask_to_grid

SHARD = 1000  # episodes per shard
ARRAYS = ("support_initial", "support_refined", "query_initial", "query_refined")


def create(root: zarr.Group, manifests: dict[str, pd.DataFrame], size: int) -> None:
    """The empty arrays of every manifest (kept when a resumed run already made them)."""
    for name, table in manifests.items():
        shot = int(table["shot"].max())
        for array in ARRAYS:
            if f"{name}/{array}" in root:
                continue
            per_episode = (shot, size, size) if array.startswith("support") else (size, size)
            shape = (len(table), *per_episode)
            root.create_array(f"{name}/{array}", shape=shape, dtype="bool", chunks=(1, *shape[1:]),
                              shards=(SHARD, *shape[1:]), fill_value=False)


@dataclass
class Refiner:
    """What a shard needs: the backbone, the priors, and the options."""

    features: FeatureStore  # the frozen backbone's features (data/features.zarr)
    priors: PriorStore
    size: int
    alpha: float = 0.5
    temperature: float | None = 0.1  # None: Eq. 4's dot-product attention
    vtp_threshold: float | None = None
    batch_size: int = 64

    device: str = "cpu"

    def labels(self, ids: list[str]) -> torch.Tensor:
        """``(I, S, S)`` MaskCLIP label maps (class ids) from the stored scores."""
        rows = [self.priors.row(i) for i in ids]
        scores = torch.from_numpy(self.priors.root["images/maskclip_scores"].oindex[rows].astype(np.float32))
        return torch.cat([labels_from_scores(scores[i: i + self.batch_size], (self.size, self.size)) + 1
                          for i in range(0, len(rows), self.batch_size)])

    def initial(self, labels: torch.Tensor, images: list[str], classes: list[int]) -> torch.Tensor:
        vtp = None
        if self.vtp_threshold is not None:
            maps = [self.priors.vtp(i, c) for i, c in zip(images, classes, strict=True)]
            vtp = torch.from_numpy(np.stack(maps))
        return initial_masks(labels, torch.tensor(classes), vtp, self.vtp_threshold or 0.0)


def refine_shard(root: zarr.Group, manifest: str, episodes: pd.DataFrame, refiner: Refiner) -> None:
    """Fill the rows of ``episodes`` (consecutive rows of one manifest)."""
    ids = sorted(set(episodes["query"]) | {s for ss in episodes["supports"] for s in ss})
    local = {image: j for j, image in enumerate(ids)}
    feats, labels = refiner.features.read(ids).to(refiner.device).float(), refiner.labels(ids)
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
    background = torch.cat([background_similarity(feats[rows[part]], mask_to_grid(init[part], grid),
                                                  refiner.temperature) for part in chunks])
    out = {name: [] for name in ARRAYS}
    for start in range(0, len(episodes), refiner.batch_size):
        stop = min(start + refiner.batch_size, len(episodes))
        s_slots = torch.tensor([slot[p] for p in s_pairs[start * shot: stop * shot]])
        q_slots = torch.tensor([slot[p] for p in q_pairs[start: stop]])
        s_init, q_init = init[s_slots].view(stop - start, shot, *init.shape[1:]), init[q_slots]
        s_feats = feats[rows[s_slots]].view(stop - start, shot, *feats.shape[1:])
        known = torch.cat([background[s_slots], background[q_slots]])
        s_ref, q_ref = refine_masks(s_feats, s_init, feats[rows[q_slots]], q_init, refiner.alpha,
                                    refiner.temperature, known)
        out["support_initial"].append(s_init)
        out["support_refined"].append(s_ref)
        out["query_initial"].append(q_init)
        out["query_refined"].append(q_ref)
    first = int(episodes["episode"].iloc[0])
    for name, parts in out.items():
        root[f"{manifest}/{name}"][first: first + len(episodes)] = torch.cat(parts).cpu().numpy()


def evaluate(
    root: zarr.Group, manifest: str, episodes: pd.DataFrame, label_path: Callable[[str], str],
    num_classes: int,
) -> dict[str, FewShotMeter]:
    """Meters of the four mask kinds against the ground truth, at each label's own size."""
    meters = {name: FewShotMeter(num_classes) for name in ARRAYS}
    arrays = {name: root[f"{manifest}/{name}"][:] for name in ARRAYS}
    for row in episodes.itertuples():
        e, c = int(row.episode), torch.tensor([int(row.class_id)])
        for role, images in (("support", row.supports), ("query", [row.query])):
            for k, image in enumerate(images):
                truth = binary_target(torch.from_numpy(np.array(Image.open(label_path(image))))[None], c)
                for kind in ("initial", "refined"):
                    masks = arrays[f"{role}_{kind}"][e]
                    mask = masks[k] if role == "support" else masks
                    pred = F.interpolate(torch.from_numpy(mask)[None, None].float(), size=truth.shape[-2:],
                                         mode="nearest")[0].to(torch.uint8)
                    meters[f"{role}_{kind}"].update(pred, truth, c)
    return meters
