"""`pseudo_masks`: language-guided pseudo-masks of every episode and their quality.

Reads ``data/index``, ``data/episodes``, ``data/priors.zarr`` (MaskCLIP scores, VTP) and
``data/features.zarr`` (the frozen backbone's features); writes ``data/pseudo_masks.zarr``
(layout: ``pipeline/pseudomasks/store.py``; every manifest but the training episodes under
``train.sampling: epoch`` or ``train.features: online``, whose masks the training step makes) and
``data/metrics/pseudo_masks.json``: per fold, the mIoU of the initial and refined support and
query masks of the 1-shot test episodes against the ground truth (the LFSS paper's Table 3).
Episode shards resume after a crash.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import zarr
from prefect import flow

from pipeline.core.artifacts import Staging, fingerprint, write_json, zarr_shard_files
from pipeline.core.cores import threads_per_task
from pipeline.core.orchestration import concurrency, gather, run_flow, run_shards
from pipeline.core.params import BackboneParams, Params, PseudoMaskParams
from pipeline.datasets.episodes import read_manifests
from pipeline.datasets.index import read_index_dir
from pipeline.features.store import FeatureStore
from pipeline.priors.store import PriorStore
from pipeline.pseudomasks import quality, store
from pipeline.pseudomasks.tasks import evaluate_task, refine_task
from stages._common import stage_main


def evaluated_manifests(manifests: dict) -> dict[int, str]:
    """Fold -> its first 1-shot test manifest."""
    chosen: dict[int, str] = {}
    for name in sorted(manifests):
        table = manifests[name]
        if name.startswith("test/") and int(table["shot"].iloc[0]) == 1:
            chosen.setdefault(int(table["fold"].iloc[0]), name)
    return chosen


def stored_manifests(episodes_dir: Path, training: bool) -> dict:
    """The manifests whose masks the stage stores: every one, or all but the training episodes."""
    manifests = read_manifests(episodes_dir)
    return {name: table for name, table in manifests.items() if training or not name.startswith("train/")}


def shard_plan(manifests: dict, features: Path, size: int, batch_size: int, budget: int) -> tuple[int, int]:
    """Episodes per shard and how many shard tasks fit ``budget`` bytes at once."""
    shots = max(int(t["shot"].max()) for t in manifests.values())
    attrs = FeatureStore(features).attrs
    shape = (attrs["channels"], *attrs["grid"])
    shard = store.shard_episodes(shots, shape, size, budget)
    return shard, store.shards_at_once(shard, batch_size, shots, shape, size, budget)


@flow(name="pseudo-masks")
def build_pseudo_masks(cfg: PseudoMaskParams, backbone: BackboneParams, index_dir: Path, episodes_dir: Path,
                       priors: Path, features: Path, out: Path, metrics_path: Path, workers: int,
                       cache_bytes: int, shard: int, stored_training_masks: bool = True) -> dict:
    index, meta = read_index_dir(index_dir)
    manifests = stored_manifests(episodes_dir, stored_training_masks)
    priors_attrs = PriorStore(priors).attrs
    features_attrs = FeatureStore(features).attrs
    staging = Staging(out, fingerprint([cfg.model_dump(), backbone.model_dump(), priors_attrs["clip_sha256"],
                                        priors_attrs["params"], features_attrs["backbone"],
                                        features_attrs["clip_sha256"],
                                        (episodes_dir / "meta.json").read_text(), shard, sorted(manifests)]))
    store.create(zarr.open_group(staging.path, mode="a"), manifests, backbone.image_size, shard)
    context = (str(features), str(priors), backbone, cfg, cache_bytes)
    zarr_path, here = str(staging.path), os.getcwd()
    threads = threads_per_task(workers)
    jobs = {f"{m.replace('/', '-')}-{s:06d}": (m, t.iloc[s: s + shard])
            for m, t in manifests.items() for s in range(0, len(t), shard)}
    def files(name: str) -> list[Path]:
        manifest, episodes = jobs[name]
        return zarr_shard_files(staging.path, int(episodes["episode"].iloc[0]) // shard,
                                [f"{manifest}/{array}" for array in store.ARRAYS])

    run_shards(staging, lambda name: refine_task.submit(zarr_path, name, *jobs[name], context, threads, here),
               jobs, "pseudo-masks: episode shards", files)
    mask_paths = dict(zip(index.image_id, index.mask_path, strict=True))
    chosen = evaluated_manifests(manifests)
    meters = gather([evaluate_task.submit(zarr_path, m, manifests[m], mask_paths, len(meta["class_names"]),
                                          here) for m in chosen.values()])
    metrics: dict = {f"fold{fold}": quality.figures(fold_meters)
                     for fold, fold_meters in zip(chosen, meters, strict=True)}
    metrics["mean"] = {key: round(sum(m[key] for m in metrics.values()) / len(chosen), 2)
                       for key in next(iter(metrics.values()))}
    metrics |= {"evaluated": sorted(chosen.values()), "params": cfg.model_dump(), "backbone": backbone.name,
                "size": backbone.image_size}
    staging.commit()
    write_json(metrics_path, metrics)
    return metrics


def run(params: Params, args: argparse.Namespace) -> None:
    training = params.train.sampling == "pool" and params.train.features == "precomputed"
    budget = params.orchestration.cache_bytes
    shard, at_once = shard_plan(stored_manifests(Path(args.episodes), training), Path(args.features),
                                params.backbone.image_size, params.pseudo_masks.batch_size, budget)
    # Its tasks hold no model, only a batch of features on the device: on a GPU several shards at once
    # keep it busy (one task's host work, the feature reads, makes 60-100 episodes/s a core, a third
    # to a half of what an H200 refines: docs/operations.md "Feeding a GPU"), as many as the budget holds.
    n = concurrency(params.orchestration, on_device=False, at_most=at_once)
    metrics = run_flow(build_pseudo_masks, params.orchestration, on_device=False, at_most=at_once,
                       cfg=params.pseudo_masks,
                       backbone=params.backbone, index_dir=Path(args.index), episodes_dir=Path(args.episodes),
                       priors=Path(args.priors), features=Path(args.features), out=Path(args.out),
                       metrics_path=Path(args.metrics), workers=n,
                       cache_bytes=budget, shard=shard, stored_training_masks=training)
    print(f"pseudo_masks: mean over folds {json.dumps(metrics['mean'])}")


def main(argv: list[str] | None = None) -> int:
    return stage_main("pseudo_masks", run, {
        "index": "data/index", "episodes": "data/episodes", "priors": "data/priors.zarr",
        "features": "data/features.zarr", "out": "data/pseudo_masks.zarr",
        "metrics": "data/metrics/pseudo_masks.json",
    }, argv)


if __name__ == "__main__":
    raise SystemExit(main())
