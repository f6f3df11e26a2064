"""Everything a fold's training or evaluation reads, loaded once into memory.

* :class:`FoldInputs` — the three stores (features, priors, pseudo-masks) and the bank of the
  images of the manifests a run reads (:func:`open_fold_inputs`).
* :class:`ImageBank` — per image: backbone features (``data/features.zarr``), the CLIP tokens of
  two blocks and the MaskCLIP scores (``data/priors.zarr``, for VVP and for pseudo-masks made in
  the training step) and the label map; held in memory when the fold's
  images fit the reader's ``cache_bytes``, else read by rows as batches ask (:class:`StoredRows`),
  so memory stays in proportion to a batch whatever the dataset's size.
* :class:`EpisodeTable` — per episode of one manifest: image rows, class, the masks at the
  feature grid (pseudo-masks from ``data/pseudo_masks.zarr``, or ground-truth support masks
  under ``supervision: mask``; none for pseudo-masks the training step makes) and the VTP of
  query and supports; ``batch`` slices it into :class:`~pipeline.model.lfss.Episodes`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.core.cores import usable_cores
from pipeline.core.metrics import binary_target
from pipeline.core.params import ModelParams
from pipeline.core.tensors import mask_to_grid
from pipeline.datasets.episodes import episode_images
from pipeline.features.store import FeatureStore
from pipeline.model.lfss import Episodes
from pipeline.priors.store import PriorStore
from pipeline.pseudomasks.online import MaskInputs
from pipeline.pseudomasks.oracle import truth_mask
from pipeline.pseudomasks.store import PseudoMaskStore, Role

CHUNK = 500  # episodes per pseudo-mask conversion
T = TypeVar("T")


@dataclass
class StoredRows:
    """Bank rows of a store array, read when indexed: ``stored[rows]`` is ``(*rows.shape, ...)``
    like indexing the in-memory tensor of ``shape`` would be."""

    read: Callable[[list[str]], np.ndarray]  # image ids -> their rows
    ids: list[str]  # bank row -> image id
    shape: tuple[int, ...]

    def __getitem__(self, rows: torch.Tensor) -> torch.Tensor:
        rows = torch.as_tensor(rows)
        got = self.read([self.ids[r] for r in rows.flatten().tolist()])
        return torch.from_numpy(got).view(*rows.shape, *self.shape[1:])


class StoredLabels(Sequence):
    """Label maps read from their PNG files when indexed by bank row."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, row: int) -> np.ndarray:
        return np.array(Image.open(self.paths[row]))

    def shape(self, row: int) -> tuple[int, int]:
        """``(H, W)`` of label ``row``, from its PNG header."""
        with Image.open(self.paths[row]) as image:
            return image.height, image.width


@dataclass
class ImageBank:
    """Per-image inputs, row ``rows[image_id]``: in-memory tensors, or :class:`StoredRows` and
    :class:`StoredLabels` that read a batch's rows from the stores (same values, same indexing).

    Attributes:
        features: ``(I, C, h, w)`` float16; tokens: ``(I, 2, N, D)`` float16.
        labels: ``I`` label maps (uint8, own size).
        scores: ``(I, C', hp, wp)`` float16 MaskCLIP scores (None: a bank for stored pseudo-masks only).
    """

    rows: dict[str, int]
    features: torch.Tensor | StoredRows
    tokens: torch.Tensor | StoredRows
    labels: Sequence[np.ndarray]
    scores: torch.Tensor | StoredRows | None = None

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.features.shape[-2:])

    def label_shapes(self, rows: torch.Tensor) -> list[tuple[int, int]]:
        """``(H, W)`` of the labels of ``rows`` (without reading stored labels' pixels)."""
        if isinstance(self.labels, StoredLabels):
            return [self.labels.shape(r) for r in rows.tolist()]
        return [tuple(self.labels[r].shape) for r in rows.tolist()]

    def targets(self, rows: torch.Tensor, classes: torch.Tensor, size: int | None = None) -> torch.Tensor:
        """``(B, H, W)`` uint8 FSS targets (1 class, 0 other, 255 ignore); ``size``: labels resized
        (nearest) to ``size × size``, else every label must share one size."""
        labels = [self.labels[r] for r in rows.tolist()]
        if size is not None:
            labels = [
                lab
                if lab.shape == (size, size)
                else np.asarray(Image.fromarray(lab).resize((size, size), Image.NEAREST))
                for lab in labels
            ]
        return binary_target(torch.from_numpy(np.stack(labels)), classes)


def load_bank(
    image_ids: Sequence[str], features: FeatureStore, priors: PriorStore, label_paths: dict[str, str]
) -> ImageBank:
    """The bank of ``image_ids``: loaded into memory when the stores hold their arrays in memory
    (they fit the readers' ``cache_bytes``), else reading rows as batches ask for them."""
    ids = sorted(set(image_ids))
    rows = {i: r for r, i in enumerate(ids)}
    arrays = [(features, "features"), (priors, "images/tokens_0"), (priors, "images/tokens_1"),
              (priors, "images/maskclip_scores")]
    if all(store.cached(name) is not None for store, name in arrays):
        labels = [np.array(Image.open(label_paths[i])) for i in ids]
        return ImageBank(rows, features.read(ids), torch.from_numpy(priors.tokens(ids)), labels,
                         torch.from_numpy(priors.maskclip_scores(ids)))
    feature_shape = (len(ids), *features.root["features"].shape[1:])
    token_shape = (len(ids), 2, *priors.root["images/tokens_0"].shape[1:])
    score_shape = (len(ids), *priors.root["images/maskclip_scores"].shape[1:])
    return ImageBank(rows, StoredRows(lambda i: features.read(i).numpy(), ids, feature_shape),
                     StoredRows(priors.tokens, ids, token_shape), StoredLabels([label_paths[i] for i in ids]),
                     StoredRows(priors.maskclip_scores, ids, score_shape))


@dataclass
class FoldInputs:
    """The stores a fold's training or evaluation reads, and the bank of its images."""

    features: FeatureStore
    priors: PriorStore
    pseudo: PseudoMaskStore
    bank: ImageBank

    def episodes(self, name: str, table: pd.DataFrame, cfg: ModelParams, *, online_masks: bool = False,
                 vtp_threshold: float | None = None) -> EpisodeTable:
        return load_episodes(name, table, self.bank, self.pseudo, self.priors, cfg, online_masks=online_masks,
                             vtp_threshold=vtp_threshold)


def open_fold_inputs(
    index: pd.DataFrame, manifests: dict[str, pd.DataFrame], names: Sequence[str],
    features: Path, priors: Path, pseudo_masks: Path, *, cache_bytes: int,
) -> FoldInputs:
    """Open the stores and load the bank of every image of the manifests ``names`` (in memory when
    the stores' arrays fit ``cache_bytes``)."""
    stores = (FeatureStore(features, cache_bytes=cache_bytes), PriorStore(priors, cache_bytes=cache_bytes),
              PseudoMaskStore(pseudo_masks))
    labels = dict(zip(index.image_id, index.mask_path, strict=True))
    bank = load_bank(episode_images(manifests[n] for n in names), stores[0], stores[1], labels)
    return FoldInputs(*stores, bank)


@dataclass
class EpisodeTable:
    """One manifest's episodes as tensors (``E`` episodes, ``K`` shots).

    Attributes:
        query: ``(E,)``, supports: ``(E, K)`` bank rows; classes: ``(E,)``.
        query_mask: ``(E, h, w)``; support_mask: ``(E, K, h, w)`` float16 at the feature grid; None
            where the training step makes the pseudo-masks (:meth:`mask_inputs`).
        query_vtp: ``(E, hp, wp)``; support_vtp: ``(E, K, hp, wp)`` float16.
        raw_vtp: the raw VTP ``(query, supports)`` that online pseudo-masks threshold, when they do.
    """

    name: str
    query: torch.Tensor
    supports: torch.Tensor
    classes: torch.Tensor
    query_mask: torch.Tensor | None
    support_mask: torch.Tensor | None
    query_vtp: torch.Tensor
    support_vtp: torch.Tensor
    raw_vtp: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def online_masks(self) -> bool:
        """Whether the pseudo-masks are made in the training step."""
        return self.query_mask is None

    def __len__(self) -> int:
        return len(self.query)

    @property
    def shots(self) -> int:
        return self.supports.shape[1]

    def batch(self, bank: ImageBank, index: torch.Tensor, shot: int = 0) -> Episodes:
        """Episodes ``index`` with support ``shot`` (float16 tensors; ``.to(device)`` makes them float)."""
        q, s = self.query[index], self.supports[index, shot]
        return Episodes(
            query=bank.features[q],
            query_mask=None if self.query_mask is None else self.query_mask[index],
            support=bank.features[s],
            support_mask=None if self.support_mask is None else self.support_mask[index, shot],
            query_vtp=self.query_vtp[index],
            support_vtp=self.support_vtp[index, shot],
            query_tokens=bank.tokens[q],
            support_tokens=bank.tokens[s],
        )

    def mask_inputs(self, bank: ImageBank, index: torch.Tensor, shot: int = 0) -> MaskInputs:
        """What the pseudo-masks of episodes ``index`` (support ``shot``) are made from."""
        q, s = self.query[index], self.supports[index, shot : shot + 1]
        vtp = (None, None)
        if self.raw_vtp is not None:
            vtp = (self.raw_vtp[0][index], self.raw_vtp[1][index, shot : shot + 1])
        return MaskInputs(bank.scores[q], bank.scores[s], self.classes[index], *vtp)


def load_episodes(
    name: str, table: pd.DataFrame, bank: ImageBank, pseudo: PseudoMaskStore, priors: PriorStore,
    cfg: ModelParams, *, online_masks: bool = False, vtp_threshold: float | None = None,
) -> EpisodeTable:
    """The tensors of manifest ``name`` (rows of ``table``, in order). ``online_masks``: its
    pseudo-masks are not read from the store but made in the training step, from the raw VTP
    too when ``vtp_threshold`` is set (:class:`~pipeline.pseudomasks.online.OnlineRefiner`)."""
    shots = len(table["supports"].iloc[0])
    query = torch.tensor([bank.rows[i] for i in table["query"]])
    supports = torch.tensor([[bank.rows[s] for s in ss] for ss in table["supports"]]).view(-1, shots)
    classes = torch.tensor(table["class_id"].to_numpy(np.int64))
    grid = bank.grid
    kind = cfg.pseudo_masks
    online_masks = online_masks and kind != "truth"

    def to_grid(role: Role) -> torch.Tensor:  # CHUNK episodes at a time: memory O(CHUNK)
        return torch.cat([mask_to_grid(torch.from_numpy(pseudo.masks(name, role, kind, range(s, s + CHUNK))),
                                       grid).half() for s in range(0, len(table), CHUNK)])

    def truth(rows: torch.Tensor, morph: int) -> torch.Tensor:  # each label at its own size
        of_class = classes.repeat_interleave(rows.shape[1]) if rows.dim() == 2 else classes
        masks = [mask_to_grid(torch.from_numpy(truth_mask(bank.labels[r], c, morph)), grid)
                 for r, c in zip(rows.flatten().tolist(), of_class.tolist(), strict=True)]
        return torch.stack(masks).half().view(*rows.shape, *grid)

    if kind == "truth":
        query_mask = truth(query, cfg.truth_morph)
    else:
        query_mask = None if online_masks else to_grid("query")
    if cfg.supervision == "mask":
        support_mask = truth(supports, 0)
    elif kind == "truth":
        support_mask = truth(supports, cfg.truth_morph)
    else:
        support_mask = None if online_masks else to_grid("support")
    query_vtp = torch.from_numpy(priors.vtp_of(list(table["query"]), table["class_id"].to_numpy(), cfg.pir))
    support_ids = [s for ss in table["supports"] for s in ss]
    support_classes = np.repeat(table["class_id"].to_numpy(), shots)
    support_vtp = torch.from_numpy(priors.vtp_of(support_ids, support_classes, cfg.pir))
    raw_vtp = None
    if online_masks and vtp_threshold is not None:
        raw_vtp = (torch.from_numpy(priors.vtp_of(list(table["query"]), table["class_id"].to_numpy(), False)),
                   torch.from_numpy(priors.vtp_of(support_ids, support_classes, False)).view(
                       len(table), shots, *query_vtp.shape[1:]))
    return EpisodeTable(
        name,
        query,
        supports,
        classes,
        query_mask,
        support_mask,
        query_vtp,
        support_vtp.view(len(table), shots, *query_vtp.shape[1:]),
        raw_vtp,
    )


class _Made(torch.utils.data.Dataset):
    def __init__(self, make: Callable[[int], Any], n: int) -> None:
        self.make, self.n = make, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        return self.make(i)


# Loader processes by default, when batches are read from the stores or decode images: on a CPU a
# few (the model's threads need the cores); for a GPU every core but two (the process driving the
# GPU, and the system). One process makes 43-190 stored-feature episodes/s of the LFSS preset (a
# shared Xeon VM / an idle AMD EPYC) and 70-110 online PI-CLIP ones (benchmarks/throughput.py
# --host-only); an H200 may take ~230-590 LFSS episodes/s (projected: docs/operations.md "Feeding a
# GPU"), so a fixed 8 could starve it. Each holds two batches in flight (~0.3 GB for the LFSS preset).
CPU_LOADERS, GPU_SPARE_CORES = 4, 2


def loader_workers(bank: ImageBank, requested: int | None, *, images: bool = False,
                   device: torch.device | str = "cpu") -> int:
    """Processes that read batches ahead: ``requested``, or by default none for a bank in memory
    (nothing to read) and, for one read from the stores or for batches that decode ``images``
    (online features, letterboxed evaluation), up to ``CPU_LOADERS`` — for a model on a GPU, every
    core this process may use but ``GPU_SPARE_CORES`` — never more than those cores."""
    if requested is not None:
        return requested
    if isinstance(bank.features, torch.Tensor) and not images:
        return 0
    cores = usable_cores()
    if torch.device(device).type == "cuda":
        return max(1, cores - GPU_SPARE_CORES)
    return min(CPU_LOADERS, cores)


def _as_made(item: Any) -> Any:
    return item  # no conversion: numpy label maps stay numpy


def prefetched(make: Callable[[int], T], n: int, workers: int) -> Iterator[T]:
    """``make(0), ..., make(n - 1)`` in order, made ahead by ``workers`` DataLoader processes (2
    items each in flight) or, with none, here as they are needed. The global RNG is left alone
    either way (the loader gets a generator of its own), so results never depend on ``workers``."""
    if workers == 0:
        return map(make, range(n))
    loader = torch.utils.data.DataLoader(_Made(make, n), batch_size=None, num_workers=workers,
                                         collate_fn=_as_made, prefetch_factor=2, generator=torch.Generator())
    return iter(loader)


def upsample(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(B, h, w)`` -> ``(B, H, W)`` bilinear."""
    return F.interpolate(logits[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
