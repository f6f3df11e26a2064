"""``data/features.zarr``: frozen backbone features of every image any episode uses.

::

    attrs: image_ids, backbone (params), channels, grid, clip_sha256
    features   (I, C, h, w)  float16   row i is image_ids[i]

The backbone is frozen, so its features are computed once and shared by training and
evaluation of every fold. Work is split into shards of :func:`shard_images` images (one Zarr
shard each, ``attrs["shard"]``), each filled by :func:`pipeline.features.extract.extract_shard`,
which holds a whole shard in memory before writing it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import zarr

from pipeline.core.artifacts import StoreReader
from pipeline.core.errors import PipelineError
from pipeline.core.shard_rows import RAW_ROWS

MAX_SHARD = 256  # images per shard at most
SHARD_BYTES = 2**28  # float16 features a shard holds at most (256 MiB)


def shard_images(channels: int, grid: tuple[int, int]) -> int:
    """Images per shard: as many as fit ``SHARD_BYTES`` (256 for the embedded benchmark's
    192 x 16 x 16, 24 for ResNet-50's 1536 x 60 x 60 at 473 px), at most ``MAX_SHARD``."""
    return max(1, min(MAX_SHARD, SHARD_BYTES // (2 * channels * grid[0] * grid[1])))


def create(root: zarr.Group, count: int, channels: int, grid: tuple[int, int], attrs: dict) -> int:
    """The empty array (kept when a resumed run already made it); returns the images per shard."""
    shard = shard_images(channels, grid)
    if "features" not in root:
        shape = (count, channels, *grid)
        root.create_array(
            "features",
            shape=shape,
            dtype="float16",
            chunks=(1, *shape[1:]),
            shards=(shard, *shape[1:]),
            fill_value=0,
            **RAW_ROWS,  # read by rows straight from the shard files (pipeline/core/shard_rows.py)
        )
    root.attrs.update({**attrs, "channels": channels, "grid": list(grid), "shard": shard})
    return shard


class FeatureStore(StoreReader):
    """Read access to ``data/features.zarr`` by image id (rows read as asked, or the whole array
    when it fits ``cache_bytes``)."""

    stage = "features"

    def __init__(self, path: Path, *, cache_bytes: int = 0) -> None:
        super().__init__(path, cache_bytes=cache_bytes)
        self.rows = {image: i for i, image in enumerate(self.attrs["image_ids"])}

    def read(self, image_ids: Sequence[str]) -> torch.Tensor:
        """``(len(image_ids), C, h, w)`` float16 features."""
        try:
            rows = [self.rows[i] for i in image_ids]
        except KeyError as exc:
            raise PipelineError(f"features: image {exc.args[0]!r} is in no episode manifest") from None
        return torch.from_numpy(self.read_rows("features", rows))
