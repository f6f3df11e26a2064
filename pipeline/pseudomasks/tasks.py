"""The ``pseudo_masks`` stage's Prefect tasks, importable by any worker.

A task a stage submits is pickled by reference to its module: a Dask worker on another machine
(or in another working directory) imports this module, never the stage's ``__main__``. Its
inputs are plain data (paths as the stage got them and the stage's working directory, an
episode table, the frozen params); the stores are opened once per worker process.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pandas as pd
import torch
import zarr
from prefect import task

from pipeline.core.orchestration import on_worker
from pipeline.core.params import BackboneParams, PseudoMaskParams
from pipeline.features.store import FeatureStore
from pipeline.priors.store import PriorStore
from pipeline.pseudomasks import quality, store
from pipeline.pseudomasks.shards import Refiner, refine_shard


@cache
def refiner(features: str, priors: str, backbone: BackboneParams, cfg: PseudoMaskParams,
            cache_bytes: int) -> Refiner:
    """The features and the priors, opened once per process."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    temperature = cfg.temperature if cfg.attention == "cosine" else None
    stores = (FeatureStore(Path(features), cache_bytes=cache_bytes),
              PriorStore(Path(priors), cache_bytes=cache_bytes))
    return Refiner(*stores, backbone.image_size,
                   alpha=cfg.alpha, temperature=temperature, vtp_threshold=cfg.vtp_threshold,
                   batch_size=cfg.batch_size, device=device)


@task
def refine_task(zarr_path: str, name: str, manifest: str, episodes: pd.DataFrame, context: tuple,
                threads: int, stage_dir: str) -> str:
    """Fill the rows of ``episodes`` (consecutive rows of ``manifest``) in the store at
    ``zarr_path``; ``context``: :func:`refiner`'s arguments (relative paths, here and there, are
    from ``stage_dir``). Returns ``name``, the shard's."""
    torch.set_num_threads(threads)
    features, priors, *options = context
    refine_shard(zarr.open_group(on_worker(zarr_path, stage_dir), mode="r+"), manifest, episodes,
                 refiner(on_worker(features, stage_dir), on_worker(priors, stage_dir), *options))
    return name


@task
def evaluate_task(zarr_path: str, manifest: str, episodes: pd.DataFrame, mask_paths: dict[str, str],
                  num_classes: int, stage_dir: str) -> dict[str, quality.FewShotMeter]:
    """The quality meters of ``manifest``'s stored masks against the ground truth at ``mask_paths``
    (image id -> mask file; relative paths are from ``stage_dir``)."""
    return quality.evaluate(store.PseudoMaskStore(Path(on_worker(zarr_path, stage_dir))), manifest, episodes,
                            lambda image: on_worker(mask_paths[image], stage_dir), num_classes)
