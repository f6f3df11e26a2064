"""Batches whose features are computed where they are used: training under
``train.features: online`` and evaluation under ``evaluate.resize: pfenet`` (letterboxed input).

The batch carries normalised images (read as the features stage reads them: squashed to
``S × S``, bicubic) instead of stored features; the training step runs the frozen backbone on
them, on the device, and rounds its output to float16 as the store does, so that without
augmentation an online batch equals a precomputed one. With ``train.augment: papers`` each image
is seen through a random view (:mod:`pipeline.fewshot.augment`), and so are its label and its
stored priors; the pseudo-masks are then made from the view's features and scores.

The loader does only what needs the host (:func:`online_batch`: decode and resize, read the stored
priors and labels, draw the views); normalising, warping and the targets are per-pixel work and run
where the training step does (:meth:`OnlineBatch.finish`): on a GPU, each loader process then
makes 6.6x the batches (``benchmarks/throughput.py --host-only``: the warps were 93 % of its
work). On a CPU the same operations run in the same order, so the values are the same.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch

from pipeline.core.images import load_resized, normalize
from pipeline.core.metrics import binary_target
from pipeline.core.params import TrainParams
from pipeline.core.tensors import mask_to_grid
from pipeline.fewshot.augment import letterbox_views, random_views, warp, warp_labels
from pipeline.fewshot.data import EpisodeTable, ImageBank
from pipeline.model.lfss import Episodes
from pipeline.pseudomasks.online import MaskInputs


@dataclass(frozen=True)
class ImageSource:
    """Where the bank's images are and how the backbone takes them."""

    paths: list[str]  # bank row -> image path
    size: int  # S: the backbone's input side (backbone.image_size)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def of_bank(
        cls, bank: ImageBank, index: pd.DataFrame, size: int, backbone: torch.nn.Module
    ) -> ImageSource:
        """The images of ``bank`` (paths from the dataset ``index``) as ``backbone`` takes them."""
        path_of = dict(zip(index.image_id, index.image_path, strict=True))
        paths = [path_of[image] for image in sorted(bank.rows, key=bank.rows.__getitem__)]
        return cls(paths, size, backbone.mean, backbone.std)

    def pixels(self, rows: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` uint8 images of bank ``rows``, resized (:func:`normalize` them)."""
        return load_resized([self.paths[r] for r in rows.tolist()], self.size)

    def load(self, rows: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` normalised images of bank ``rows``."""
        return normalize(self.pixels(rows), self.mean, self.std)


@torch.no_grad()
def stored_features(backbone: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``(B, 3, S, S)`` normalised images -> ``(B, C, h, w)`` features as the features stage stores
    them: the frozen backbone in float32 whatever the autocast, rounded to float16, contiguous."""
    with torch.autocast(images.device.type, enabled=False):
        return backbone(images).half().float().contiguous()  # the stored layout: kernels (and so
        # rounding) follow memory layout, and the trunk's output is a channels-last view


def with_features(shots: list[Episodes], backbone: torch.nn.Module) -> list[Episodes]:
    """The K shots of one batch (one query: its features are computed once) whose query and
    support are images, with their :func:`stored_features` instead."""
    query = stored_features(backbone, shots[0].query)
    return [replace(x, query=query, support=stored_features(backbone, x.support)) for x in shots]


def view_seed(seed: int, epoch: int, step: int) -> int:
    """The seed of one training step's random views: a function of (seed, epoch, step) only, so
    views do not depend on loader workers and a resumed run sees the same ones."""
    return int(np.random.SeedSequence([seed, epoch, step]).generate_state(1)[0])


def _tokens_as_maps(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``(B, 2, N, D)`` -> ``(B, 2 D, hp, wp)``."""
    b, blocks, _, d = tokens.shape
    return tokens.float().permute(0, 1, 3, 2).reshape(b, blocks * d, *grid)


def _maps_as_tokens(maps: torch.Tensor, blocks: int) -> torch.Tensor:
    b, channels = maps.shape[:2]
    return maps.reshape(b, blocks, channels // blocks, -1).permute(0, 1, 3, 2)


def _warped(x: torch.Tensor | None, theta: torch.Tensor) -> torch.Tensor | None:
    """``(B, H, W)`` or ``(B, C, H, W)`` maps seen through the views ``theta``, at their own size."""
    if x is None:
        return None
    if x.dim() == 3:
        return warp(x[:, None].float(), theta, tuple(x.shape[-2:]))[:, 0]
    return warp(x.float(), theta, tuple(x.shape[-2:]))


@dataclass
class ImageBatch:
    """One role's (query or support) inputs of a batch, before the backbone."""

    images: torch.Tensor  # (B, 3, S, S)
    vtp: torch.Tensor  # (B, hp, wp)
    tokens: torch.Tensor  # (B, 2, N, D)
    scores: torch.Tensor | None = None  # (B, C, hp, wp) MaskCLIP scores (pseudo-masks made online)
    raw_vtp: torch.Tensor | None = None  # (B, hp, wp): the VTP an initial mask is thresholded with
    mask: torch.Tensor | None = None  # (B, h, w) stored pseudo-mask

    def to(self, device: torch.device | str) -> ImageBatch:
        moved = (None if v is None else v.to(device, non_blocking=True) for v in vars(self).values())
        return ImageBatch(*moved)

    def viewed(self, theta: torch.Tensor) -> ImageBatch:
        """This batch seen through the views ``theta`` ``(B, 2, 3)``: every map warped at its own size."""
        grid = tuple(self.vtp.shape[-2:])
        tokens = _maps_as_tokens(_warped(_tokens_as_maps(self.tokens, grid), theta), self.tokens.shape[1])
        images, vtp, scores, raw_vtp, mask = (
            _warped(x, theta) for x in (self.images, self.vtp, self.scores, self.raw_vtp, self.mask))
        return ImageBatch(images, vtp, tokens, scores, raw_vtp, mask)


@dataclass
class OnlineBatch:
    """An online training batch as the loader leaves it (:func:`online_batch`): per role (query,
    support) the uint8 pixels and the stored priors as read, and either the random views drawn
    with the labels at their own sizes, or the targets already made (no augmentation).

    Attributes:
        query, support: the roles' :class:`ImageBatch` (``images`` uint8 ``(B, 3, S, S)``).
        classes: ``(B,)``; views: ``(B, 2, 3)`` per role, or None.
        labels: per role the ``B`` label maps ``(H_i, W_i)`` (with views), else None.
        targets: per role ``(B, L, L)`` uint8 (without views), else None.
        support_mask: ``(B, h, w)`` ground-truth support masks (``supervision: mask``), or None.
    """

    query: ImageBatch
    support: ImageBatch
    classes: torch.Tensor
    mean: tuple[float, float, float]  # the backbone's normalisation
    std: tuple[float, float, float]
    label_size: int
    grid: tuple[int, int]
    views: tuple[torch.Tensor, torch.Tensor] | None = None
    labels: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
    targets: tuple[torch.Tensor, torch.Tensor] | None = None
    support_mask: torch.Tensor | None = None

    def finish(self, device: torch.device | str) -> tuple[Episodes, MaskInputs, torch.Tensor, torch.Tensor]:
        """On ``device``: the images normalised and every map seen through its view; the episodes
        (images in place of features, no pseudo-masks yet), what those are made from, and the
        query and support targets ``(B, L, L)``. Under views, ground-truth support masks come
        from the viewed label."""
        roles = {}
        for role, batch in (("query", self.query), ("support", self.support)):
            batch = batch.to(device)
            roles[role] = replace(batch, images=normalize(batch.images, self.mean, self.std, device))
        classes = self.classes.to(device)
        support_mask = None if self.support_mask is None else self.support_mask.to(device)
        if self.views is None:
            targets = tuple(t.to(device) for t in self.targets)
        else:
            side = (self.label_size, self.label_size)
            targets = []
            for role, theta, labels in zip(roles, self.views, self.labels, strict=True):
                theta = theta.to(device)
                roles[role] = roles[role].viewed(theta)
                seen = warp_labels([lab.to(device) for lab in labels], theta, side)
                targets.append(binary_target(seen, classes))
            if support_mask is not None:
                support_mask = mask_to_grid(targets[1] == 1, self.grid).half()
        q, s = roles["query"], roles["support"]
        x = Episodes(query=q.images, query_mask=None, support=s.images, support_mask=support_mask,
                     query_vtp=q.vtp, support_vtp=s.vtp, query_tokens=q.tokens, support_tokens=s.tokens)
        made = MaskInputs(q.scores, s.scores[:, None], classes, q.raw_vtp,
                          None if s.raw_vtp is None else s.raw_vtp[:, None])
        return x, made, targets[0], targets[1]


def online_batch(
    table: EpisodeTable, bank: ImageBank, index: torch.Tensor, cfg: TrainParams, source: ImageSource,
    seed: int,
) -> OnlineBatch:
    """Episodes ``index`` with images in place of features, as the loader reads them: pixels,
    stored priors and labels, and under ``train.augment: papers`` every image's random view,
    drawn from ``seed`` (query views first); :meth:`OnlineBatch.finish` does the rest."""
    classes = table.classes[index]
    masks = table.mask_inputs(bank, index)
    raw_support = None if masks.support_vtp is None else masks.support_vtp[:, 0]
    roles = {
        "query": (table.query[index], table.query_vtp[index], masks.query_scores, masks.query_vtp),
        "support": (table.supports[index, 0], table.support_vtp[index, 0], masks.support_scores[:, 0],
                    raw_support),
    }
    generator = torch.Generator().manual_seed(seed)
    batches, views, labels, targets = {}, [], [], []
    for role, (rows, vtp, scores, raw) in roles.items():
        batches[role] = ImageBatch(source.pixels(rows), vtp, bank.tokens[rows], scores, raw)
        if cfg.augment == "papers":
            labels.append([torch.from_numpy(bank.labels[r]) for r in rows.tolist()])
            views.append(random_views(generator, [tuple(lab.shape) for lab in labels[-1]],
                                      tuple(cfg.augment_scale), cfg.augment_rotate))
        else:
            targets.append(bank.targets(rows, classes, cfg.label_size))
    support_mask = None if table.support_mask is None else table.support_mask[index, 0]
    augmented = cfg.augment == "papers"
    return OnlineBatch(batches["query"], batches["support"], classes, source.mean, source.std,
                       cfg.label_size, bank.grid,
                       tuple(views) if augmented else None, tuple(labels) if augmented else None,
                       None if augmented else tuple(targets), support_mask)


def letterboxed_batch(
    table: EpisodeTable, bank: ImageBank, index: torch.Tensor, source: ImageSource
) -> list[Episodes]:
    """Every shot's Episodes ``index`` as the PFENet protocol feeds them: each image letterboxed
    into the ``S × S`` canvas (:func:`~pipeline.fewshot.augment.letterbox_views`, from the label's
    size), as images for the backbone, with its stored masks, VTP and tokens seen through the same
    view. The query is read and letterboxed once for all shots."""
    def letterboxed(rows: torch.Tensor, vtp: torch.Tensor, mask: torch.Tensor) -> ImageBatch:
        batch = ImageBatch(source.load(rows), vtp, bank.tokens[rows], mask=mask)
        return batch.viewed(letterbox_views(bank.label_shapes(rows)))

    q = letterboxed(table.query[index], table.query_vtp[index], table.query_mask[index])
    shots = []
    for shot in range(table.shots):
        s = letterboxed(table.supports[index, shot], table.support_vtp[index, shot],
                        table.support_mask[index, shot])
        shots.append(Episodes(query=q.images, query_mask=q.mask, support=s.images, support_mask=s.mask,
                              query_vtp=q.vtp, support_vtp=s.vtp, query_tokens=q.tokens,
                              support_tokens=s.tokens))
    return shots
