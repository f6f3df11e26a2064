"""The unit of work of the features stage: the frozen backbone over a range of image rows."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import zarr

from pipeline.core.images import load_normalized
from pipeline.core.interrupt import check_stop
from pipeline.features.backbone import Backbone


@torch.no_grad()
def extract_shard(
    root: zarr.Group, rows: range, paths: Sequence[str], backbone: Backbone, size: int, batch_size: int = 64
) -> None:
    """Fill ``features[rows]`` from the images at ``paths`` (one per row)."""
    device = next(backbone.parameters()).device
    out = []
    for start in range(0, len(paths), batch_size):
        check_stop()
        images = load_normalized(paths[start : start + batch_size], size, backbone.mean, backbone.std, device)
        out.append(backbone(images).to(torch.float16).cpu())
    root["features"][rows.start : rows.stop] = torch.cat(out).numpy()
