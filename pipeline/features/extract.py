"""The unit of work of the features stage: the frozen backbone over a range of image rows."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import zarr

from pipeline.core.images import load_resized, normalize, read_ahead
from pipeline.core.interrupt import check_stop
from pipeline.core.shard_rows import aligned_zeros, write_shard
from pipeline.features.backbone import Backbone


@torch.no_grad()
def extract_shard(
    root: zarr.Group, rows: range, paths: Sequence[str], backbone: Backbone, size: int, batch_size: int = 64
) -> None:
    """Fill ``features[rows]`` from the images at ``paths`` (one per row); for a backbone on a GPU
    the next batch's images are decoded while it computes. Each batch's float16 features are
    copied once, into the shard's page-aligned buffer that goes to disk as it is."""
    check_stop()  # a stop requested: the shard is not started
    device = next(backbone.parameters()).device
    array = root["features"]
    out = aligned_zeros((len(paths), *array.shape[1:]), array.dtype)

    def load(part: slice) -> torch.Tensor:
        check_stop()  # a stop requested: no further batch is read
        return load_resized(paths[part], size)

    for part, pixels in read_ahead(load, len(paths), batch_size, ahead=device.type == "cuda"):
        images = normalize(pixels, backbone.mean, backbone.std, device)
        torch.from_numpy(out[part]).copy_(backbone(images))  # rounded to float16 as it is copied
    write_shard(array, rows.start, out)
