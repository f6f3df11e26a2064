"""The layout of ``data/priors.zarr`` (Zarr 3, sharded; the tokens raw, the rest compressed) and its reader.

::

    attrs: clip_sha256, preprocess, params, grid, class_names, image_ids, manifests, ...
    images/maskclip_scores   (I, C, h, w)     float16  cosine with each class's text
    images/maskclip_labels   (I, h, w)        uint8    MaskCLIP label map, class ids 1..C
    images/tokens_0, _1      (I, N, D)        float16  VVP token features (earlier block first)
    pairs/class_id           (I, S)           int16    class of each pair slot, 0 = empty
    pairs/vtp, pairs/pir     (I, S, h, w)     float16  raw and PIR-refined VTP

Image row i is ``image_ids[i]``; an (image, class) pair lives at ``(row, slot)``. Every array
shares one shard grid (``shard_size`` images), so each writer task owns whole Zarr shards:
parallel writers never share one. VVP is not stored: it depends on the support mask the model is
given (a pseudo-mask, a ground-truth mask, or circle inference's predicted mask), so the model
computes it from the stored token features (:meth:`PriorStore.vvp` does the same for one episode).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import zarr

from pipeline.clip.dense import labels_from_scores
from pipeline.core.artifacts import StoreReader
from pipeline.core.errors import PipelineError
from pipeline.core.shard_rows import RAW_ROWS
from pipeline.core.tensors import mask_to_grid
from pipeline.priors.vvp import vvp


@dataclass(frozen=True)
class Layout:
    """Sizes that fix every array's shape."""

    num_images: int
    slots: int  # most pairs any image has
    num_classes: int
    grid: tuple[int, int]
    token_dims: tuple[int, int]
    shard_size: int


def create(path: Path, layout: Layout, attrs: dict[str, Any]) -> zarr.Group:
    """Create the empty arrays (or open them, when a resumed run already did)."""
    root = zarr.open_group(path, mode="a")
    if "layout_done" in root.attrs:
        return root
    n, s, (h, w), shard = layout.num_images, layout.slots, layout.grid, layout.shard_size
    tokens = h * w

    def array(name: str, shape: tuple[int, ...], dtype: str, rows: int, **options) -> None:
        root.create_array(name, shape=shape, dtype=dtype, chunks=(1, *shape[1:]),
                          shards=(rows, *shape[1:]), fill_value=0, overwrite=True, **options)

    array("images/maskclip_scores", (n, layout.num_classes, h, w), "float16", shard)
    array("images/maskclip_labels", (n, h, w), "uint8", shard)
    for j, dim in enumerate(layout.token_dims):
        array(f"images/tokens_{j}", (n, tokens, dim), "float16", shard, **RAW_ROWS)  # the large rows
    array("pairs/class_id", (n, s), "int16", shard)
    array("pairs/vtp", (n, s, h, w), "float16", shard)
    array("pairs/pir", (n, s, h, w), "float16", shard)
    root.attrs.update({**attrs, "grid": list(layout.grid), "slots": s, "shard_size": shard,
                       "layout_done": True})
    return root


class PriorStore(StoreReader):
    """Read access to ``data/priors.zarr`` by image id and (image, class) pair (rows read as
    asked, or whole arrays when they fit ``cache_bytes``)."""

    stage = "priors"

    def __init__(self, path: Path, *, cache_bytes: int = 0) -> None:
        super().__init__(path, cache_bytes=cache_bytes)
        self.rows = {image: i for i, image in enumerate(self.attrs["image_ids"])}

    @cached_property
    def pairs(self) -> pd.DataFrame:
        """One row per (image, class) pair: ``image_id, class_id, row, slot``."""
        classes = self.read("pairs/class_id")  # (I, S) int16: small at any size
        rows, slots = np.nonzero(classes)
        ids = np.asarray(self.attrs["image_ids"], dtype=object)
        return pd.DataFrame({"image_id": ids[rows], "class_id": classes[rows, slots],
                             "row": rows, "slot": slots})

    def _pair(self, image_id: str, class_id: int) -> tuple[int, int]:
        row = self.row(image_id)
        slots = np.flatnonzero(self.read("pairs/class_id", row) == class_id)
        if not len(slots):
            raise PipelineError(f"priors: no VTP for class {class_id} of image {image_id!r} "
                                "(not a class any episode asks of it)")
        return row, int(slots[0])

    def row(self, image_id: str) -> int:
        try:
            return self.rows[image_id]
        except KeyError:
            raise PipelineError(f"priors: image {image_id!r} is in no episode manifest") from None

    def vtp(self, image_id: str, class_id: int, refined: bool = False) -> np.ndarray:
        """``(h, w)`` float32 VTP (``refined``: after PIR)."""
        row, slot = self._pair(image_id, class_id)
        return self.read("pairs/pir" if refined else "pairs/vtp", (row, slot)).astype(np.float32)

    def maskclip_labels(self, image_id: str, size: tuple[int, int] | None = None) -> np.ndarray:
        """MaskCLIP label map (class ids 1..C): on the token grid, or at ``size`` ``(H, W)`` as the
        argmax of the scores upsampled bilinearly (MaskCLIP's pixel label map)."""
        if size is None:
            return self.read("images/maskclip_labels", self.row(image_id))
        scores = torch.from_numpy(self.read("images/maskclip_scores", self.row(image_id)).astype(np.float32))
        return (labels_from_scores(scores[None], size)[0] + 1).numpy().astype(np.uint8)

    def maskclip_scores(self, image_ids: Sequence[str]) -> np.ndarray:
        """``(I, C, h, w)`` float16 MaskCLIP scores of ``image_ids``."""
        return self.read_rows("images/maskclip_scores", [self.row(i) for i in image_ids])

    def tokens(self, image_ids: Sequence[str]) -> np.ndarray:
        """``(I, 2, N, D)`` float16 VVP token features of two blocks (earlier first)."""
        rows = [self.row(i) for i in image_ids]
        return np.stack([self.read_rows(f"images/tokens_{b}", rows) for b in (0, 1)], 1)

    def vtp_of(self, image_ids: Sequence[str], class_ids: Sequence[int], refined: bool) -> np.ndarray:
        """``(P, h, w)`` float16 VTP of P (image, class) pairs (``refined``: after PIR)."""
        rows = np.asarray([self.row(i) for i in image_ids])
        classes = self.read_rows("pairs/class_id", rows)
        hit = classes == np.asarray(class_ids)[:, None]
        if not hit.any(1).all():
            bad = int(np.flatnonzero(~hit.any(1))[0])
            raise PipelineError(f"priors: no VTP for class {class_ids[bad]} of image {image_ids[bad]!r}")
        maps = self.read_rows("pairs/pir" if refined else "pairs/vtp", rows)
        return maps[np.arange(len(rows)), hit.argmax(1)]

    def vvp(self, query: str, supports: Sequence[str], support_masks: Sequence[np.ndarray]) -> np.ndarray:
        """``(K, 2, h, w)`` float32 VVP of one episode: one binary ``(H, W)`` mask per support, each
        at its image's own size."""
        grid = tuple(self.attrs["grid"])
        tokens = torch.from_numpy(self.tokens([query, *supports]).astype(np.float32))  # (1 + K, 2, N, D)
        masks = torch.stack([mask_to_grid(torch.from_numpy(np.asarray(m)), grid).flatten()
                             for m in support_masks])[None]
        maps = [vvp(tokens[:1, b], tokens[None, 1:, b], masks, grid)[0] for b in (0, 1)]
        return torch.stack(maps, 1).numpy()
