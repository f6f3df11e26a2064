"""``data/features.zarr``: frozen backbone features of every image any episode uses.

::

    attrs: image_ids, backbone (params), channels, grid, clip_sha256
    features   (I, C, h, w)  float16   row i is image_ids[i]

The backbone is frozen, so its features are computed once and shared by training and
evaluation of every fold. Work is split into shards of ``SHARD`` images (one Zarr shard each).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import zarr

from pipeline.errors import PipelineError
from pipeline.images import load_normalized
from pipeline.model.backbone import Backbone

SHARD = 256  # images per shard


def create(root: zarr.Group, count: int, channels: int, grid: tuple[int, int], attrs: dict) -> None:
    """The empty array (kept when a resumed run already made it)."""
    if "features" not in root:
        shape = (count, channels, *grid)
        root.create_array(
            "features",
            shape=shape,
            dtype="float16",
            chunks=(1, *shape[1:]),
            shards=(SHARD, *shape[1:]),
            fill_value=0,
        )
    root.attrs.update({**attrs, "channels": channels, "grid": list(grid)})


@torch.no_grad()
def extract_shard(
    root: zarr.Group, rows: range, paths: Sequence[str], backbone: Backbone, size: int, batch_size: int = 64
) -> None:
    """Fill ``features[rows]`` from the images at ``paths`` (one per row)."""
    device = next(backbone.parameters()).device
    out = []
    for start in range(0, len(paths), batch_size):
        images = load_normalized(paths[start : start + batch_size], size, backbone.mean, backbone.std, device)
        out.append(backbone(images).to(torch.float16).cpu())
    root["features"][rows.start : rows.stop] = torch.cat(out).numpy()


class FeatureStore:
    """Read access to ``data/features.zarr`` by image id."""

    def __init__(self, path: Path) -> None:
        try:
            self.root = zarr.open_group(Path(path), mode="r")
        except FileNotFoundError:
            raise PipelineError(f"{path}: missing (run the features stage)") from None
        self.attrs = dict(self.root.attrs)
        self.rows = {image: i for i, image in enumerate(self.attrs["image_ids"])}

    def read(self, image_ids: Sequence[str]) -> torch.Tensor:
        """``(len(image_ids), C, h, w)`` float16 features."""
        try:
            rows = [self.rows[i] for i in image_ids]
        except KeyError as exc:
            raise PipelineError(f"features: image {exc.args[0]!r} is in no episode manifest") from None
        return torch.from_numpy(self.all[rows])

    @cached_property
    def all(self) -> np.ndarray:
        """``(I, C, h, w)`` float16: the whole array, read once (far faster than row selections)."""
        return self.root["features"][:]
