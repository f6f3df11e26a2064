"""`priors`: PI-CLIP priors of every image the episodes use, computed once per image.

Reads ``data/index``, ``data/episodes`` and ``data/models/clip``; writes ``data/priors.zarr``
(layout: ``pipeline/priors/store.py``) and ``data/priors_preview.png``. Work is split into
image shards (one forward per image, one GradCAM per (image, class) pair); a re-run after a
crash computes only the shards that were not finished.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from prefect import flow

from pipeline.core.artifacts import Staging, fingerprint, write_atomic, zarr_shard_files
from pipeline.core.cores import threads_per_task
from pipeline.core.orchestration import concurrency, run_flow, run_shards
from pipeline.core.params import Params, PriorsParams
from pipeline.datasets.episodes import image_classes, read_manifests
from pipeline.datasets.index import dataset_declaration, read_index_dir
from pipeline.priors import preview, store
from pipeline.priors.forward import image_features
from pipeline.priors.tasks import extractor, image_shard
from stages._common import stage_main


@flow(name="priors")
def build_priors(cfg: PriorsParams, dataset: str, index_dir: Path, episodes_dir: Path, clip_dir: Path,
                 out: Path, preview_path: Path, workers: int) -> dict:
    index, meta = read_index_dir(index_dir)
    index = index.set_index("image_id")
    manifests = read_manifests(episodes_dir)
    pairs = image_classes(manifests.values())
    names = dataset_declaration(meta, index_dir)["prompt_names"]
    ex = extractor(str(clip_dir), cfg, tuple(names))
    probe = image_features(ex.bundle.model.visual, torch.zeros(1, 3, ex.image_size, ex.image_size,
                                                               device=ex.device),
                           attention_blocks=cfg.pir_blocks)
    image_ids = list(pairs)
    layout = store.Layout(
        num_images=len(image_ids), slots=max(len(c) for c in pairs.values()), num_classes=len(names),
        grid=probe.grid, token_dims=tuple(t.shape[-1] for t in probe.tokens), shard_size=cfg.shard_size)
    attrs = {"clip_sha256": ex.bundle.sha256,
             "preprocess": {**ex.bundle.preprocess_cfg, "size": ex.image_size},
             "params": cfg.model_dump(), "dataset": dataset, "class_names": list(meta["class_names"]),
             "image_ids": image_ids, "dtype": ex.dtype}
    staging = Staging(out, fingerprint([attrs, (episodes_dir / "meta.json").read_text()]))
    zarr_path = staging.path
    store.create(zarr_path, layout, attrs)
    threads = threads_per_task(workers)
    shards = {f"images-{start:07d}": range(start, min(start + cfg.shard_size, len(image_ids)))
              for start in range(0, len(image_ids), cfg.shard_size)}

    def submit_images(name: str):
        rows = shards[name]
        ids = image_ids[rows.start: rows.stop]
        return image_shard.submit(str(zarr_path), name, rows, [index.at[i, "image_path"] for i in ids],
                                  [pairs[i] for i in ids], [list(index.at[i, "class_ids"]) for i in ids],
                                  str(clip_dir), cfg, tuple(names), threads, os.getcwd())

    run_shards(staging, submit_images, shards, "priors: image shards",
               files=lambda name: zarr_shard_files(zarr_path, shards[name].start // cfg.shard_size))
    examples = preview.pick_examples(manifests)
    write_atomic(preview_path, lambda tmp: preview.render(store.PriorStore(zarr_path), examples, index, tmp))
    staging.commit()
    return {"images": len(image_ids), "pairs": int(sum(map(len, pairs.values()))),
            "episodes": int(sum(map(len, manifests.values()))), "grid": list(layout.grid),
            "dtype": ex.dtype}


def run(params: Params, args: argparse.Namespace) -> None:
    n = concurrency(params.orchestration, on_device=True)
    summary = run_flow(build_priors, params.orchestration, on_device=True, cfg=params.priors,
                       dataset=params.dataset.name,
                       index_dir=Path(args.index), episodes_dir=Path(args.episodes), clip_dir=Path(args.clip),
                       out=Path(args.out), preview_path=Path(args.preview), workers=n)
    print(f"priors: {json.dumps(summary)} in {args.out}")


def main(argv: list[str] | None = None) -> int:
    return stage_main("priors", run, {"index": "data/index", "episodes": "data/episodes",
                                      "clip": "data/models/clip", "out": "data/priors.zarr",
                                      "preview": "data/priors_preview.png"}, argv)


if __name__ == "__main__":
    raise SystemExit(main())
