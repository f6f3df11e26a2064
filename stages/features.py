"""`features`: frozen backbone features of every image any episode uses.

Reads ``data/index``, ``data/episodes`` and ``data/models/clip`` (for ``backbone.name: clip``);
writes ``data/features.zarr`` (layout: ``pipeline/features/store.py``), computed once for the
training and evaluation of every fold. Image shards resume after a crash.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import zarr
from prefect import flow

from pipeline.clip.loader import SHA_FILE
from pipeline.core.artifacts import Staging, fingerprint, zarr_shard_files
from pipeline.core.cores import threads_per_task
from pipeline.core.orchestration import concurrency, run_flow, run_shards
from pipeline.core.params import BackboneParams, Params
from pipeline.datasets.episodes import episode_images, read_manifests
from pipeline.datasets.index import read_index_dir
from pipeline.features import store as features
from pipeline.features.tasks import backbone_for, shard_task
from stages._common import stage_main


@flow(name="features")
def build_features(
    cfg: BackboneParams, index_dir: Path, episodes_dir: Path, clip_dir: Path, out: Path, workers: int
) -> dict:
    index, _ = read_index_dir(index_dir)
    paths = dict(zip(index.image_id, index.image_path, strict=True))
    image_ids = episode_images(read_manifests(episodes_dir).values())
    net = backbone_for(str(clip_dir), cfg)
    with torch.no_grad():
        probe = net(torch.zeros(1, 3, cfg.image_size, cfg.image_size, device=next(net.parameters()).device))
    clip_sha = (clip_dir / SHA_FILE).read_text().split()[0] if cfg.name == "clip" else None
    attrs = {"image_ids": image_ids, "backbone": cfg.model_dump(), "clip_sha256": clip_sha}
    staging = Staging(out, fingerprint([attrs, (episodes_dir / "meta.json").read_text()]))
    shard = features.create(
        zarr.open_group(staging.path, mode="a"),
        len(image_ids),
        probe.shape[1],
        tuple(probe.shape[-2:]),
        attrs,
    )
    threads = threads_per_task(workers)
    shards = {
        f"images-{s:07d}": range(s, min(s + shard, len(image_ids)))
        for s in range(0, len(image_ids), shard)
    }
    run_shards(
        staging,
        lambda name: shard_task.submit(
            str(staging.path),
            name,
            shards[name],
            [paths[i] for i in image_ids[shards[name].start : shards[name].stop]],
            str(clip_dir),
            cfg,
            threads,
            os.getcwd(),
        ),
        shards,
        "features: image shards",
        files=lambda name: zarr_shard_files(staging.path, shards[name].start // shard),
    )
    staging.commit()
    return {"images": len(image_ids), "channels": int(probe.shape[1]), "grid": list(probe.shape[-2:])}


def run(params: Params, args: argparse.Namespace) -> None:
    n = concurrency(params.orchestration, on_device=True)
    summary = run_flow(
        build_features,
        params.orchestration,
        on_device=True,
        cfg=params.backbone,
        index_dir=Path(args.index),
        episodes_dir=Path(args.episodes),
        clip_dir=Path(args.clip),
        out=Path(args.out),
        workers=n,
    )
    print(f"features: {summary} in {args.out}")


def main(argv: list[str] | None = None) -> int:
    return stage_main(
        "features",
        run,
        {
            "index": "data/index",
            "episodes": "data/episodes",
            "clip": "data/models/clip",
            "out": "data/features.zarr",
        },
        argv,
    )


if __name__ == "__main__":
    raise SystemExit(main())
