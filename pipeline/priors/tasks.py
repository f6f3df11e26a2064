"""The ``priors`` stage's Prefect tasks, importable by any worker.

A task a stage submits is pickled by reference to its module: a Dask worker on another machine
(or in another working directory) imports this module, never the stage's ``__main__``. Its
inputs are plain data (paths as the stage got them and the stage's working directory, ranges,
lists, the frozen params); what it loads (the CLIP) is loaded once per worker process.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch
import zarr
from prefect import task

from pipeline.core.orchestration import on_worker
from pipeline.core.params import PriorsParams
from pipeline.priors.shards import Extractor, extract_image_shard, load_extractor


@cache
def extractor(clip_dir: str, cfg: PriorsParams, names: tuple[str, ...]) -> Extractor:
    """The CLIP of ``clip_dir`` and the prompt embeddings of ``names``, loaded once per process."""
    return load_extractor(Path(clip_dir), cfg, names)


@task
def image_shard(zarr_path: str, name: str, rows: range, paths: list[str], pair_classes: list[list[int]],
                labels: list[list[int]], clip_dir: str, cfg: PriorsParams, names: tuple[str, ...],
                threads: int, stage_dir: str) -> str:
    """Fill image rows ``rows`` of the priors store at ``zarr_path`` (``paths``: the rows' images,
    ``pair_classes``: each image's episode classes, ``labels``: its ground-truth classes; relative
    paths are from ``stage_dir``); returns ``name``, the shard's."""
    torch.set_num_threads(threads)
    ex = extractor(on_worker(clip_dir, stage_dir), cfg, names)
    extract_image_shard(zarr.open_group(on_worker(zarr_path, stage_dir), mode="r+"), rows,
                        [on_worker(p, stage_dir) for p in paths], pair_classes, labels, ex)
    return name
