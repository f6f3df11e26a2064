"""The unit of work of the features stage: the frozen backbone over a range of image rows."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import zarr

from pipeline.core.images import load_resized, normalize, read_ahead
from pipeline.core.interrupt import check_stop
from pipeline.core.shard_rows import write_shard
from pipeline.features.backbone import Backbone


@torch.no_grad()
def extract_shard(
    root: zarr.Group, rows: range, paths: Sequence[str], backbone: Backbone, size: int, batch_size: int = 64
) -> None:
    """Fill ``features[rows]`` from the images at ``paths`` (one per row); for a backbone on a GPU
    the next batch's images are decoded while it computes."""
    device = next(backbone.parameters()).device

    def load(part: slice) -> torch.Tensor:
        check_stop()  # a stop requested: no further batch is read
        return load_resized(paths[part], size)

    out = []
    for _, pixels in read_ahead(load, len(paths), batch_size, ahead=device.type == "cuda"):
        images = normalize(pixels, backbone.mean, backbone.std, device)
        out.append(backbone(images).to(torch.float16).cpu())
    write_shard(root["features"], rows.start, torch.cat(out).numpy())
