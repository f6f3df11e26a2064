"""The ``features`` stage's Prefect task, importable by any worker.

A task a stage submits is pickled by reference to its module: a Dask worker on another machine
(or in another working directory) imports this module, never the stage's ``__main__``. Its
inputs are plain data (paths as the stage got them and the stage's working directory, a range,
the frozen params); the backbone is loaded once per worker process.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch
import zarr
from prefect import task

from pipeline.core.orchestration import on_worker
from pipeline.core.params import BackboneParams
from pipeline.features.backbone import Backbone, load_backbone
from pipeline.features.extract import extract_shard


@cache
def backbone_for(clip_dir: str, cfg: BackboneParams) -> Backbone:
    """The frozen backbone (on CUDA when present), loaded once per process."""
    return load_backbone(cfg, Path(clip_dir), "cuda" if torch.cuda.is_available() else "cpu")


@task
def shard_task(zarr_path: str, name: str, rows: range, paths: list[str], clip_dir: str, cfg: BackboneParams,
               threads: int, stage_dir: str) -> str:
    """Fill ``features[rows]`` of the store at ``zarr_path`` from the images at ``paths`` (one per
    row; relative paths are from ``stage_dir``); returns ``name``, the shard's."""
    torch.set_num_threads(threads)
    extract_shard(zarr.open_group(on_worker(zarr_path, stage_dir), mode="r+"), rows,
                  [on_worker(p, stage_dir) for p in paths], backbone_for(on_worker(clip_dir, stage_dir), cfg),
                  cfg.image_size)
    return name
